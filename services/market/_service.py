"""The market service: simulator (by default), feed, processors, bus and ops, supervised."""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import socket
import tempfile
import urllib.parse
from collections.abc import AsyncIterator

import attrs
import trio

import engine
from engine.broadcast import BroadcastConfig, BroadcastServer, serve_broadcast
from engine.bus import Bus
from engine.bus import connect as connect_bus

from ._candle_source import SIMULATOR_WEIGHT_LIMIT
from ._dask import DaskCluster, check_address, open_dask_cluster
from ._events import KINDS
from ._settings import DEFAULT_SYMBOLS as DEFAULT_SYMBOLS
from ._settings import DEFAULTS, PORT, SECONDS
from .api import build_api
from .candles import FetcherConfig, SqliteCandleStore, open_candle_fetcher
from .cycles import Watchlist, WatchlistConfig, WhaleFlowConfig, WhaleFlows
from .feed import Feed, FeedConfig
from .orders import ORDER_KIND, OrderLog, OrderLogConfig
from .scans import ScanConfig, Scans
from .simulator import Simulator, SimulatorConfig, serve_simulator
from .store import open_failure_history

logger = logging.getLogger("market")

BINANCE_REST = "https://api.binance.com"
# The simulator's trades are worth up to about 1,600 in quote currency; this
# makes a few percent of them whales, so the whale flow has something to show.
SIMULATED_WHALE_USD = 1_500.0
# Seconds the feed gets to stop reading (its close handshake is bounded by
# the socket client), and the processors to publish what is queued.
FEED_SHUTDOWN = 3.0
ROLES = ("all", "broadcast")
PROCESSORS_SHUTDOWN = 5.0


