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
"""

from __future__ import annotations

import enum
import functools
import logging
import ssl
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, Literal

import attrs
import nats.errors
import trio
import trio_asyncio
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import PubAck

from .._asyncwith import async_with_only
from .._counters import Tally, counter_metric, gauge_metric, metric_source
from .._health import SourceHealth
from .._hub import Hub, HubOverflow, HubOverflowName, SubscriptionStatistics, _split, tokens_match
from .._hub import Subscription as HubSubscription
from .._names import describe_error
from .._validation import (
    check_choice,
    check_count,
    check_duration,
    check_finite_duration,
    check_name,
)
from ._base import BusMessage
from ._memory import MemorySubscription
from ._nats_jetstream import (
    MSG_ID_HEADER,
    Puller,
    consumer_config,
    durable_name,
    ensure_consumer,
    ensure_stream,
    pattern_within,
    to_bus_message,
)
from ._nats_outbox import Outbox, Pacer
from ._nats_stored import Replies, StreamPublisher
from ._nats_url import NatsURL, require_tls

logger = logging.getLogger("engine.bus.nats")

# Publishing and acking yield to the scheduler once per this many calls (and
# whenever the outbox is full); see Pacer.
_YIELD_EVERY = 64

# How long closing may wait for nats-py to flush and say goodbye.
_CLOSE_GRACE = 5.0
# The same after a failed first connection: nothing to flush, and nats-py's
# close() can wait for ever on a connection whose TLS handshake failed
# (after it has closed the socket).
_ABORT_GRACE = 0.25


class NatsState(enum.StrEnum):
    """The connection's state, as nats-py reports it."""

    CONNECTED = "connected"
    """Connected to a server."""
    RECONNECTING = "reconnecting"
    """Lost the server; nats-py is reconnecting by itself."""
    CLOSED = "closed"
    """The bus is closed."""


# The enum's values again as a Literal (a type checker cannot derive one from
# the other), as every option enum of the engine is declared.
NatsStateName = Literal["connected", "reconnecting", "closed"]
"""The values of :class:`NatsState`, as the strings ``NatsBus.wait_state`` also accepts."""


@metric_source(label="bus")
@attrs.frozen
class NatsStatistics:
    """A snapshot of a :class:`NatsBus`.

    Attributes:
        name: the bus's name.
        url: the server URL with any credentials masked.
        stream: the JetStream stream, or ``None`` for core NATS.
        state: ``connected``, ``reconnecting`` or ``closed``.
        connected: 1 while connected to a server, else 0 (``state`` as a gauge).
        published: core: messages queued by :meth:`NatsBus.publish`;
            JetStream: messages the stream acknowledged.
        unsent: core publishes nats-py refused (its reconnect buffer was
            full while the server was away), and pipelined JetStream
            publishes still unconfirmed when the bus closed. Core publishes
            written to a connection just before it broke are lost without a
            trace: core NATS is at most once.
        duplicates: JetStream publishes the server recognised by msg_id and
            did not store again.
        publish_retries: JetStream publishes sent again after no answer.
        unconfirmed: JetStream publishes in flight (``max_unconfirmed > 0``).
        received: messages that arrived for a subscription (queued, or
            dropped by its policy).
        acked: messages acked.
        redelivered: JetStream messages delivered more than once.
        dropped: messages discarded: by the subscriptions' overflow policies,
            after a ``disconnect``, or by nats-py for a slow consumer.
        reconnects: times the connection came back after a loss.
        subscriptions: one snapshot per live subscription.
    """

    name: str
    url: str
    stream: str | None
    state: str
    connected: int = attrs.field(metadata=gauge_metric("1 while connected to a server, else 0"))
    published: int = attrs.field(default=0, metadata=counter_metric("Messages published"))
    unsent: int = attrs.field(default=0, metadata=counter_metric("Publishes never sent"))
    duplicates: int = attrs.field(
        default=0, metadata=counter_metric("JetStream publishes de-duplicated by msg_id")
    )
    publish_retries: int = attrs.field(
        default=0, metadata=counter_metric("JetStream publishes sent again")
    )
    unconfirmed: int = attrs.field(
        default=0, metadata=gauge_metric("JetStream publishes awaiting the stream's answer")
    )
    received: int = attrs.field(default=0, metadata=counter_metric("Messages received"))
    acked: int = attrs.field(default=0, metadata=counter_metric("Messages acked"))
    redelivered: int = attrs.field(
        default=0, metadata=counter_metric("JetStream messages delivered again")
    )
    dropped: int = attrs.field(default=0, metadata=counter_metric("Messages discarded"))
    reconnects: int = attrs.field(default=0, metadata=counter_metric("Reconnections"))
    subscriptions: tuple[SubscriptionStatistics, ...] = ()


