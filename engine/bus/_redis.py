"""The Redis bus: pub/sub (at most once) or streams (at least once), on redis-py.

Open one with ``async with open_redis_bus(url, mode=...) as bus:``. Every
call to Redis runs in a worker thread through redis-py's synchronous client,
so nothing blocks the event loop: publishes are queued in an outbox that
one thread sends in pipelines, many commands per round trip
(``_redis_outbox``); each subscription's reader is a thread
(:func:`engine.iterate_in_thread`) that hands what it read to trio in
batches. ``docs/bus.md`` says why this and not redis-py's asyncio client
under trio-asyncio, and what it costs.

Each subscription has its own connection, its own bounded queue with the
hub's overflow policies (it is an :class:`engine.Hub` of one, which also
does the exact topic filtering), and its own reader task, which reconnects
with the bus's backoff when the server goes away; ``state`` says
``reconnecting`` meanwhile and ``reconnects`` counts each return.

Pub/sub mode (``mode="pubsub"``)
    A topic is the channel ``<prefix><topic>``; the payload is the bytes
    published, nothing added, so other Redis clients interoperate (and
    ``msg_id`` is not carried). A pattern becomes a PSUBSCRIBE glob in
    which ``*`` and a final ``>`` are ``*`` and all else is escaped; the
    glob over-approximates (a Redis ``*`` matches dots), and the
    subscription keeps exactly the topics ``tokens_match`` accepts.
    At most once: what is published while a subscriber is disconnected is
    lost to it, uncounted (Redis does not say). A publish returns once it is
    queued for the server (fire and forget). When a pipeline fails on the
    connection, the publishes in it are lost and counted in
    ``publish_failures``; from then until the server answers a ping again
    (``state`` is ``reconnecting``), a publish fails at once with
    ``trio.BrokenResourceError``, also counted.

Streams mode (``mode="streams"``)
    One stream per bus (``stream``), trimmed with ``XADD MAXLEN ~ maxlen``;
    each entry holds ``topic``, ``data`` and, when given, ``id`` (the
    ``msg_id``). A subscription is a consumer (a name unique to the process
    and subscription) in the group ``<group>:<pattern>``, created at the
    stream's end: it receives what is published after it first subscribed,
    and processes subscribing to the same pattern in the same group share
    the entries. The group acknowledges entries of other topics as it reads
    them (the filtering is client-side, like pub/sub's).
    One stream for all topics keeps one order and makes ``*`` / ``>``
    subscriptions possible without discovering keys; the price is that
    every group reads every entry.
    At least once: :meth:`BusMessage.ack` queues an ``XACK``; the reader's
    thread sends the queued acks with its next read, in one round trip
    (within about 0.1 s), and the rest when the subscription ends. Entries
    not acknowledged for ``claim_idle`` seconds, a dead consumer's or this
    one's (a message the overflow policy dropped, say), are claimed with
    ``XAUTOCLAIM`` every ``claim_idle / 2`` and delivered again, counted in
    ``redelivered``; keep ``claim_idle`` well above the ack delay. After a
    reconnect a consumer first reads again what it had been given and not
    acknowledged. Nothing is lost across a server restart if the server
    persisted it (``appendonly yes``). Redeliveries are not de-duplicated
    here: compare ``msg_id``. A publish returns once the server confirmed
    its ``XADD`` (concurrent publishes share a pipeline and its round trip);
    one whose connection broke, or made while the server is known to be
    unreachable, raises ``trio.BrokenResourceError``, counted in
    ``publish_failures``.

Passwords given in the URL reach redis-py only: logs, errors, ``repr`` and
statistics show the URL without credentials.
"""

from __future__ import annotations

import enum
import functools
import logging
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, Literal

import attrs
import redis
import trio
from redis.backoff import NoBackoff
from redis.retry import Retry

from .._asyncwith import async_with_only
from .._backoff import Backoff
from .._counters import Tally, counter_metric, gauge_metric, metric_source
from .._health import SourceHealth
from .._hub import Hub, HubOverflow, HubOverflowName, SubscriptionStatistics, _split
from .._hub import Subscription as HubSubscription
from .._threads import to_thread
from .._validation import (
    check_choice,
    check_count,
    check_finite_duration,
    check_name,
)
from ._base import BusMessage
from ._memory import MemorySubscription
from ._redis_outbox import Outbox, Slot, xadd_command
from ._redis_readers import CONNECTION_ERRORS, PubSubReader, Reader, StreamReader
from ._redis_url import RedisAddress, parse_redis_url

