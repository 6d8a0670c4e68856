"""The feed: exchange WebSocket -> bounded queue -> N processors -> bus.

No message is lost unseen: the queue's bound and overflow policy are
configuration (default: block, so nothing is lost at the default rate),
processing is a group of N consumers, and every message is counted:
received, malformed, missing (a jump in trade ids across a reconnect),
queued, dropped, published.

The connection is one supervised child (:meth:`Feed.connect`): it reports
ready once connected and raises :class:`FeedDisconnected` when the
connection ends (the server closed, the network failed, or a keepalive ping
went unanswered), so the supervisor's backoff governs reconnects, and each
reconnect subscribes again (the subscriptions are in the URL). The
processors are another child (:meth:`Feed.process`).

Work is done a socket read at a time, not a message at a time: the socket
client (``_wsclient.py``, on wsproto) returns every message one read
completed, they are decoded (msgspec, into typed events) and queued without
a pause, and each processor takes everything queued, normalises it and
publishes it. A trip through trio's scheduler costs more than decoding a
message, so a client that handed over one message per call, each with its
own trips through the scheduler, would be what limits the feed's rate (the
figures are in ``docs/getting-started.md``).
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import logging
from collections.abc import Iterable
from typing import Protocol, runtime_checkable

import attrs
import trio

import engine
from engine.bus import Bus
from engine.lowlevel import check_choice

from ._events import (
    ControlFrame,
    Event,
    MalformedMessage,
    Market,
    ServerShutdown,
    SubscriptionReply,
    Trade,
    decoder_for,
    market_of,
    normalise,
)
from ._wsclient import ConnectionClosed, HandshakeError, WebSocketClient, open_websocket

logger = logging.getLogger("market.feed")

STREAM_KINDS = (
    "trade",
    "aggTrade",
    "bookTicker",
    "depth",
    "kline_1m",
    "ticker",
    "miniTicker",
    "avgPrice",
)

# Malformed frames kept for /status, and how often one is written to the log.
_SAMPLES_KEPT = 5
_LOG_EVERY = 100
# Events a processor takes from the queue at once at most.
PROCESS_BATCH = 1024
# The close code sent to a server that stopped answering pings.
_PING_TIMEOUT = 1011


@runtime_checkable
class _PublishesNowait(Protocol):
    """A bus that can publish without a checkpoint (``engine.bus.MemoryBus``)."""

    def publish_nowait(self, topic: str, data: bytes) -> object: ...


class _Batches(trio.abc.ReceiveChannel[list[Event]]):
    """The feed queue, read a batch at a time, in order: what the processors iterate over.

    One processor at a time waits on the queue (the others wait for the
    lock), so a read's events are not handed out one to each waiting
    processor, to be published in whatever order the scheduler runs them:
    the one that wakes takes everything queued. With a bus that publishes
    without waiting (the memory bus) a batch is published before the next
    is taken, so events keep their order; with one that waits (Redis, NATS)
    up to ``processors`` batches are in flight at once, as configured.
    """

    def __init__(self, channel: engine.ReceiveChannel[Event]) -> None:
        self._channel = channel
        self._turn = trio.StrictFIFOLock()

    async def receive(self) -> list[Event]:
        async with self._turn:
            batch = await self._channel.receive_batch(PROCESS_BATCH)
            # A sender that found us waiting handed over its first event
            # alone; the rest of its socket read is queued by now.
            if len(batch) < PROCESS_BATCH:
                with contextlib.suppress(trio.WouldBlock, trio.EndOfChannel):
                    batch += self._channel.receive_batch_nowait(PROCESS_BATCH - len(batch))
        return batch

    def receive_nowait(self) -> list[Event]:
        """Everything queued (up to a batch) without waiting: how a stopping processor drains.

        Raises:
            trio.WouldBlock: nothing is queued.
        """
        return self._channel.receive_batch_nowait(PROCESS_BATCH)

    async def aclose(self) -> None:
        await self._channel.aclose()


class _Reading:
    """The reader's wait for the next socket read, which a stop request cuts short (private)."""

    def __init__(self) -> None:
        self._scope: trio.CancelScope | None = None
        self._stopped = False

    def wait(self) -> trio.CancelScope:
        scope = trio.CancelScope()
        if self._stopped:
            scope.cancel()
        self._scope = scope
        return scope

    async def stop_on(self, stop: engine.Shutdown) -> None:
        await stop.wait()
        self._stopped = True
        if self._scope is not None:
            self._scope.cancel()