@attrs.frozen
class MarketConfig:
    """Everything the service is told; built from flags and ``MARKET_*`` variables.

    Each field is a setting of ``python -m services.market``, and its default
    is the command's (``services/market/_settings.py`` declares them). Every
    value is checked when it is built, by the parts that will use it:
    a bad one raises ``ValueError`` here, not when :func:`serve_market` starts.

    Attributes:
        host: the ops/API server's address (127.0.0.1 unless told otherwise):
            /health, /ready, /metrics, /status and ``/api``.
        port: its port; 0 picks a free one.
        ws_host: the WebSocket broadcast's address, separate from ``host``
            so that publishing the stream never exposes the ops endpoints.
        ws_port: the WebSocket broadcast's port (``/ws``); 0 picks a free one.
        feed_url: the exchange's stream base URL; ``None`` runs the embedded simulator.
        bus: the bus between the processors and the broadcast, as a URL
            for :func:`engine.bus.connect`: ``memory://`` (the default),
            ``redis://…`` or ``nats://…``.
        role: ``all`` (the default): the whole service; ``broadcast``: only
            the WebSocket broadcast and the ops server, relaying what the
            ``all`` instance publishes on a shared bus (:func:`serve_relay`).
        symbols: the symbols to follow.
        rate: the simulator's message rate (messages/s); ignored with ``feed_url``.
        processors: consumers between the feed's queue and the bus.
        queue_size: the feed queue's bound.
        overflow: the feed queue's policy.
        grace_period: seconds in-flight work gets after SIGTERM.
        order_log: a Hyperliquid node's order-status log to follow; ``None``:
            the embedded simulator writes one (in a temporary directory)
            unless ``feed_url`` names an exchange, then there is none.
        order_log_publish: ``"batch"`` (a JSON array per coin per parsed
            chunk, the fast path) or ``"order"`` (a bus message per order).
        rest_url: the exchange's REST base for the watchlist's quotes;
            ``None``: the embedded simulator's, or ``https://api.binance.com``
            with ``feed_url``.
        watchlist_interval: seconds between watchlist refreshes.
        whale_threshold: the notional (price x quantity, in quote currency)
            of a whale trade; ``None``: 100,000, or 1,500 on the simulator,
            whose trades are small.
        dask: a Dask scheduler's address (``tcp://host:8786``): scans run
            on that cluster, through :class:`engine.DaskRunner`, instead of
            in local worker processes; ``None``: local processes.
        history: the SQLite file that keeps the watchlist's failures and
            circuit changes (``/api/history/failures``) across restarts;
            ``:memory:`` (the default) keeps them for this run only.
        candles: the SQLite file that keeps the candles scans fetch from the
            exchange's REST klines (one file per exchange); ``None`` (the
            default): a temporary file, for this run only.
        scan_symbols: the simulated universe that scans cover.
        scan_workers: the scans' worker processes; ``None``: one per CPU.
        token: if set, WebSocket clients must present it (``Authorization:
            Bearer`` or ``?token=``), and so must ``POST`` and ``DELETE``
            requests to ``/api``.
        allowed_origins: if set, a WebSocket request whose ``Origin`` is not
            one of these is refused (403).
        max_clients: WebSocket clients at most; more are answered 503.
        max_clients_per_ip: connections from one address at most, open or
            still in the upgrade (more get 503 at once); ``None``: no limit
            below ``max_clients``.
        client_max_lag: seconds the oldest message not yet written to a
            WebSocket client may wait before the client is closed as too
            slow (4000).
    """

    host: str = DEFAULTS["host"]
    port: int = attrs.field(default=DEFAULTS["port"], validator=PORT.validate)
    ws_host: str = DEFAULTS["ws_host"]
    ws_port: int = attrs.field(default=DEFAULTS["ws_port"], validator=PORT.validate)
    feed_url: str | None = DEFAULTS["feed_url"]
    bus: str = attrs.field(default=DEFAULTS["bus"], repr=False)  # its URL may hold a password
    role: str = attrs.field(default=DEFAULTS["role"])
    symbols: tuple[str, ...] = DEFAULTS["symbols"]
    rate: float = DEFAULTS["rate"]
    processors: int = DEFAULTS["processors"]
    queue_size: int = DEFAULTS["queue_size"]
    overflow: str = DEFAULTS["overflow"]
    grace_period: float = attrs.field(default=DEFAULTS["grace_period"], validator=SECONDS.validate)
    order_log: str | None = DEFAULTS["order_log"]
    order_log_publish: str = DEFAULTS["order_log_publish"]
    rest_url: str | None = DEFAULTS["rest_url"]
    watchlist_interval: float = DEFAULTS["watchlist_interval"]
    whale_threshold: float | None = DEFAULTS["whale_threshold"]
    dask: str | None = DEFAULTS["dask"]
    history: str = DEFAULTS["history"]
    candles: str | None = DEFAULTS["candles"]
    scan_symbols: int = DEFAULTS["scan_symbols"]
    scan_workers: int | None = DEFAULTS["scan_workers"]
    token: str | None = attrs.field(default=DEFAULTS["token"], repr=False)
    allowed_origins: tuple[str, ...] | None = DEFAULTS["allowed_origins"]
    max_clients: int = DEFAULTS["max_clients"]
    max_clients_per_ip: int | None = DEFAULTS["max_clients_per_ip"]
    client_max_lag: float = DEFAULTS["client_max_lag"]

    def __attrs_post_init__(self) -> None:
        # Every part checks its own settings: building them all now refuses a
        # bad value here, before anything starts, with the part's message.
        connect_bus(_bus_url(self.bus, self.role))  # checks it; connects only when entered
        if self.dask is not None:
            check_address(self.dask)
        if self.role not in ROLES:
            raise ValueError(f"role must be one of {', '.join(ROLES)}, got {self.role!r}")
        if self.role == "broadcast" and self.bus.startswith("memory:"):
            raise ValueError(
                "role 'broadcast' relays from a shared bus: give --bus redis://… or nats://…"
            )
        _plan(
            self,
            feed_url=self.feed_url or "ws://127.0.0.1:9",
            rest_url=self.rest_url or "http://127.0.0.1:9",
            order_log="node_order_statuses" if self.order_log is None else self.order_log,
            simulated=self.feed_url is None,
        )


@attrs.frozen
class _Plan:
    """The settings of every part, derived from a :class:`MarketConfig` (private)."""

    simulator: SimulatorConfig | None
    feed: FeedConfig
    whales: WhaleFlowConfig
    watchlist: WatchlistConfig
    scans: ScanConfig
    orders: OrderLogConfig | None
    broadcast: BroadcastConfig


