"""The NATS bus: core subjects (at most once) or JetStream (at least once), under trio.

nats-py is an asyncio library. :func:`open_nats_bus` runs it in an asyncio
loop of its own (``trio_asyncio.open_loop``), opened in a task the bus owns
and closed with the bus, so its caller writes plain trio. Each such loop is
independent: a program that already runs a trio-asyncio loop for other code
keeps it, and the bus's loop neither uses nor replaces it.

Topics are NATS subjects as they are: ``*`` is one token, a final ``>`` the
rest. Each subscription has a bounded queue with the hub's overflow
policies (:class:`engine.HubOverflow`).

trio-asyncio runs every asyncio callback in a turn of trio's scheduler of
its own, so the bus keeps asyncio's share of each message small: trio tasks
hand publishes and acks to one asyncio task in batches (``_nats_outbox``);
JetStream answers and pulled messages arrive on plain subscriptions whose
callbacks feed trio directly (``_nats_stored``, ``_nats_jetstream``), rather
than through an asyncio future per message.

:class:`NatsBus` is the public handle; the connection and its state are
``_nats_connection``'s, the subscriptions' queues and deliveries
``_nats_subscriptions``', the settings and statistics ``_nats_values``'.
"""

from __future__ import annotations

import ssl
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager

import trio
import trio_asyncio
from nats.aio.client import Client

from .._asyncwith import async_with_only
from .._health import SourceHealth
from .._hub import HubOverflow, HubOverflowName, _split, tokens_match
from .._validation import (
    check_choice,
    check_count,
    check_duration,
    check_finite_duration,
    check_name,
)
from ._nats_connection import Connection, Link, Stream, open_stream
from ._nats_jetstream import MSG_ID_HEADER, pattern_within
from ._nats_outbox import Outbox, Pacer
from ._nats_subscriptions import NatsSubscription as NatsSubscription
from ._nats_subscriptions import Subscriptions
from ._nats_url import NatsURL
from ._nats_values import NatsSettings as NatsSettings
from ._nats_values import NatsState as NatsState
from ._nats_values import NatsStateName as NatsStateName
from ._nats_values import NatsStatistics as NatsStatistics
from ._nats_values import NatsTally

# Publishing and acking yield to the scheduler once per this many calls (and
# whenever the outbox is full); see Pacer.
_YIELD_EVERY = 64

# How long closing may wait for nats-py to flush and say goodbye.
_CLOSE_GRACE = 5.0
# The same after a failed first connection: nothing to flush, and nats-py's
# close() can wait for ever on a connection whose TLS handshake failed
# (after it has closed the socket).
_ABORT_GRACE = 0.25


