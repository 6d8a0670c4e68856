"""The market service: simulator (by default), feed, processors, bus and ops, supervised."""

from __future__ import annotations

import functools
import logging
import math

import attrs
import trio

import engine
from engine.bus import MemoryBus

from .broadcast import BroadcastConfig, BroadcastServer, serve_broadcast
from .feed import Feed, FeedConfig
from .simulator import SimulatorConfig, serve_simulator

logger = logging.getLogger("market")

DEFAULT_SYMBOLS = ("BTCUSDT", "ETHUSDT", "SOLUSDT", "BNBUSDT", "XRPUSDT")


@attrs.frozen
class MarketConfig:
    """Everything the service is told; built from flags and ``MARKET_*`` variables.

    Attributes:
        host: the ops/API server's address (127.0.0.1 unless told otherwise).
        port: its port; 0 picks a free one.
        ws_port: the WebSocket broadcast's port (``/ws``); 0 picks a free one.
        feed_url: the exchange's stream base URL; ``None`` runs the embedded simulator.
        symbols: the symbols to follow.
        rate: the simulator's message rate (messages/s); ignored with ``feed_url``.
        processors: consumers between the feed's queue and the bus.
        queue_size: the feed queue's bound.
        overflow: the feed queue's policy.
        grace_period: seconds in-flight work gets after SIGTERM.
    """

    host: str = "127.0.0.1"
    port: int = 8000
    ws_port: int = 8001
    feed_url: str | None = None
    symbols: tuple[str, ...] = DEFAULT_SYMBOLS
    rate: float = 1000.0
    processors: int = 4
    queue_size: int = 10_000
    overflow: str = "block"
    grace_period: float = 10.0


@attrs.frozen
class MarketService:
    """What :func:`serve_market` reports once the service is ready."""

    url: str
    ws_url: str
    feed: Feed
    supervisor: engine.Supervisor


@attrs.frozen
class ServiceInfo:
    """Where the service can be reached, listed on /status."""

    ws_url: str
    feed_url: str
    symbols: tuple[str, ...]

    def statistics(self) -> ServiceInfo:
        """Itself: a fixed fact, served as an ops source."""
        return self


async def serve_market(
    config: MarketConfig, *, task_status: trio.TaskStatus[MarketService] = trio.TASK_STATUS_IGNORED
) -> None:
    """Run the service until cancelled or asked to stop (``engine.current_shutdown()``)."""
    bus = MemoryBus()
    async with trio.open_nursery() as nursery:
        feed_url = config.feed_url
        if feed_url is None:
            simulator = await nursery.start(
                serve_simulator, SimulatorConfig(symbols=config.symbols, rate=config.rate)
            )
            feed_url = simulator.address.ws_url
        feed = Feed(
            FeedConfig(
                feed_url,
                config.symbols,
                queue_size=config.queue_size,
                overflow=config.overflow,
                processors=config.processors,
            ),
            bus,
        )
        async with engine.open_supervisor(name="market", max_restarts=20, period=60) as sup:
            await sup.start(feed.process, name="processors")
            sup.start_soon(
                feed.connect,
                name="feed",
                reports_ready=True,
                backoff=engine.Backoff(initial=0.5, maximum=30),
                stall_after=30,
            )
            broadcast: BroadcastServer = await nursery.start(
                serve_broadcast, bus, BroadcastConfig(host=config.host, port=config.ws_port)
            )
            info = ServiceInfo(ws_url=broadcast.url, feed_url=feed_url, symbols=config.symbols)
            sources: dict[str, engine.HasStatistics] = {
                "service": info,
                "feed": feed,
                "feed_queue": feed.queue,
                "bus": bus,
                "broadcast": broadcast,
            }
            serve = functools.partial(
                engine.serve_ops, sup, config.host, config.port, sources=sources
            )
            ops: engine.OpsServer = await nursery.start(serve)
            task_status.started(
                MarketService(url=ops.url, ws_url=broadcast.url, feed=feed, supervisor=sup)
            )
            await engine.current_shutdown().wait()
            logger.info("stopping: %s", engine.current_shutdown().reason)
            sup.cancel()
        nursery.cancel_scope.cancel()


def rate_from_text(text: str) -> float:
    """``"inf"`` or a positive number of messages per second."""
    rate = float(text)
    if not (rate > 0 or math.isinf(rate)):
        raise ValueError(f"rate must be > 0, got {text!r}")
    return rate
