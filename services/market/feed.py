"""The feed (seed 003 rebuilt): exchange WebSocket -> bounded queue -> N processors -> bus.

Seed 003's socket client had one consumer behind a queue of 1,000 and lost
20,563 messages to it, said only in a log line. Here the queue's bound and
overflow policy are configuration (default: block, so nothing is lost at the
default rate), processing is a group of N consumers, and every message is
counted: received, malformed, missing (a jump in trade ids across a
reconnect), queued, dropped, published.

The connection is one supervised child (:meth:`Feed.connect`): it reports
ready once connected and raises :class:`FeedDisconnected` when the
connection ends, so the supervisor's backoff governs reconnects. The
processors are another child (:meth:`Feed.process`).
"""

from __future__ import annotations

import collections
import logging
import ssl
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from urllib.parse import urlsplit

import attrs
import trio
import trio_websocket

import engine
from engine.bus import Bus

from ._events import Event, MalformedMessage, Trade, decode, normalise

logger = logging.getLogger("market.feed")

STREAM_KINDS = ("trade", "aggTrade", "bookTicker", "depth", "kline_1m")

# Malformed frames kept for /status, and how often one is written to the log.
_SAMPLES_KEPT = 5
_LOG_EVERY = 100


@asynccontextmanager
async def _open_websocket(url: str) -> AsyncIterator[trio_websocket.WebSocketConnection]:
    """``trio_websocket.open_websocket_url``, but we own the TCP stream.

    trio-websocket 0.12's client never closes its socket when the server
    closes first (it waits for the server's TCP close, sees EOF, and stops
    reading; ``aclose`` then finds the close done and returns), leaking the
    socket on every server-initiated disconnect. Owning the stream lets us
    close it whatever happened.
    """
    parts = urlsplit(url)
    secure = parts.scheme == "wss"
    host = parts.hostname or "localhost"
    port = parts.port or (443 if secure else 80)
    resource = parts.path + (f"?{parts.query}" if parts.query else "")
    stream: trio.abc.Stream
    if secure:
        stream = await trio.open_ssl_over_tcp_stream(
            host, port, ssl_context=ssl.create_default_context()
        )
    else:
        stream = await trio.open_tcp_stream(host, port)
    try:
        async with trio.open_nursery() as nursery:
            ws = await trio_websocket.wrap_client_stream(nursery, stream, host, resource)
            try:
                yield ws
            finally:
                nursery.cancel_scope.cancel()
                await ws.aclose()
    finally:
        await stream.aclose()


class FeedDisconnected(Exception):
    """The exchange connection ended; the supervisor reconnects with backoff."""


def _as_tuple(value: Iterable[str]) -> tuple[str, ...]:
    return tuple(value)