class NatsBus:
    """A :class:`~engine.bus.Bus` on NATS; open it with :func:`open_nats_bus`.

    Without a stream it uses core NATS: at most once, fast, nothing kept.
    With one it uses JetStream: every publish is stored before
    :meth:`publish` returns (or, with ``max_unconfirmed``, before the bus
    closes), each subscription is a durable pull consumer, and a message
    not acked within ``ack_wait`` is delivered again.
    """

    def __init__(
        self, url: NatsURL, settings: NatsSettings, loop: trio_asyncio.TrioEventLoop
    ) -> None:
        client = Client()
        self._settings = settings
        self._loop = loop  # the bus's own asyncio loop, closed with the bus
        self._link = Link(
            url=url,
            settings=settings,
            loop=loop,
            client=client,
            outbox=Outbox(client, settings.outbox_size, self._count_unsent),
            pacer=Pacer(_YIELD_EVERY),
            tally=NatsTally(),
        )
        self._connection = Connection(self._link)
        self._subscriptions = Subscriptions(self._link)
        self._stream: Stream | None = None
        # Shielded: an outer cancel must not stop the hand-over before aclose()
        # has flushed it; aclose()'s caller cancels it once the bus is closed.
        self._outbox_scope = trio.CancelScope(shield=True)

    def __repr__(self) -> str:
        stream = f", stream={self._settings.stream!r}" if self._settings.stream else ""
        url = self._link.url.redacted
        return f"<NatsBus {self._settings.name!r} {url}{stream} {self._connection.state}>"

    @property
    def name(self) -> str:
        """The bus's name (statistics, logs, default durable consumer names)."""
        return self._settings.name

    @property
    def at_least_once(self) -> bool:
        """Whether a message not acked is delivered again: true on JetStream."""
        return self._settings.stream is not None

    @property
    def state(self) -> NatsState:
        """``connected``, ``reconnecting`` or ``closed``."""
        return self._connection.state

    async def wait_state(self, state: NatsState | NatsStateName) -> None:
        """Return once the connection is in ``state`` (at once if it is).

        Raises:
            ValueError: not a :class:`NatsState` value.
            trio.ClosedResourceError: the bus closed first (unless waiting for ``closed``).
        """
        wanted = check_choice("state", state, NatsState)
        await trio.lowlevel.checkpoint()
        await self._connection.wait_state(wanted)

    def health(self) -> SourceHealth:
        """``connected`` (ready), or ``reconnecting`` or ``closed`` (not ready): for /ready."""
        state = self.state
        return SourceHealth(str(state), ready=state is NatsState.CONNECTED)

    def statistics(self) -> NatsStatistics:
        """A frozen snapshot of the bus's counters and its subscriptions."""
        subscriptions = self._subscriptions.statistics()
        live_dropped = sum(s.dropped + s.lost for s in subscriptions)
        publisher = self._stream.publisher if self._stream else None
        tally = self._link.tally
        return tally.snapshot(
            name=self._settings.name,
            url=self._link.url.redacted,
            stream=self._settings.stream,
            state=str(self.state),
            dropped=tally.dropped + live_dropped,
            unsent=tally.unsent + (publisher.unsent if publisher else 0),
            unconfirmed=publisher.unconfirmed if publisher else 0,
            connected=int(self.state is NatsState.CONNECTED),
            subscriptions=subscriptions,
        )

    # -- running -----------------------------------------------------------

    async def _connect(self) -> None:
        await self._connection.connect()
        if self._settings.stream is not None:
            self._stream = await open_stream(self._link, self._connection)
            self._subscriptions.stream = self._stream

    def _count_unsent(self) -> None:
        self._link.tally.unsent += 1

    async def _run_outbox(self) -> None:
        with self._outbox_scope:
            await self._link.aio(self._link.outbox.run)()

    async def _run_confirmations(self) -> None:
        assert self._stream is not None  # started only on a JetStream bus
        await self._stream.publisher.run()

    # -- publishing --------------------------------------------------------

    async def publish(self, topic: str, data: bytes, *, msg_id: str | None = None) -> None:
        """Publish ``data`` on ``topic``.

        Core NATS: the message is queued for nats-py and this returns; it is
        a cancellation point on every call, and yields to other tasks every
        few calls or when the outbox is full (as nats-py's own publish waits
        only for a full buffer). While the server is away nats-py buffers up
        to ``reconnect_buffer`` bytes; what does not fit is counted as
        ``unsent``.

        JetStream: returns once the stream stored the message (or, with
        ``max_unconfirmed``, once it is queued and fewer than that many await
        an answer). Without an answer within ``publish_retry_after`` the
        message is sent again with the same ``Nats-Msg-Id`` (one is made up
        when ``msg_id`` is ``None``), so the server keeps one copy; waiting
        for the server to come back ends only with the caller's cancel scope.

        Raises:
            TypeError: ``data`` is not bytes.
            ValueError: a bad topic, one the stream does not capture, or data
                over the server's ``max_payload``.
            trio.ClosedResourceError: the bus is closed.
            trio.BrokenResourceError: the stream refused the message.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        link = self._link
        link.check_open()
        if not isinstance(data, bytes | bytearray | memoryview):
            raise TypeError(f"data must be bytes, got {type(data).__name__}")
        tokens = _split(topic, "topic", wildcards=False)
        if msg_id is not None and (not isinstance(msg_id, str) or not msg_id):
            raise ValueError(f"msg_id must be a non-empty string, got {msg_id!r}")
        if len(data) > link.client.max_payload:
            raise ValueError(f"data is {len(data)} bytes, over the server's max_payload")
        if self._stream is not None:
            if not any(tokens_match(pattern, tokens) for pattern in self._stream.subjects):
                raise ValueError(f"topic {topic!r} is not in stream {self._settings.stream!r}")
            headers = {MSG_ID_HEADER: msg_id or uuid.uuid4().hex}
            await self._stream.publisher.publish(topic, bytes(data), headers)
            return
        outbox = link.outbox
        while outbox.full():
            await outbox.wait_for_room()
            link.check_open()
            link.pacer.reset()
        outbox.put((topic, bytes(data), None if msg_id is None else {MSG_ID_HEADER: msg_id}, ""))
        link.tally.published += 1
        await link.pacer.pace()

    # -- subscribing -------------------------------------------------------

    def subscribe(
        self,
        pattern: str,
        *,
        maxsize: int,
        overflow: HubOverflow | HubOverflowName = "drop_oldest",
        queue: str | None = None,
    ) -> AbstractAsyncContextManager[NatsSubscription]:
        """Subscribe to ``pattern`` for the length of an ``async with`` block.

        Args:
            pattern: a subject pattern (``trades.*``, ``trades.>``).
            maxsize: the local queue's bound; at least 1.
            overflow: what a full queue does (core NATS): ``drop_oldest``,
                ``drop_newest``, ``disconnect``, or ``block``, which makes
                nats-py hold messages in its own buffer until that overflows
                too (counted in ``dropped``). On JetStream the subscription
                fetches only what its queue has room for, so nothing is
                dropped and the policy never applies.
            queue: core NATS: a queue group; each message goes to one member.
                JetStream: the durable consumer's name; subscriptions sharing
                it share the messages. Without it, a durable consumer named
                after the bus and the pattern.

        Raises:
            ValueError: at call time, for a bad pattern (or, JetStream, one
                outside the stream), bound, policy or queue.
            trio.ClosedResourceError: on entering, if the bus is closed.
            trio.BrokenResourceError: on entering, JetStream: the server
                refused the consumer (a durable consumer of that name with
                another configuration, say).
        """
        tokens = _split(pattern, "pattern", wildcards=True)
        if self._stream is not None and not any(
            pattern_within(tokens, subject) for subject in self._stream.subjects
        ):
            raise ValueError(f"pattern {pattern!r} is not in stream {self._settings.stream!r}")
        bound = check_count("maxsize", maxsize, minimum=1)
        policy = check_choice("overflow", overflow, HubOverflow)
        if queue is not None:
            _check_token("queue", queue)
        if self._settings.stream is None:
            manager = self._subscriptions.core(pattern, bound, policy, queue)
        else:
            manager = self._subscriptions.stored(pattern, bound, queue)
        return async_with_only(manager, call="bus.subscribe", target="sub", loop="message")

    # -- closing -----------------------------------------------------------

    async def aclose(self) -> None:
        """Close the bus: subscriptions drain their queues and end; publishing fails.

        Core publishes already accepted are handed to nats-py and flushed
        first, and pipelined JetStream publishes confirmed (within a few
        seconds' grace; what is left counts as ``unsent``). Un-acked JetStream
        messages are redelivered later, to whoever consumes the durable
        consumer then.
        """
        link = self._link
        if link.closed:
            await trio.lowlevel.checkpoint()
            return
        link.closed = True
        self._subscriptions.close()
        publisher = self._stream.publisher if self._stream else None
        if publisher is not None:
            publisher.close()
        grace = _CLOSE_GRACE if self._connection.connected_once else _ABORT_GRACE
        with trio.CancelScope(shield=True):
            with trio.move_on_after(grace):
                if publisher is not None:
                    await publisher.wait_confirmed()
                await link.outbox.wait_drained()
            # Whether or not all went out in time: the connection is closed.
            if self._connection.client_started:
                with trio.move_on_after(grace):
                    await link.aio(link.client.close)()
        self._connection.set_state(NatsState.CLOSED)


async def _run_loop(
    stop: trio.Event, *, task_status: trio.TaskStatus[trio_asyncio.TrioEventLoop]
) -> None:
    async with trio_asyncio.open_loop() as loop:
        task_status.started(loop)
        # Shielded: an outer cancel reaches the bus's users too, and their
        # cleanup (unsubscribing, the last acks) still needs the loop. The
        # bus sets ``stop`` once it is closed, whatever happened.
        with trio.CancelScope(shield=True):
            await stop.wait()


def open_nats_bus(
    url: str,
    *,
    stream: str | None = None,
    subjects: Sequence[str] | None = None,
    name: str = "nats",
    ack_wait: float = 30.0,
    duplicate_window: float = 120.0,
    fetch_batch: int = 256,
    fetch_wait: float = 1.0,
    publish_retry_after: float = 2.0,
    max_unconfirmed: int = 0,
    reconnect_wait: float = 2.0,
    reconnect_buffer: int = 8 * 1024 * 1024,
    outbox_size: int = 4096,
    tls: ssl.SSLContext | None = None,
) -> AbstractAsyncContextManager[NatsBus]:
    """Connect to NATS for the length of an ``async with`` block.

    Example::

        async with engine.bus.open_nats_bus("nats://localhost:4222", stream="MARKET",
                                            subjects=["trades.>"]) as bus:
            await bus.publish("trades.BTCUSDT", payload, msg_id=trade_id)

    Args:
        url: ``nats://``, ``tls://``, ``ws://`` or ``wss://``, passed to
            nats-py as it is; ``user:password@`` or ``token@`` in it are used
            and never shown. nats-py upgrades a connection to TLS only when
            the server requires it, whatever the scheme: for ``tls://`` the
            bus first checks that the server does, and refuses to connect
            (so to send credentials in the clear) if it does not.
        stream: a JetStream stream to bind to, created if missing; ``None``
            for core NATS.
        subjects: the subject patterns a created stream captures; by
            default ``<stream>.>``, every topic under the stream's name.
        name: for statistics, logs and default durable consumer names.
        ack_wait: JetStream: seconds before an un-acked message is delivered again.
        duplicate_window: JetStream, for a created stream: seconds during
            which a repeated msg_id is recognised and not stored again.
        fetch_batch: JetStream: the most messages one fetch asks for.
        fetch_wait: JetStream: how long one fetch lingers on the server.
        publish_retry_after: JetStream: seconds without the stream's answer
            before a publish is sent again.
        max_unconfirmed: JetStream: 0 (the default) makes each publish wait
            until the stream stored it. More pipelines: a publish returns
            once queued, up to this many wait for the stream's answer at
            once, and a task of the bus sends again those that get none
            (which may then be stored after later ones); closing the bus
            waits for them. A message the stream refuses then fails the
            bus's block with ``trio.BrokenResourceError``.
        reconnect_wait: seconds between reconnection attempts.
        reconnect_buffer: bytes of core publishes nats-py holds while the
            server is away.
        outbox_size: publishes and acks queued for nats-py before
            :meth:`NatsBus.publish` waits.
        tls: the SSL context nats-py uses when the server requires TLS (a
            private CA, a client certificate); by default the system's.

    Raises:
        ValueError: at call time, a bad URL (shown masked) or setting.
        trio.BrokenResourceError: on entering, the first connection failed
            (or a ``tls://`` server does not require TLS); once connected,
            nats-py reconnects by itself for ever.
    """
    parsed = NatsURL.parse(url)
    if stream is not None:
        _check_token("stream", stream)
    if subjects is None:
        subjects = (f"{stream}.>",)
    if isinstance(subjects, str) or not subjects:
        raise ValueError(f"subjects must be a non-empty list of patterns, got {subjects!r}")
    for subject in subjects:
        _split(subject, "subject", wildcards=True)
    settings = NatsSettings(
        name=check_name("name", name),
        stream=stream,
        subjects=tuple(subjects),
        ack_wait=check_finite_duration("ack_wait", ack_wait),
        duplicate_window=check_finite_duration("duplicate_window", duplicate_window),
        fetch_batch=check_count("fetch_batch", fetch_batch, minimum=1),
        fetch_wait=check_finite_duration("fetch_wait", fetch_wait),
        publish_retry_after=check_duration("publish_retry_after", publish_retry_after),
        max_unconfirmed=check_count("max_unconfirmed", max_unconfirmed),
        reconnect_wait=check_duration("reconnect_wait", reconnect_wait),
        reconnect_buffer=check_count("reconnect_buffer", reconnect_buffer, minimum=1),
        outbox_size=check_count("outbox_size", outbox_size, minimum=1),
        tls=tls,
    )
    if tls is not None and not isinstance(tls, ssl.SSLContext):
        raise TypeError(f"tls must be an ssl.SSLContext, got {type(tls).__name__}")
    return _opened(parsed, settings)


def _check_token(what: str, value: str) -> None:
    """Check that ``value`` is usable as one token of a NATS subject (a stream or consumer name).

    Raises:
        ValueError: it is empty, not a string, or holds a space, ``.``, ``*`` or ``>``.
    """
    check_name(what, value)
    if any(c in value for c in " .*>"):
        raise ValueError(f"{what} must not contain spaces, '.', '*' or '>', got {value!r}")


@asynccontextmanager
async def _opened(url: NatsURL, settings: NatsSettings) -> AsyncIterator[NatsBus]:
    stop = trio.Event()
    failure: trio.BrokenResourceError | None = None
    async with trio.open_nursery() as nursery:
        loop: trio_asyncio.TrioEventLoop = await nursery.start(_run_loop, stop)
        bus = NatsBus(url, settings, loop)
        nursery.start_soon(bus._run_outbox, name="nats outbox")
        try:
            try:
                await bus._connect()
            except trio.BrokenResourceError as exc:
                failure = exc  # raised below, alone: not in the nursery's group
            else:
                if settings.max_unconfirmed and settings.stream is not None:
                    nursery.start_soon(bus._run_confirmations, name="nats confirmations")
                yield bus
        finally:
            with trio.CancelScope(shield=True):
                await bus.aclose()
            bus._outbox_scope.cancel()
            stop.set()
    if failure is not None:
        raise failure