logger = logging.getLogger("engine.bus.redis")

# Publishes queued for the sending thread before publish() waits for room.
_OUTBOX_SIZE = 10_000
# Seconds to connect, and to wait for a reply that is not a blocking read.
_CONNECT_TIMEOUT = 2.0
_REPLY_TIMEOUT = 5.0


class RedisMode(enum.StrEnum):
    """How a :class:`RedisBus` carries messages."""

    PUBSUB = "pubsub"
    """Redis pub/sub: at most once, nothing stored."""
    STREAMS = "streams"
    """A Redis stream with consumer groups: at least once, acknowledged."""


# The enum's values again as a Literal (a type checker cannot derive one from
# the other). Every option enum is declared with this shape.
RedisModeName = Literal["pubsub", "streams"]
"""The values of :class:`RedisMode`, as the strings ``open_redis_bus`` also accepts."""


class RedisState(enum.StrEnum):
    """Whether a :class:`RedisBus` reaches its server."""

    CONNECTED = "connected"
    """Every reader is connected, and so is the publisher."""
    RECONNECTING = "reconnecting"
    """A reader or the publisher lost the server and is reconnecting."""
    CLOSED = "closed"
    """The bus was closed."""


@metric_source(label="bus")
@attrs.frozen
class RedisBusStatistics:
    """A snapshot of a :class:`RedisBus`, shaped for /status and /metrics.

    Attributes:
        name: the bus's name.
        mode: ``pubsub`` or ``streams``.
        url: the server's URL, without credentials.
        state: ``connected``, ``reconnecting`` or ``closed``.
        subscriptions: live subscriptions.
        published: messages the server accepted.
        publish_failures: publishes that did not reach the server: refused
            at once while it was unreachable, or lost with a broken
            connection (pub/sub: queued, then lost; streams: raised).
        received: messages that matched a subscription, offered to its queue
            (``dropped`` counts those its policy then discarded).
        acked: acknowledgements the server confirmed (streams), including
            the entries of other topics a group skips.
        redelivered: messages delivered again: claimed from an idle consumer,
            or re-read after a reconnect (streams).
        dropped: messages the subscriptions' overflow policies discarded or lost,
            and messages skipped for a topic this bus cannot have published.
        reconnects: times a reader or the publisher connected again after a failure.
    """

    name: str
    mode: str
    url: str
    state: str
    subscriptions: int = attrs.field(metadata=gauge_metric("Live subscriptions"))
    published: int = attrs.field(default=0, metadata=counter_metric("Messages published"))
    publish_failures: int = attrs.field(
        default=0, metadata=counter_metric("Publishes that failed to reach the server")
    )
    received: int = attrs.field(default=0, metadata=counter_metric("Messages received"))
    acked: int = attrs.field(default=0, metadata=counter_metric("Acknowledgements confirmed"))
    redelivered: int = attrs.field(default=0, metadata=counter_metric("Messages redelivered"))
    dropped: int = attrs.field(
        default=0, metadata=counter_metric("Messages dropped by overflow policies")
    )
    reconnects: int = attrs.field(default=0, metadata=counter_metric("Reconnections"))


class _Tally(Tally[RedisBusStatistics]):
    """The counters behind :meth:`RedisBus.statistics`."""


class RedisSubscription(MemorySubscription):
    """A subscription of a :class:`RedisBus`: an async iterator of :class:`BusMessage`.

    Iteration ends when the bus closes and the queue is drained; with the
    ``disconnect`` policy it ends with :class:`engine.SubscriberDisconnected`.
    """

    def statistics(self) -> SubscriptionStatistics:
        """The local queue's counters (offered, delivered, dropped, lost, depth)."""
        return self._inner.statistics()