def message_id(topic: str, data: bytes) -> str:
    """An event's de-duplication id: its topic and a digest of its bytes.

    The same event published twice (a replay after a reconnect, a restarted
    processor) gets the same id, which JetStream drops within its duplicate
    window and a Streams consumer can compare; two events differ in their
    bytes (trade ids, update ids, times), so their ids differ.
    """
    return f"{topic}:{hashlib.blake2b(data, digest_size=12).hexdigest()}"


class FeedDisconnected(Exception):
    """The exchange connection ended; the supervisor reconnects with backoff."""


def _as_tuple(value: Iterable[str]) -> tuple[str, ...]:
    return tuple(value)


def _symbols(
    instance: object, attribute: attrs.Attribute[tuple[str, ...]], value: tuple[str, ...]
) -> None:
    if not value or not all(isinstance(s, str) and s.isalnum() for s in value):
        raise ValueError(f"symbols must be non-empty alphanumeric names, got {value!r}")


def _overflow(value: str) -> engine.Overflow:
    return check_choice("overflow", value, engine.Overflow)


@attrs.frozen
class FeedConfig:
    """Where the feed connects and how it queues.

    Attributes:
        url: the exchange's stream base URL (``wss://stream.binance.com:9443``,
            or the embedded simulator's).
        symbols: the symbols to follow (``("BTCUSDT", "ETHUSDT")``).
        streams: the stream kinds per symbol.
        queue_size: the bound of the queue between the socket and the processors.
        overflow: the queue's policy: ``block`` (default), ``drop_oldest``, ``drop_newest``.
        processors: how many consumers normalise and publish.
        ping_interval: seconds between keepalive pings; a ping unanswered for
            as long ends the connection.
        max_symbols: symbols whose latest trade id is kept, to count gaps:
            the exchange, not this configuration, decides which symbols
            arrive, so past this bound the least recently traded one is
            forgotten (its next trade starts its count afresh) and counted
            in ``symbols_evicted``.
        renew_after: seconds after which a connection is replaced by a new
            one, before the exchange's own limit (Binance ends a connection
            at 24 hours); ``math.inf`` never.
    """

    url: str
    symbols: tuple[str, ...] = attrs.field(converter=_as_tuple, validator=_symbols)
    streams: tuple[str, ...] = attrs.field(default=STREAM_KINDS, converter=_as_tuple)
    queue_size: int = 10_000
    overflow: engine.Overflow = attrs.field(default=engine.Overflow.BLOCK, converter=_overflow)
    processors: int = 4
    ping_interval: float = 20.0
    max_symbols: int = 4096
    renew_after: float = 23 * 3600.0

    def __attrs_post_init__(self) -> None:
        if not self.url.startswith(("ws://", "wss://")):
            raise ValueError(f"url must start with ws:// or wss://, got {self.url!r}")
        if self.queue_size < 1:
            raise ValueError(f"queue_size must be >= 1, got {self.queue_size!r}")
        if self.processors < 1:
            raise ValueError(f"processors must be >= 1, got {self.processors!r}")
        if not self.ping_interval > 0:
            raise ValueError(f"ping_interval must be > 0, got {self.ping_interval!r}")
        if isinstance(self.max_symbols, bool) or not isinstance(self.max_symbols, int):
            raise TypeError(f"max_symbols must be an int, got {self.max_symbols!r}")
        if self.max_symbols < 1:
            raise ValueError(f"max_symbols must be >= 1, got {self.max_symbols!r}")
        if not self.renew_after > 0:
            raise ValueError(f"renew_after must be > 0, got {self.renew_after!r}")
        market_of(self.url)  # refuses a market whose messages no decoder reads

    @property
    def market(self) -> Market:
        """The market the URL serves, which decides the messages' shapes."""
        return market_of(self.url)

    def stream_url(self) -> str:
        """The combined-stream URL for every symbol and stream kind."""
        names = "/".join(f"{s.lower()}@{kind}" for s in self.symbols for kind in self.streams)
        return f"{self.url.rstrip('/')}/stream?streams={names}"