def _plan(
    config: MarketConfig,
    *,
    feed_url: str,
    rest_url: str,
    order_log: str | None,
    simulated: bool,
) -> _Plan:
    """Each part's settings; each part's config checks its own values."""
    whales = WhaleFlowConfig(
        threshold_usd=config.whale_threshold
        or (SIMULATED_WHALE_USD if simulated else WhaleFlowConfig().threshold_usd)
    )
    return _Plan(
        simulator=SimulatorConfig(symbols=config.symbols, rate=config.rate) if simulated else None,
        feed=FeedConfig(
            feed_url,
            config.symbols,
            queue_size=config.queue_size,
            overflow=config.overflow,
            processors=config.processors,
        ),
        whales=whales,
        watchlist=WatchlistConfig(rest_url, config.symbols, interval=config.watchlist_interval),
        scans=ScanConfig(symbols=config.scan_symbols, workers=config.scan_workers),
        orders=(
            None
            if order_log is None
            else OrderLogConfig(order_log, publish=config.order_log_publish)
        ),
        broadcast=BroadcastConfig(
            # A topic of any other kind would never carry a message: refused.
            known_kinds=(*KINDS, whales.publish_prefix, ORDER_KIND),
            # One subscription per kind, not ">": a JetStream stream holds only
            # the subjects it was made with.
            bus_topics=tuple(f"{kind}.>" for kind in (*KINDS, whales.publish_prefix, ORDER_KIND)),
            host=config.ws_host,
            port=config.ws_port,
            token=config.token,
            allowed_origins=config.allowed_origins,
            max_clients=config.max_clients,
            max_clients_per_ip=config.max_clients_per_ip,
            max_lag=config.client_max_lag,
        ),
    )


@attrs.frozen
class MarketService:
    """What :func:`serve_market` reports once it listens (the feed may still be connecting).

    Attributes:
        url: the ops/API server, ``http://host:port``.
        ws_url: the WebSocket broadcast, ``ws://host:port/ws``.
        feed: the exchange feed, whose ``statistics()`` count what it received.
        supervisor: the supervisor of the feed and its processors.
        bus: the bus between the processors and the broadcast.
        broadcast: the WebSocket broadcast server.
        simulator: the embedded exchange simulator, with its fault switches
            (``drop_connections``, ``send_malformed``, ``stall``); ``None``
            when ``feed_url`` names an exchange.
        orders: the order log being followed, if any (``recent()`` for
            ``/api/orders``).
        watchlist: the watchlist cycle (quotes over REST).
        whales: the whale-flow detector on the trade stream.
        scans: the scans of the simulated universe.
    """

    url: str
    ws_url: str
    feed: Feed
    supervisor: engine.Supervisor
    bus: Bus
    broadcast: BroadcastServer
    simulator: Simulator | None = None
    orders: OrderLog | None = None
    watchlist: Watchlist | None = None
    whales: WhaleFlows | None = None
    scans: Scans | None = None


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
    if config.order_log is not None or config.feed_url is not None:
        await _serve_market(config, config.order_log, None, task_status)
        return
    # The embedded simulator writes the order log, in a directory of its own.
    with tempfile.TemporaryDirectory(prefix="market-orders-") as scratch:
        path = os.path.join(scratch, "node_order_statuses")
        await _serve_market(config, path, path, task_status)