class _Tally(Tally[NatsStatistics]):
    """The counters behind :meth:`NatsBus.statistics`."""


@attrs.frozen
class NatsSettings:
    """How a :class:`NatsBus` behaves; see :func:`open_nats_bus` for each field."""

    name: str
    stream: str | None
    subjects: tuple[str, ...]
    ack_wait: float
    duplicate_window: float
    fetch_batch: int
    fetch_wait: float
    publish_retry_after: float
    max_unconfirmed: int
    reconnect_wait: float
    reconnect_buffer: int
    outbox_size: int
    tls: ssl.SSLContext | None = attrs.field(default=None, repr=False)


class NatsSubscription(MemorySubscription):
    """A subscription of a :class:`NatsBus`: an async iterator of :class:`BusMessage`.

    Iteration ends when the bus closes; with ``overflow="disconnect"`` it
    ends with :class:`engine.SubscriberDisconnected`.
    """

    def __init__(self, inner: HubSubscription[BusMessage]) -> None:
        super().__init__(inner)
        self._statistics = inner.statistics
        # JetStream: tells the puller that the queue has room again.
        self._on_take: Callable[[], None] | None = None

    async def __anext__(self) -> BusMessage:
        message = await super().__anext__()
        if self._on_take is not None:
            self._on_take()
        return message

    async def receive_batch(self, max_items: int) -> list[BusMessage]:
        """Every queued message, up to ``max_items``; waits for at least one."""
        messages = await super().receive_batch(max_items)
        if self._on_take is not None:
            self._on_take()
        return messages

    def receive_batch_nowait(self, max_items: int) -> list[BusMessage]:
        """Every queued message, up to ``max_items``; ``trio.WouldBlock`` if none."""
        messages = super().receive_batch_nowait(max_items)
        if self._on_take is not None:
            self._on_take()
        return messages

    def statistics(self) -> SubscriptionStatistics:
        """A frozen snapshot of this subscription's queue."""
        return self._statistics()