# Keyword-only, so that given fields (no default) may follow counted ones.
@attrs.frozen(kw_only=True)
class FeedStatistics:
    """The feed's counters, for /health, /status and /metrics.

    Attributes:
        connected: whether a connection is open now.
        connections: connections opened so far.
        disconnects: connections that ended.
        received: frames received.
        malformed: frames that were not a valid stream message, with a
            symbol that is not a topic token or a number that is not one
            (never fatal: the rest of their read and batch go on).
        missing_trades: trade ids skipped (a gap, typically across a reconnect).
        published: events published on the bus.
        last_message_at: ``trio.current_time()`` of the latest frame.
        control: frames about the connection, not market data: replies
            to requests and the exchange's shutdown notices.
        renewals: connections replaced by a new one, on a shutdown notice
            or once ``renew_after`` passed.
        malformed_samples: the latest malformed frames, shortened.
        symbols: symbols whose latest trade id is kept now (at most
            ``max_symbols``).
        symbols_evicted: symbols forgotten to keep within ``max_symbols``.
    """

    connected: bool = False
    connections: int = 0
    disconnects: int = 0
    received: int = attrs.field(
        default=0, metadata=engine.counter_metric("Frames read from the exchange")
    )
    malformed: int = attrs.field(
        default=0,
        metadata=engine.counter_metric("Frames or events that were not a valid stream message"),
    )
    missing_trades: int = attrs.field(
        default=0, metadata=engine.counter_metric("Trade ids skipped: gaps in a symbol's trades")
    )
    published: int = attrs.field(
        default=0, metadata=engine.counter_metric("Events published on the bus")
    )
    last_message_at: float | None = attrs.field(
        default=None,
        metadata=engine.gauge_metric(
            "The process's monotonic clock (trio.current_time) at the latest frame, in seconds",
            name="last_message_monotonic_seconds",
        ),
    )
    control: int = attrs.field(
        default=0,
        metadata=engine.counter_metric(
            "Frames about the connection, not market data: replies and shutdown notices"
        ),
    )
    renewals: int = attrs.field(
        default=0,
        metadata=engine.counter_metric(
            "Connections replaced on a shutdown notice or at renew_after"
        ),
    )
    malformed_samples: tuple[str, ...]
    symbols: int = attrs.field(
        metadata=engine.gauge_metric("Symbols whose latest trade id is kept")
    )
    symbols_evicted: int = attrs.field(
        default=0, metadata=engine.counter_metric("Symbols forgotten to keep within max_symbols")
    )


class _Counters(engine.Tally[FeedStatistics]):
    """The counters behind :meth:`Feed.statistics`; they survive reconnects."""