async def _serve_market(
    config: MarketConfig,
    order_log: str | None,
    simulated_log: str | None,
    task_status: trio.TaskStatus[MarketService],
) -> None:
    async with (
        connect_bus(_bus_url(config.bus)) as bus,
        contextlib.AsyncExitStack() as stack,
        trio.open_nursery() as nursery,
    ):
        feed_url = config.feed_url
        simulator: Simulator | None = None
        if feed_url is None:
            simulator = await nursery.start(
                serve_simulator,
                SimulatorConfig(
                    symbols=config.symbols,
                    rate=config.rate,
                    order_log=simulated_log,
                    universe=config.scan_symbols,
                    weight_limit=SIMULATOR_WEIGHT_LIMIT,
                ),
            )
            feed_url = simulator.address.ws_url
        rest_url = config.rest_url or (
            simulator.address.rest_url if simulator is not None else BINANCE_REST
        )
        plan = _plan(
            config,
            feed_url=feed_url,
            rest_url=rest_url,
            order_log=order_log,
            simulated=simulator is not None,
        )
        feed = Feed(plan.feed, bus)
        whales = WhaleFlows(plan.whales, bus)
        if config.history != ":memory:":
            await trio.Path(config.history).parent.mkdir(parents=True, exist_ok=True)
        history = await stack.enter_async_context(open_failure_history(config.history))
        watchlist = Watchlist(plan.watchlist, recorder=history)
        store = await stack.enter_async_context(_candle_store(config.candles))
        # The embedded simulator is the service's own: it allows far more
        # than Binance's 6,000 a minute, of which the fetcher leaves most to
        # the watchlist.
        budget = SIMULATOR_WEIGHT_LIMIT if simulator is not None else FetcherConfig().weight_budget
        fetcher = await stack.enter_async_context(
            open_candle_fetcher(store, rest_url, FetcherConfig(weight_budget=budget))
        )
        fill = functools.partial(fetcher.fill_each, concurrency=8)
        cluster: DaskCluster | None = None
        if config.dask is None:
            scans = Scans(plan.scans, store, fill=fill)
        else:
            cluster = await stack.enter_async_context(open_dask_cluster(config.dask))
            # A call in flight per worker thread: a scan's deadlines count
            # from submission, so more would only queue on the cluster.
            on_cluster = attrs.evolve(plan.scans, workers=cluster.threads)
            scans = Scans(on_cluster, store, fill=fill, bridge=cluster.runner)
        async with engine.open_supervisor(name="market", max_restarts=20, period=60) as sup:
            # Whale flows first, so they see the feed's first trade.
            await sup.start(whales.run, name="whale_flows")
            # Stopped after the feed (children stop last started first): they
            # publish everything queued, then return; what they could not is
            # counted (feed.in_flight) and logged.
            await sup.start(
                feed.process, name="processors", shutdown=PROCESSORS_SHUTDOWN, holds=feed.in_flight
            )
            # Children that wait on something outside (a socket, a file): ready
            # once connected, retried with backoff, cancelled if they go quiet.
            outside = functools.partial(
                sup.start_soon,
                reports_ready=True,
                backoff=engine.Backoff(initial=0.5, maximum=30),
                stall_after=30,
            )
            outside(feed.connect, name="feed", shutdown=FEED_SHUTDOWN)
            orders: OrderLog | None = None
            if plan.orders is not None:
                orders = OrderLog(plan.orders, bus)
                outside(orders.follow, name="orders")
            # Before the watchlist, so that it stops after it and writes its last rows.
            await sup.start(history.run, name="history")
            await sup.start(
                watchlist.run, name="watchlist", stall_after=watchlist.config.stall_after
            )
            await sup.start(scans.run, name="scans")
            if cluster is not None:
                await sup.start(cluster.watch, name="dask", stall_after=60)
            broadcast: BroadcastServer = await nursery.start(serve_broadcast, bus, plan.broadcast)
            info = ServiceInfo(ws_url=broadcast.url, feed_url=feed_url, symbols=config.symbols)
            sources: dict[str, engine.HasStatistics] = {
                "service": info,
                "feed": feed,
                "feed_queue": feed.queue,
                "bus": bus,
                "broadcast": broadcast,
            }
            if simulator is not None:  # its fault counters explain the feed's
                sources["simulator"] = simulator
            if orders is not None:
                sources["orders"] = orders
            sources |= {
                "watchlist": watchlist,
                "whale_flows": whales,
                "scans": scans,
                "candles": fetcher,
                "history": history,
            }
            if cluster is not None:
                sources["dask"] = cluster
            api = build_api(
                scans=scans,
                watchlist=watchlist,
                whales=whales,
                orders=orders,
                history=history,
                token=config.token,
            )
            serve = functools.partial(
                engine.serve_ops,
                sup,
                config.host,
                config.port,
                sources=sources,
                routes={"/api": api},
            )
            ops: engine.OpsServer = await nursery.start(serve)
            task_status.started(
                MarketService(
                    url=ops.url,
                    ws_url=broadcast.url,
                    feed=feed,
                    supervisor=sup,
                    bus=bus,
                    broadcast=broadcast,
                    simulator=simulator,
                    orders=orders,
                    watchlist=watchlist,
                    whales=whales,
                    scans=scans,
                )
            )
            stop = engine.current_shutdown()
            await stop.wait()
            logger.info("stopping: %s", stop.reason)
            # The feed stops reading, the processors drain the queue to the
            # bus, then the rest stop; the grace period bounds it all.
            await sup.shutdown(stop.reason or "stopping")
        # Clients get what the bus still held and what was queued for them,
        # then "going away" (1001), as long as the grace period lasts; a
        # forced stop (a cancel) drops them at once.
        broadcast.close()
        try:
            await broadcast.wait_closed()
        except BaseException:
            broadcast.abort()
            raise
        logger.info("market stopped: %s", json.dumps(_final_counts(feed)))
        nursery.cancel_scope.cancel()