class _Room:
    """Holds nats-py's delivery task while a ``block`` subscription's queue is full.

    nats-py then keeps what arrives in its own buffer (up to its pending
    limits), and the server is not slowed: core NATS has no flow control.
    """

    def __init__(self, loop: trio_asyncio.TrioEventLoop) -> None:
        self._loop = loop
        self._waiter: Any = None  # an asyncio future, while a delivery waits

    def taken(self) -> None:
        """The reader took messages (trio side): wake the waiting delivery."""
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def publish(self, hub: Hub[BusMessage], topic: str, message: BusMessage) -> None:
        """Queue ``message`` once there is room (asyncio side)."""
        while True:
            self._waiter = self._loop.create_future()
            await self._waiter
            try:
                hub.publish_nowait(topic, message)
            except trio.WouldBlock:
                continue
            except trio.ClosedResourceError:
                pass
            return


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
        self._url = url
        self._settings = settings
        self._loop = loop
        self._aio = functools.partial(trio_asyncio.aio_as_trio, loop=loop)
        self._client = Client()
        self._js: JetStreamContext | None = None
        self._stored: StreamPublisher | None = None
        self._outbox = Outbox(self._client, settings.outbox_size, self._count_unsent)
        # Shielded: an outer cancel must not stop the hand-over before aclose()
        # has flushed it; aclose()'s caller cancels it once the bus is closed.
        self._outbox_scope = trio.CancelScope(shield=True)
        self._tally = _Tally()
        self._state = NatsState.RECONNECTING
        self._state_changed = trio.Event()
        self._closed = False
        self._connected_once = False
        self._client_started = False  # nats-py's close() needs its connect() first
        self._pacer = Pacer(_YIELD_EVERY)
        self._hubs: dict[Hub[BusMessage], NatsSubscription] = {}
        self._stream_subjects: tuple[tuple[str, ...], ...] = ()

    def __repr__(self) -> str:
        stream = f", stream={self._settings.stream!r}" if self._settings.stream else ""
        return f"<NatsBus {self._settings.name!r} {self._url.redacted}{stream} {self._state}>"

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
        return self._state

    async def wait_state(self, state: NatsState | NatsStateName) -> None:
        """Return once the connection is in ``state`` (at once if it is).

        Raises:
            ValueError: not a :class:`NatsState` value.
            trio.ClosedResourceError: the bus closed first (unless waiting for ``closed``).
        """
        wanted = check_choice("state", state, NatsState)
        await trio.lowlevel.checkpoint()
        while self._state is not wanted:
            if self._state is NatsState.CLOSED:
                raise trio.ClosedResourceError(f"nats bus {self.name!r} is closed")
            await self._state_changed.wait()

    def health(self) -> SourceHealth:
        """``connected`` (ready), or ``reconnecting`` or ``closed`` (not ready): for /ready."""
        state = self.state
        return SourceHealth(str(state), ready=state is NatsState.CONNECTED)

    def statistics(self) -> NatsStatistics:
        """A frozen snapshot of the bus's counters and its subscriptions."""
        subscriptions = tuple(s.statistics() for s in self._hubs.values())
        live_dropped = sum(s.dropped + s.lost for s in subscriptions)
        return self._tally.snapshot(
            name=self._settings.name,
            url=self._url.redacted,
            stream=self._settings.stream,
            state=str(self._state),
            dropped=self._tally.dropped + live_dropped,
            unsent=self._tally.unsent + (self._stored.unsent if self._stored else 0),
            unconfirmed=self._stored.unconfirmed if self._stored else 0,
            connected=int(self._state is NatsState.CONNECTED),
            subscriptions=subscriptions,
        )

    # -- connection --------------------------------------------------------

    async def _connect(self) -> None:
        settings = self._settings
        if self._url.scheme == "tls":
            await require_tls(self._url)
        self._client_started = True
        try:
            # No retries on the first connection: a wrong host or password
            # fails here, with its reason, instead of being retried for ever.
            await self._aio(self._client.connect)(
                servers=[self._url.url],
                name=settings.name,
                error_cb=self._on_error,
                disconnected_cb=self._on_disconnected,
                reconnected_cb=self._on_reconnected,
                closed_cb=self._on_closed,
                allow_reconnect=False,
                max_reconnect_attempts=-1,
                reconnect_time_wait=settings.reconnect_wait,
                pending_size=settings.reconnect_buffer,
                **({} if settings.tls is None else {"tls": settings.tls}),
            )
        except (OSError, TimeoutError, nats.errors.Error) as exc:
            raise trio.BrokenResourceError(
                f"cannot connect to NATS at {self._url.redacted}: {describe_error(exc)}"
            ) from exc
        # Once connected, nats-py reconnects by itself (it reads this option then).
        self._client.options["allow_reconnect"] = True
        self._connected_once = True
        self._set_state(NatsState.CONNECTED)
        if settings.stream is not None:
            self._js = self._client.jetstream()
            try:
                subjects = await ensure_stream(
                    self._aio,
                    self._js,
                    settings.stream,
                    settings.subjects,
                    settings.duplicate_window,
                )
            except nats.errors.Error as exc:
                raise trio.BrokenResourceError(
                    f"cannot create or bind stream {settings.stream!r}: {describe_error(exc)}"
                ) from exc
            self._stream_subjects = tuple(tuple(s.split(".")) for s in subjects)
            replies = Replies(self._client.new_inbox())
            await self._aio(self._client.subscribe)(f"{replies.prefix}.*", cb=replies.on_reply)
            self._stored = StreamPublisher(
                outbox=self._outbox,
                stream=settings.stream,
                retry_after=settings.publish_retry_after,
                max_unconfirmed=settings.max_unconfirmed,
                wait_connected=functools.partial(self.wait_state, NatsState.CONNECTED),
                on_stored=self._count_stored,
                on_retry=self._count_retry,
                pacer=self._pacer,
                replies=replies,
            )

    def _set_state(self, state: NatsState) -> None:
        if self._state is NatsState.CLOSED or state is self._state:
            return
        self._state = state
        self._state_changed.set()
        self._state_changed = trio.Event()

    async def _on_error(self, error: Exception) -> None:
        if not self._connected_once:
            return  # the first connection failed: _connect raises it
        if isinstance(error, nats.errors.SlowConsumerError):
            self._tally.dropped += 1
            return
        logger.warning("nats bus %r (%s): %s", self.name, self._url.redacted, describe_error(error))

    async def _on_disconnected(self) -> None:
        if not self._closed:
            logger.warning("nats bus %r: lost %s, reconnecting", self.name, self._url.redacted)
            self._set_state(NatsState.RECONNECTING)

    async def _on_reconnected(self) -> None:
        self._tally.reconnects += 1
        logger.info("nats bus %r: reconnected to %s", self.name, self._url.redacted)
        self._set_state(NatsState.CONNECTED)

    async def _on_closed(self) -> None:
        self._set_state(NatsState.CLOSED)

    def _count_unsent(self) -> None:
        self._tally.unsent += 1

    async def _run_outbox(self) -> None:
        with self._outbox_scope:
            await self._aio(self._outbox.run)()

    async def _run_confirmations(self) -> None:
        assert self._stored is not None  # started only on a JetStream bus
        await self._stored.run()

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
        if self._closed:
            raise trio.ClosedResourceError(f"nats bus {self.name!r} is closed")
        if not isinstance(data, bytes | bytearray | memoryview):
            raise TypeError(f"data must be bytes, got {type(data).__name__}")
        tokens = _split(topic, "topic", wildcards=False)
        if msg_id is not None and (not isinstance(msg_id, str) or not msg_id):
            raise ValueError(f"msg_id must be a non-empty string, got {msg_id!r}")
        if len(data) > self._client.max_payload:
            raise ValueError(f"data is {len(data)} bytes, over the server's max_payload")
        if self._js is not None:
            await self._publish_stored(topic, tokens, bytes(data), msg_id)
            return
        outbox = self._outbox
        while outbox.full():
            await outbox.wait_for_room()
            if self._closed:
                raise trio.ClosedResourceError(f"nats bus {self.name!r} is closed")
            self._pacer.reset()
        outbox.put((topic, bytes(data), None if msg_id is None else {MSG_ID_HEADER: msg_id}, ""))
        self._tally.published += 1
        await self._pacer.pace()

    async def _publish_stored(
        self, topic: str, tokens: tuple[str, ...], data: bytes, msg_id: str | None
    ) -> None:
        if not any(tokens_match(pattern, tokens) for pattern in self._stream_subjects):
            raise ValueError(f"topic {topic!r} is not in stream {self._settings.stream!r}")
        assert self._stored is not None  # set with the stream
        await self._stored.publish(topic, data, {MSG_ID_HEADER: msg_id or uuid.uuid4().hex})

    def _count_stored(self, ack: PubAck) -> None:
        self._tally.published += 1
        if ack.duplicate:
            self._tally.duplicates += 1

    def _count_retry(self) -> None:
        self._tally.publish_retries += 1

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
        if self._js is not None and not any(
            pattern_within(tokens, subject) for subject in self._stream_subjects
        ):
            raise ValueError(f"pattern {pattern!r} is not in stream {self._settings.stream!r}")
        bound = check_count("maxsize", maxsize, minimum=1)
        policy = check_choice("overflow", overflow, HubOverflow)
        if queue is not None:
            check_name("queue", queue)
            if any(c in queue for c in " .*>"):
                raise ValueError(f"queue must not contain spaces, '.', '*' or '>', got {queue!r}")
        if self._settings.stream is None:
            manager = self._subscribed_core(pattern, bound, policy, queue)
        else:
            manager = self._subscribed_stream(pattern, bound, queue)
        return async_with_only(manager, call="bus.subscribe", target="sub", loop="message")

    @asynccontextmanager
    async def _subscribed_core(
        self, pattern: str, maxsize: int, overflow: HubOverflow, queue: str | None
    ) -> AsyncIterator[NatsSubscription]:
        async with self._local_queue(pattern, maxsize, overflow) as (hub, subscription):
            room = _Room(self._loop)
            subscription._on_take = room.taken
            nats_sub = await self._aio(self._client.subscribe)(
                pattern, queue=queue or "", cb=self._core_deliverer(hub, room)
            )
            try:
                yield subscription
            finally:
                room.taken()  # a delivery waiting for room finds the queue gone
                if not self._closed:
                    with trio.CancelScope(shield=True), trio.move_on_after(_CLOSE_GRACE):
                        await self._aio(nats_sub.unsubscribe)()

    def _core_deliverer(
        self, hub: Hub[BusMessage], room: _Room
    ) -> Callable[[Msg], Awaitable[None]]:
        tally = self._tally

        async def deliver(msg: Msg) -> None:  # runs in the asyncio loop, one message at a time
            message = to_bus_message(msg, _no_ack)
            tally.received += 1
            try:
                hub.publish_nowait(msg.subject, message)
            except trio.WouldBlock:  # "block", and the queue is full: hold nats-py back
                await room.publish(hub, msg.subject, message)
            except trio.ClosedResourceError:
                pass  # the bus closed while the message was on its way

        return deliver

    @asynccontextmanager
    async def _subscribed_stream(
        self, pattern: str, maxsize: int, queue: str | None
    ) -> AsyncIterator[NatsSubscription]:
        assert self._js is not None  # only called on a JetStream bus
        stream = self._settings.stream
        assert stream is not None  # so is this
        if self._closed:
            raise trio.ClosedResourceError(f"nats bus {self.name!r} is closed")
        durable = queue or durable_name(self.name, pattern)
        config = consumer_config(durable, pattern, self._settings.ack_wait)
        try:
            bound = await ensure_consumer(self._aio, self._js, stream, config)
        except nats.errors.Error as exc:
            raise trio.BrokenResourceError(
                f"cannot create or bind consumer {durable!r} of {pattern!r} on stream "
                f"{stream!r}: {describe_error(exc)}"
            ) from exc
        if bound != pattern:
            raise trio.BrokenResourceError(
                f"durable consumer {durable!r} on stream {stream!r} takes {bound!r}, "
                f"not {pattern!r}: name another queue"
            )
        async with (
            self._local_queue(pattern, maxsize, HubOverflow.BLOCK) as (hub, subscription),
            trio.open_nursery() as nursery,
        ):
            inbox = self._client.new_inbox()
            puller = Puller(
                outbox=self._outbox,
                hub=hub,
                room=lambda: maxsize - subscription.statistics().depth,
                next_subject=f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{durable}",
                inbox=inbox,
                make_ack=self._acker,
                on_message=self._count_fetched,
                loop=self._loop,
                batch=self._settings.fetch_batch,
                fetch_wait=self._settings.fetch_wait,
            )
            subscription._on_take = puller.taken
            deliveries = await self._aio(self._client.subscribe)(inbox, cb=puller.deliver)
            nursery.start_soon(puller.run, name=f"nats pull {pattern}")
            try:
                yield subscription
            finally:
                nursery.cancel_scope.cancel()
                if not self._closed:
                    with trio.CancelScope(shield=True), trio.move_on_after(_CLOSE_GRACE):
                        await self._aio(deliveries.unsubscribe)()

    @asynccontextmanager
    async def _local_queue(
        self, pattern: str, maxsize: int, overflow: HubOverflow
    ) -> AsyncIterator[tuple[Hub[BusMessage], NatsSubscription]]:
        if self._closed:
            raise trio.ClosedResourceError(f"nats bus {self.name!r} is closed")
        # One private hub per subscription: its queue, policies and counters,
        # without routing one NATS message to a second subscription.
        hub: Hub[BusMessage] = Hub(name=self.name)
        async with hub.subscribe(pattern, maxsize=maxsize, overflow=overflow) as inner:
            subscription = NatsSubscription(inner)
            self._hubs[hub] = subscription
            try:
                yield hub, subscription
            finally:
                final = self._hubs.pop(hub).statistics()
                self._tally.dropped += final.dropped + final.lost

    def _count_fetched(self, redelivered: bool) -> None:
        self._tally.received += 1
        if redelivered:
            self._tally.redelivered += 1

    def _acker(self, msg: Msg) -> Callable[[], Awaitable[None]]:
        acked = False

        async def ack() -> None:
            nonlocal acked
            await trio.lowlevel.checkpoint_if_cancelled()
            if acked or self._closed:
                return  # once is enough; after close the server redelivers it
            while self._outbox.full():
                await self._outbox.wait_for_room()
                self._pacer.reset()
            acked = True
            self._outbox.put(msg)
            self._tally.acked += 1
            await self._pacer.pace()

        return ack

    # -- closing -----------------------------------------------------------

    async def aclose(self) -> None:
        """Close the bus: subscriptions drain their queues and end; publishing fails.

        Core publishes already accepted are handed to nats-py and flushed
        first, and pipelined JetStream publishes confirmed (within a few
        seconds' grace; what is left counts as ``unsent``). Un-acked JetStream
        messages are redelivered later, to whoever consumes the durable
        consumer then.
        """
        if self._closed:
            await trio.lowlevel.checkpoint()
            return
        self._closed = True
        for hub in list(self._hubs):
            hub.close()
        if self._stored is not None:
            self._stored.close()
        grace = _CLOSE_GRACE if self._connected_once else _ABORT_GRACE
        with trio.CancelScope(shield=True):
            with trio.move_on_after(grace):
                if self._stored is not None:
                    await self._stored.wait_confirmed()
                await self._outbox.wait_drained()
            # Whether or not all went out in time: the connection is closed.
            if self._client_started:
                with trio.move_on_after(grace):
                    await self._aio(self._client.close)()
        self._set_state(NatsState.CLOSED)


async def _no_ack() -> None:
    return None


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
        check_name("stream", stream)
        if any(c in stream for c in " .*>"):
            raise ValueError(f"stream must not contain spaces, '.', '*' or '>', got {stream!r}")
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