class Feed:
    """The exchange feed and its processors; its state survives reconnects."""

    def __init__(self, config: FeedConfig, bus: Bus) -> None:
        self.config = config
        self._bus = bus
        self._send: engine.SendChannel[Event]
        self._receive: engine.ReceiveChannel[Event]
        self._send, self._receive = engine.open_channel(config.queue_size, overflow=config.overflow)
        self._counters = _Counters()
        self._decode = decoder_for(config.market)
        # Set by a shutdown notice: the connection is replaced after this read.
        self._renew = False
        self._samples: collections.deque[str] = collections.deque(maxlen=_SAMPLES_KEPT)
        # Least recently traded first, so the one to forget is at the front.
        self._last_trade: collections.OrderedDict[str, int] = collections.OrderedDict()
        # A bus that can publish without a checkpoint saves one scheduler
        # trip per event; awaiting is then only for a full "block" subscriber.
        self._publish_nowait = bus.publish_nowait if isinstance(bus, _PublishesNowait) else None
        # On a bus that delivers at least once (Redis Streams, JetStream) each
        # event carries an id made from its content, so a replay is one message.
        self._at_least_once = bool(getattr(bus, "at_least_once", False))

    @property
    def queue(self) -> engine.SendChannel[Event]:
        """The queue's send end, whose ``statistics()`` show depth and drops."""
        return self._send

    def in_flight(self) -> int:
        """Frames received but not yet published, counted malformed, or dropped by the queue.

        What stopping now would lose: zero once the processors have drained.
        """
        counters = self._counters
        dropped = self._send.statistics().dropped
        done = counters.published + counters.malformed + counters.control
        return int(counters.received - done - dropped)

    def statistics(self) -> FeedStatistics:
        """A frozen snapshot of the feed's counters."""
        return self._counters.snapshot(
            malformed_samples=tuple(self._samples), symbols=len(self._last_trade)
        )

    async def connect(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """One connection: ready once open; raises :class:`FeedDisconnected` when it ends.

        Run it as a supervised child with ``reports_ready=True`` and a
        :class:`engine.Backoff`: each restart is a reconnect (with the same
        subscriptions, which are in the URL). It beats :func:`engine.heartbeat`
        once per socket read.
        """
        url = self.config.stream_url()
        counters = self._counters
        ready = task_status
        try:
            while True:
                async with open_websocket(url) as ws:
                    counters.connected = True
                    counters.connections += 1
                    logger.info("connected to %s (%d streams)", self.config.url, url.count("@"))
                    ready.started()
                    ready = trio.TASK_STATUS_IGNORED
                    renew = await self._run(ws)
                counters.disconnects += 1
                counters.connected = False
                if not renew:
                    return
                counters.renewals += 1
        except (ConnectionClosed, HandshakeError, OSError) as exc:
            raise FeedDisconnected(f"feed connection to {self.config.url} ended: {exc}") from exc
        finally:
            if counters.connected:
                counters.disconnects += 1
            counters.connected = False

    async def _run(self, ws: WebSocketClient) -> bool:
        """Read until the connection ends, with the keepalive beside; raise why it ended.

        Asked to stop (``engine.current_stop()``), it stops reading, but
        first queues every frame of the read in hand, and returns false.
        Once the connection is due for renewal (a shutdown notice, or
        ``renew_after``) it returns true, after the read in hand.
        """
        # The reader's error is raised after the nursery, not through it,
        # so that it arrives as itself rather than in an exception group.
        ended: ConnectionClosed | None = None
        renew = self._renew = False
        stop = engine.current_stop()
        reading = _Reading()
        renew_at = trio.current_time() + self.config.renew_after
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._keepalive, ws)
            nursery.start_soon(reading.stop_on, stop)
            try:
                while not stop.requested:
                    with reading.wait() as wait:
                        wait.deadline = renew_at
                        frames = await ws.receive_messages()
                    if wait.cancelled_caught:
                        # Asked to stop, or due for renewal: nothing was taken.
                        renew = not stop.requested
                        break
                    engine.heartbeat()
                    await self._ingest(frames)
                    if self._renew:
                        renew = True
                        break
            except ConnectionClosed as exc:
                ended = exc
            nursery.cancel_scope.cancel()
        if ended is not None:
            raise ended
        if renew:
            logger.info("renewing the connection to %s", self.config.url)
        else:
            logger.info("stopped reading the feed (%s)", stop.reason)
        return renew

    async def _keepalive(self, ws: WebSocketClient) -> None:
        # The pong is read by the reader, so a reader blocked on a full queue
        # (processors stuck for a whole interval) also ends the connection.
        interval = self.config.ping_interval
        while True:
            await trio.sleep(interval)
            with trio.move_on_after(interval) as scope:
                try:
                    await ws.ping()
                except ConnectionClosed:
                    return  # the reader has seen it too
            if scope.cancelled_caught:
                logger.warning("no pong within %.1f s; dropping the connection", interval)
                await ws.abort(_PING_TIMEOUT, "keepalive ping unanswered")
                return

    async def _ingest(self, frames: list[str | bytes]) -> None:
        """Decode one read's frames and queue the events, waiting only when the queue is full."""
        counters = self._counters
        counters.received += len(frames)
        counters.last_message_at = trio.current_time()
        send, decode = self._send, self._decode
        for frame in frames:
            try:
                _, event = decode(frame)
            except ControlFrame as control:
                self._on_control(control)
                continue
            except MalformedMessage as exc:
                self._count_malformed(frame, exc)
                continue
            if isinstance(event, Trade):
                self._note_trade(event)
            try:
                send.send_nowait(event)  # the drop_* policies never raise here
            except trio.WouldBlock:
                await send.send(event)

    def _note_trade(self, trade: Trade) -> None:
        """Count the trade ids skipped since the symbol's latest, and remember this one."""
        last_trade = self._last_trade
        symbol, trade_id = trade.s, trade.t
        last = last_trade.get(symbol)
        if last is None:
            last_trade[symbol] = trade_id
            if len(last_trade) > self.config.max_symbols:
                last_trade.popitem(last=False)
                self._counters.symbols_evicted += 1
            return
        if trade_id > last + 1:
            self._counters.missing_trades += trade_id - last - 1
        if trade_id > last:
            last_trade[symbol] = trade_id
        last_trade.move_to_end(symbol)

    def _on_control(self, control: ControlFrame) -> None:
        """Count a frame about the connection; a shutdown notice renews it after this read."""
        self._counters.control += 1
        if isinstance(control, ServerShutdown):
            logger.warning("%s: replacing the connection", control)
            self._renew = True
        elif isinstance(control, SubscriptionReply) and control.error is not None:
            logger.warning("the exchange refused a request: %s", control)

    def _count_malformed(self, frame: object, exc: Exception) -> None:
        counters = self._counters
        counters.malformed += 1
        # Shortened before it is turned into text: a frame may be megabytes long.
        if isinstance(frame, str | bytes):
            frame = frame[:200]
        sample = (frame if isinstance(frame, str) else repr(frame))[:200]
        self._samples.append(sample)
        if counters.malformed % _LOG_EVERY == 1:
            logger.warning(
                "malformed frame #%d (%s): %r; logging one in %d",
                counters.malformed,
                exc,
                sample,
                _LOG_EVERY,
            )

    async def process(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """The processors: normalise each event, encode it once, publish it on the bus.

        Each of the ``processors`` workers takes everything queued (up to
        :data:`PROCESS_BATCH` events) at once; the group's statistics count
        those batches.
        """
        group = engine.Consumers(self._publish, workers=self.config.processors, name="processors")
        await group.run(_Batches(self._receive.clone()), task_status=task_status)

    async def _publish(self, events: list[Event]) -> None:
        bus, nowait, counters = self._bus, self._publish_nowait, self._counters
        for event in events:
            try:
                topic, data = normalise(event)
                if self._at_least_once:
                    await bus.publish(topic, data, msg_id=message_id(topic, data))
                elif nowait is None:
                    await bus.publish(topic, data)
                else:
                    try:
                        nowait(topic, data)
                    except trio.WouldBlock:  # a subscriber with the block policy is full
                        await bus.publish(topic, data)
            except ValueError as exc:
                # A number that is not one, or a topic the bus refuses (decode
                # admits only symbols that make plain topic tokens; a bus with
                # stricter rules may still refuse one): this event only.
                self._count_malformed(event, exc)
                continue
            counters.published += 1