def _symbols(
    instance: object, attribute: attrs.Attribute[tuple[str, ...]], value: tuple[str, ...]
) -> None:
    if not value or not all(isinstance(s, str) and s.isalnum() for s in value):
        raise ValueError(f"symbols must be non-empty alphanumeric names, got {value!r}")


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
    """

    url: str
    symbols: tuple[str, ...] = attrs.field(converter=_as_tuple, validator=_symbols)
    streams: tuple[str, ...] = attrs.field(default=STREAM_KINDS, converter=_as_tuple)
    queue_size: int = 10_000
    overflow: str = "block"
    processors: int = 4
    ping_interval: float = 20.0

    def __attrs_post_init__(self) -> None:
        if not self.url.startswith(("ws://", "wss://")):
            raise ValueError(f"url must start with ws:// or wss://, got {self.url!r}")
        if self.queue_size < 1:
            raise ValueError(f"queue_size must be >= 1, got {self.queue_size!r}")
        if self.processors < 1:
            raise ValueError(f"processors must be >= 1, got {self.processors!r}")
        if not self.ping_interval > 0:
            raise ValueError(f"ping_interval must be > 0, got {self.ping_interval!r}")

    def stream_url(self) -> str:
        """The combined-stream URL for every symbol and stream kind."""
        names = "/".join(f"{s.lower()}@{kind}" for s in self.symbols for kind in self.streams)
        return f"{self.url.rstrip('/')}/stream?streams={names}"


@attrs.frozen
class FeedStatistics:
    """The feed's counters, for /health, /status and /metrics.

    Attributes:
        connected: whether a connection is open now.
        connections: connections opened so far.
        disconnects: connections that ended.
        received: frames received.
        malformed: frames that were not a valid stream message (never fatal).
        missing_trades: trade ids skipped (a gap, typically across a reconnect).
        published: events published on the bus.
        last_message_at: ``trio.current_time()`` of the latest frame.
        malformed_samples: the latest malformed frames, shortened.
    """

    connected: bool
    connections: int
    disconnects: int
    received: int
    malformed: int
    missing_trades: int
    published: int
    last_message_at: float | None
    malformed_samples: tuple[str, ...]


class Feed:
    """The exchange feed and its processors; its state survives reconnects."""

    def __init__(self, config: FeedConfig, bus: Bus) -> None:
        self.config = config
        self._bus = bus
        self._send: engine.SendChannel[Event]
        self._receive: engine.ReceiveChannel[Event]
        self._send, self._receive = engine.open_channel(config.queue_size, overflow=config.overflow)
        self._connected = False
        self._connections = 0
        self._disconnects = 0
        self._received = 0
        self._malformed = 0
        self._missing = 0
        self._published = 0
        self._last_message_at: float | None = None
        self._samples: collections.deque[str] = collections.deque(maxlen=_SAMPLES_KEPT)
        self._last_trade: dict[str, int] = {}

    @property
    def queue(self) -> engine.SendChannel[Event]:
        """The queue's send end, whose ``statistics()`` show depth and drops."""
        return self._send

    def statistics(self) -> FeedStatistics:
        """A frozen snapshot of the feed's counters."""
        return FeedStatistics(
            connected=self._connected,
            connections=self._connections,
            disconnects=self._disconnects,
            received=self._received,
            malformed=self._malformed,
            missing_trades=self._missing,
            published=self._published,
            last_message_at=self._last_message_at,
            malformed_samples=tuple(self._samples),
        )

    async def connect(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """One connection: ready once open; raises :class:`FeedDisconnected` when it ends.

        Run it as a supervised child with ``reports_ready=True`` and a
        :class:`engine.Backoff`: each restart is a reconnect (with the same
        subscriptions, which are in the URL).
        """
        url = self.config.stream_url()
        try:
            async with _open_websocket(url) as ws, trio.open_nursery() as nursery:
                self._connected = True
                self._connections += 1
                logger.info("connected to %s (%d streams)", self.config.url, url.count("@"))
                nursery.start_soon(self._keepalive, ws)
                task_status.started()
                while True:
                    frame = await ws.get_message()
                    engine.heartbeat()
                    await self._take(frame)
        except (trio_websocket.ConnectionClosed, trio_websocket.HandshakeError, OSError) as exc:
            raise FeedDisconnected(f"feed connection to {self.config.url} ended: {exc}") from exc
        finally:
            if self._connected:
                self._disconnects += 1
            self._connected = False

    async def _keepalive(self, ws: trio_websocket.WebSocketConnection) -> None:
        interval = self.config.ping_interval
        while True:
            await trio.sleep(interval)
            with trio.move_on_after(interval) as scope:
                await ws.ping()
            if scope.cancelled_caught:
                logger.warning("no pong within %.1f s; dropping the connection", interval)
                await ws.aclose(code=1011, reason="keepalive ping unanswered")
                return

    async def _take(self, frame: str | bytes) -> None:
        self._received += 1
        self._last_message_at = trio.current_time()
        try:
            _, event = decode(frame)
        except MalformedMessage as exc:
            self._malformed += 1
            sample = (frame if isinstance(frame, str) else repr(frame))[:200]
            self._samples.append(sample)
            if self._malformed % _LOG_EVERY == 1:
                logger.warning(
                    "malformed frame #%d (%s): %r; logging one in %d",
                    self._malformed,
                    exc,
                    sample,
                    _LOG_EVERY,
                )
            return
        if isinstance(event, Trade):
            last = self._last_trade.get(event.s)
            if last is not None and event.t > last + 1:
                self._missing += event.t - last - 1
            if last is None or event.t > last:
                self._last_trade[event.s] = event.t
        await self._send.send(event)

    async def process(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """The processors: normalise each event, encode it once, publish it on the bus."""
        group = engine.Consumers(self._publish, workers=self.config.processors, name="processors")
        await group.run(self._receive.clone(), task_status=task_status)

    async def _publish(self, event: Event) -> None:
        topic, data = normalise(event)
        await self._bus.publish(topic, data)
        self._published += 1