@attrs.frozen
class RelayService:
    """What :func:`serve_relay` reports once it listens.

    Attributes:
        url: the ops server, ``http://host:port`` (/health, /ready, /metrics, /status).
        ws_url: the WebSocket broadcast, ``ws://host:port/ws``.
        bus: the shared bus it relays from.
        broadcast: the WebSocket broadcast server.
    """

    url: str
    ws_url: str
    bus: Bus
    broadcast: BroadcastServer


async def serve_relay(
    config: MarketConfig, *, task_status: trio.TaskStatus[RelayService] = trio.TASK_STATUS_IGNORED
) -> None:
    """The ``broadcast`` role: relay a shared bus to WebSocket clients, with the ops server.

    Any number of relays may serve the messages one ``all`` instance
    publishes. Stops like the service: on a stop request the broadcast
    hands on what the bus held, then closes each client with 1001.
    """
    plan = _plan(
        config,
        feed_url="ws://127.0.0.1:9",
        rest_url="http://127.0.0.1:9",
        order_log=None,
        simulated=False,
    )
    async with (
        connect_bus(_bus_url(config.bus, config.role)) as bus,
        trio.open_nursery() as nursery,
    ):
        async with engine.open_supervisor(name="relay") as sup:
            broadcast = await sup.start(
                serve_broadcast, bus, plan.broadcast, name="broadcast", shutdown=10
            )
            assert isinstance(broadcast, BroadcastServer)
            sources: dict[str, engine.HasStatistics] = {"bus": bus, "broadcast": broadcast}
            serve = functools.partial(
                engine.serve_ops, sup, config.host, config.port, sources=sources
            )
            ops: engine.OpsServer = await nursery.start(serve)
            task_status.started(RelayService(ops.url, broadcast.url, bus, broadcast))
            stop = engine.current_shutdown()
            await stop.wait()
            await sup.shutdown(stop.reason or "stopping")
        nursery.cancel_scope.cancel()


def _bus_url(url: str, role: str = "all") -> str:
    """The bus URL an instance of ``role`` connects with, from the one it was given.

    - A JetStream stream stores the subjects it is created with; unless the
      URL lists them (``subjects=``), they are the first tokens the service
      publishes under: every kind of market event, whales and orders.
    - A ``broadcast`` relay must get every message, not share them with
      the other relays: on JetStream it reads the stream's subjects as core
      NATS (every subscriber gets each message); on Redis Streams it takes a
      consumer group of its own, unless the URL names one.
    """
    parts = urllib.parse.urlsplit(url)
    given = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
    query = list(given)
    names = {key for key, _ in query}
    if parts.scheme in ("nats", "tls") and "stream" in names:
        if role == "broadcast":
            query = [(k, v) for k, v in query if k not in ("stream", "subjects", "ack_wait")]
        elif "subjects" not in names:
            kinds = (*KINDS, WhaleFlowConfig().publish_prefix, ORDER_KIND)
            query.append(("subjects", ",".join(f"{kind}.>" for kind in kinds)))
    elif (
        parts.scheme in ("redis", "rediss")
        and ("mode", "streams") in query
        and role == "broadcast"
        and "group" not in names
    ):
        query.append(("group", f"relay-{socket.gethostname()}-{os.getpid()}"))
    if query == given:
        return url
    text = urllib.parse.urlencode(query, safe=",>.:*")
    return urllib.parse.urlunsplit(parts._replace(query=text))


def _final_counts(feed: Feed) -> dict[str, int]:
    """The feed's account at exit: ``received`` is the sum of the other four."""
    stats = feed.statistics()
    return {
        "received": stats.received,
        "published": stats.published,
        "malformed": stats.malformed,
        "dropped": feed.queue.statistics().dropped,
        "left_in_queue": feed.in_flight(),
    }


@contextlib.asynccontextmanager
async def _candle_store(path: str | None) -> AsyncIterator[SqliteCandleStore]:
    """The scans' candle store: ``path``, or a temporary file for this run."""
    with contextlib.ExitStack() as stack:
        if path is None:
            scratch = stack.enter_context(tempfile.TemporaryDirectory(prefix="market-candles-"))
            path = os.path.join(scratch, "candles.sqlite")
        else:
            await trio.Path(path).parent.mkdir(parents=True, exist_ok=True)
        store = SqliteCandleStore(path)
        try:
            yield store
        finally:
            await store.aclose()