class RedisBus:
    """A :class:`~engine.bus.Bus` on a Redis server; open it with :func:`open_redis_bus`.

    Attributes:
        address: the server's address (its ``display`` has no credentials).
        client: the redis-py client (synchronous; call it in a thread only).
        mode: :attr:`RedisMode.PUBSUB` or :attr:`RedisMode.STREAMS`.
        name: for logs and statistics.
        prefix: pub/sub: the channel name prefix.
        stream: streams: the stream's key.
        group: streams: the consumer groups' name prefix.
        maxlen: streams: the approximate bound of the stream.
        claim_idle: streams: seconds before an unacknowledged entry is claimed.
        backoff: the delays between reconnection attempts.
    """

    def __init__(
        self,
        *,
        address: RedisAddress,
        client: redis.Redis,
        mode: RedisMode,
        name: str,
        prefix: str,
        stream: str,
        group: str,
        maxlen: int,
        claim_idle: float,
        backoff: Backoff,
    ) -> None:
        self.address = address
        self.client = client
        self.mode = mode
        self.name = name
        self.prefix = prefix
        self.stream = stream
        self.group = group
        self.maxlen = maxlen
        self.claim_idle = claim_idle
        self.backoff = backoff
        self._tally = _Tally()
        self._outbox = Outbox(
            client,
            maxsize=_OUTBOX_SIZE,
            backoff=backoff,
            on_sent=self._count_sent,
            on_lost=self._publisher_lost,
            on_up=functools.partial(self._came_up, "publisher"),
        )
        self._readers: dict[Reader, HubSubscription[BusMessage]] = {}
        self._down: set[object] = set()
        self._live = 0  # subscriptions entered and not yet finished
        self._closed = False

    def __repr__(self) -> str:
        return (
            f"<RedisBus {self.name!r} mode={self.mode.value} url={self.address.display} "
            f"state={self.state.value}>"
        )

    @property
    def at_least_once(self) -> bool:
        """Whether a message not acked is delivered again: true in streams mode."""
        return self.mode is RedisMode.STREAMS

    @property
    def state(self) -> RedisState:
        """``connected``, ``reconnecting`` (a reader or the publisher is down) or ``closed``."""
        if self._closed:
            return RedisState.CLOSED
        return RedisState.RECONNECTING if self._down else RedisState.CONNECTED

    async def publish(self, topic: str, data: bytes, *, msg_id: str | None = None) -> None:
        """Publish ``data`` on ``topic``.

        Pub/sub: returns once the command is queued (waiting only while
        the outbox is full); a broken connection loses it, counted.
        Streams: returns once the server confirmed the ``XADD``.

        Cancellation:
            If cancelled while waiting for the confirmation (streams), the
            message may or may not have been published.

        Raises:
            TypeError: ``data`` is not bytes, or ``msg_id`` not a string.
            ValueError: a bad topic.
            trio.ClosedResourceError: the bus is closed.
            trio.BrokenResourceError: the server is known to be unreachable,
                or (streams) the connection broke before the confirmation;
                counted in ``publish_failures``.
        """
        if not isinstance(data, bytes | bytearray | memoryview):
            raise TypeError(f"data must be bytes, got {type(data).__name__}")
        if msg_id is not None and not isinstance(msg_id, str):
            raise TypeError(f"msg_id must be a string or None, got {type(msg_id).__name__}")
        if self._closed:
            raise trio.ClosedResourceError(f"redis bus {self.name!r} is closed")
        _split(topic, "topic", wildcards=False)
        if "publisher" in self._down:
            await trio.lowlevel.checkpoint()  # failing fast is still a schedule point
            self._tally.publish_failures += 1
            raise self._cannot_publish("it is unreachable, reconnecting")
        await trio.lowlevel.checkpoint_if_cancelled()
        if self.mode is RedisMode.PUBSUB:
            await self._outbox.put(("PUBLISH", self.prefix + topic, bytes(data)))
            await trio.lowlevel.cancel_shielded_checkpoint()
            return
        slot = Slot()
        await self._outbox.put(xadd_command(self, topic, bytes(data), msg_id), slot)
        await slot.done.wait()
        if isinstance(slot.error, CONNECTION_ERRORS):
            self._tally.publish_failures += 1
            raise self._cannot_publish(str(slot.error)) from slot.error
        if slot.error is not None:
            raise slot.error  # the server refused the command (a redis.ResponseError)
        self._tally.published += 1

    def _cannot_publish(self, why: str) -> trio.BrokenResourceError:
        return trio.BrokenResourceError(
            f"redis bus {self.name!r}: cannot publish to {self.address.display}: {why}"
        )

    def _count_sent(self, forgotten: int) -> None:
        self._tally.published += forgotten

    def _publisher_lost(self, forgotten: int, error: BaseException) -> None:
        self._tally.publish_failures += forgotten
        if "publisher" not in self._down and not self._closed:
            self._went_down("publisher")
            logger.warning(
                "redis bus %r: the publisher lost its connection to %s (%s); %d queued "
                "publishes lost; reconnecting",
                self.name,
                self.address.display,
                error,
                forgotten,
            )

    def subscribe(
        self, pattern: str, *, maxsize: int, overflow: HubOverflow | HubOverflowName = "drop_oldest"
    ) -> AbstractAsyncContextManager[RedisSubscription]:
        """Subscribe to ``pattern`` for the length of an ``async with`` block.

        Entering returns once the server confirmed the subscription: what is
        published after that reaches it.

        Args:
            pattern: a topic pattern (``trades.*``, ``trades.>``).
            maxsize: the local queue's bound; at least 1.
            overflow: ``"drop_oldest"`` (default), ``"drop_newest"``,
                ``"disconnect"`` or ``"block"`` (the reader waits; Redis
                buffers meanwhile, up to its output buffer limits).

        Raises:
            ValueError: at call time, for a bad pattern, bound or policy.
            trio.ClosedResourceError: on entering, if the bus is closed.
            trio.BrokenResourceError: on entering, if the server cannot be reached.
        """
        tokens = _split(pattern, "pattern", wildcards=True)
        bound = check_count("maxsize", maxsize, minimum=1)
        policy = check_choice("overflow", overflow, HubOverflow)
        return async_with_only(
            self._subscribed(pattern, tokens, bound, policy),
            call="bus.subscribe",
            target="sub",
            loop="message",
        )

    @asynccontextmanager
    async def _subscribed(
        self, pattern: str, tokens: tuple[str, ...], maxsize: int, overflow: HubOverflow
    ) -> AsyncIterator[RedisSubscription]:
        if self._closed:
            raise trio.ClosedResourceError(f"redis bus {self.name!r} is closed")
        hub: Hub[BusMessage] = Hub(name=self.name)
        kind = PubSubReader if self.mode is RedisMode.PUBSUB else StreamReader
        reader = kind(self, hub, pattern, tokens)
        await reader.open()
        self._live += 1
        try:
            async with hub.subscribe(pattern, maxsize=maxsize, overflow=overflow) as inner:
                try:
                    async with trio.open_nursery() as nursery:
                        await nursery.start(reader.run)
                        self._readers[reader] = inner
                        try:
                            yield RedisSubscription(inner)
                        finally:
                            reader.scope.cancel()
                            hub.close()
                finally:
                    self._readers.pop(reader, None)
                    self._down.discard(reader)
                    statistics = inner.statistics()
                    self._tally.dropped += statistics.dropped + statistics.lost
                    await reader.finish()
        finally:
            self._live -= 1
            if self._closed and not self._live:
                await self._close_client()

    async def aclose(self) -> None:
        """Close the bus: subscribers drain what is queued, then their iteration ends.

        Publishing fails from now on, with ``trio.ClosedResourceError``.
        """
        if not self._closed:
            self._closed = True
            self._outbox.stop()  # sends what is queued, then its thread ends
            for reader in self._readers:
                reader.scope.cancel()
                reader.hub.close()
            if not self._live:  # else the last subscription to end closes it
                await self._close_client()
        await trio.lowlevel.checkpoint()

    async def _close_client(self) -> None:
        # The publisher's thread first: it sends what was queued before the
        # close. Disconnecting the pool closes sockets only: quick, yet in a thread.
        with trio.CancelScope(shield=True):
            await self._outbox.wait_ended()
            await to_thread(self.client.close)

    def health(self) -> SourceHealth:
        """``connected`` (ready), or ``reconnecting`` or ``closed`` (not ready): for /ready."""
        state = self.state
        return SourceHealth(str(state), ready=state is RedisState.CONNECTED)

    def statistics(self) -> RedisBusStatistics:
        """A frozen snapshot of the bus's counters; the URL without credentials."""
        live = [inner.statistics() for inner in self._readers.values()]
        return self._tally.snapshot(
            name=self.name,
            mode=self.mode.value,
            url=self.address.display,
            state=self.state.value,
            subscriptions=len(live),
            dropped=self._tally.dropped + sum(s.dropped + s.lost for s in live),
        )

    def _went_down(self, who: object) -> None:
        self._down.add(who)

    def _came_up(self, who: object) -> None:
        if who in self._down:
            self._down.discard(who)
            self._tally.reconnects += 1
            logger.info("redis bus %r: reconnected to %s", self.name, self.address.display)


def _check_backoff(backoff: Backoff | None) -> Backoff:
    if backoff is None:
        return Backoff(initial=0.05, maximum=2.0, reset_after=60.0)
    if not isinstance(backoff, Backoff):
        raise TypeError(f"backoff must be an engine.Backoff, got {backoff!r}")
    return backoff


def open_redis_bus(
    url: str,
    *,
    mode: RedisMode | RedisModeName = "pubsub",
    name: str = "redis",
    prefix: str = "",
    stream: str = "engine.bus",
    group: str = "engine",
    maxlen: int = 100_000,
    claim_idle: float = 30.0,
    backoff: Backoff | None = None,
) -> AbstractAsyncContextManager[RedisBus]:
    """Open a :class:`RedisBus` for the length of an ``async with`` block.

    ::

        async with open_redis_bus("redis://:secret@cache:6379/0", mode="streams") as bus:
            async with bus.subscribe("trades.>", maxsize=1000) as sub:
                async for message in sub:
                    ...
                    await message.ack()

    Args:
        url: ``redis://[[user]:password@]host[:port][/db]``, or ``rediss://``
            for TLS (redis-py's ``ssl_*`` query options pass through).
        mode: ``"pubsub"`` (at most once) or ``"streams"`` (at least once).
        name: for logs and statistics.
        prefix: pub/sub: prepended to every topic to make its channel name.
        stream: streams: the stream's key.
        group: streams: the consumer group's name; a subscription joins
            ``<group>:<pattern>``.
        maxlen: streams: the stream is trimmed to about this many entries.
        claim_idle: streams: seconds an entry may stay unacknowledged before
            another consumer claims it.
        backoff: the delays between reconnection attempts; by default from
            50 ms doubling up to 2 s.

    Returns:
        An async context manager yielding the :class:`RedisBus`; leaving it
        closes the bus.

    Raises:
        ValueError: at call time, for a bad URL, mode, name, bound or delay.
        TypeError: at call time, for arguments of the wrong type.
        trio.BrokenResourceError: on entering, if the server cannot be reached.
    """
    address = parse_redis_url(url)
    if not isinstance(prefix, str):
        raise TypeError(f"prefix must be a string, got {prefix!r}")
    settings: dict[str, Any] = {
        "mode": check_choice("mode", mode, RedisMode),
        "name": check_name("name", name),
        "prefix": prefix,
        "stream": check_name("stream", stream),
        "group": check_name("group", group),
        "maxlen": check_count("maxlen", maxlen, minimum=1),
        "claim_idle": check_finite_duration("claim_idle", claim_idle),
        "backoff": _check_backoff(backoff),
    }
    return _opened(address, settings)


@asynccontextmanager
async def _opened(address: RedisAddress, settings: dict[str, Any]) -> AsyncIterator[RedisBus]:
    # No retries inside redis-py: the bus reconnects with its own backoff,
    # and a publish fails at once rather than after redis-py's retries.
    client = redis.Redis.from_url(
        address.url,
        retry=Retry(NoBackoff(), 0),
        socket_connect_timeout=_CONNECT_TIMEOUT,
        socket_timeout=_REPLY_TIMEOUT,
    )
    bus = RedisBus(address=address, client=client, **settings)
    try:
        await to_thread(client.ping)
    except BaseException as exc:
        # Whatever stopped the ping (no server, a cancel, a refused
        # password), the client's connections are closed before it goes.
        with trio.CancelScope(shield=True):
            await to_thread(client.close)
        if isinstance(exc, CONNECTION_ERRORS):
            raise trio.BrokenResourceError(
                f"redis bus {bus.name!r}: cannot connect to {address.display}: {exc}"
            ) from exc
        raise
    async with trio.open_nursery() as nursery:
        nursery.start_soon(bus._outbox.run, name=f"redis bus {bus.name!r} publisher")
        try:
            yield bus
        finally:
            await bus.aclose()
