"""The ops server: /health, /ready, /metrics and /status on hypercorn's HTTP connections.

A small ASGI app (``_opsapp.py``) answers the four endpoints and hands every
other path to the ASGI apps a service mounts. The listening
socket is bound here, not by hypercorn, for two reasons: the bound port is
known at once (port 0 works), and the loop watch thread can answer that same
socket while the event loop is stalled (see ``_ops_stalled.py``).

The accept loop is ours too, so that it can bound the connections open at
once: each accepted connection is handed to hypercorn's per-connection server
(``TCPServer``, what ``hypercorn.trio.run.worker_serve`` runs for each) only
while fewer than ``max_connections`` are open; the excess is answered 503
here. ``worker_serve`` builds its listeners from sockets and offers no place
to count connections; counting requests in the ASGI app would miss the
connections that hold no request (idle, or still sending their headers).
"""

from __future__ import annotations

import functools
import logging
import math
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, cast

import attrs
import trio
from hypercorn.config import Config
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import ConnectionState
from hypercorn.utils import wrap_app
from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from ._loopwatch import LoopStall, LoopWatch, open_loop_watch
from ._metrics import EngineCollector, Families, HasStatistics
from ._metrics import build as build_families
from ._observer import Observer, snapshot
from ._observer_app import ObserverApp
from ._ops_stalled import StallAnswerer
from ._opsapp import ENDPOINTS, ASGIApp, OpsApp
from ._probes import loop_stalled, verdict_body
from ._refusal import refuse
from ._validation import check_count, check_duration, check_finite_duration, check_name

if TYPE_CHECKING:
    from hypercorn.typing import ASGIFramework

logger = logging.getLogger("engine.ops")

_BACKLOG = 128

# What a connection past max_connections is told before it is closed.
_BUSY_BODY = b'{"error": "too many connections; retry later"}'
_BUSY = (
    b"HTTP/1.1 503 Service Unavailable\r\n"
    b"content-type: application/json\r\n"
    b"content-length: " + str(len(_BUSY_BODY)).encode() + b"\r\n"
    b"retry-after: 1\r\n"
    b"cache-control: no-store\r\n"
    b"connection: close\r\n\r\n" + _BUSY_BODY
)
# Refusals in progress at once; past that, an excess connection is closed unanswered.
_MAX_REFUSING = 64


@attrs.frozen
class OpsServer:
    """What ``await nursery.start(engine.serve_ops, ...)`` returns.

    Attributes:
        host: the address the server is bound to.
        port: the bound port (the real one when 0 was asked for).
        registry: the server's Prometheus registry; register a service's own
            metrics here to have them on /metrics.
        loop_watch: the loop-stall detector, or ``None`` when turned off.
    """

    host: str
    port: int
    registry: CollectorRegistry
    loop_watch: LoopWatch | None

    @property
    def url(self) -> str:
        """``http://host:port``, ready for an HTTP client."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"


async def serve_ops(
    supervisor: HasStatistics | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    sources: Mapping[str, HasStatistics] | None = None,
    routes: Mapping[str, ASGIApp] | None = None,
    registry: CollectorRegistry | None = None,
    stall_threshold: float = 0.1,
    per_step: bool = False,
    access_log: bool = False,
    drain_period: float = 1.0,
    read_timeout: float = 10.0,
    max_connections: int = 256,
    ui: bool = True,
    ui_token: str | None = None,
    ui_interval: float = 0.5,
    task_status: trio.TaskStatus[OpsServer] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve /health, /ready, /metrics and /status until cancelled or stopped.

    Start it with ``ops = await nursery.start(engine.serve_ops, supervisor, host, port)``
    (``functools.partial`` for the keyword settings).
    It watches the event loop for stalls while it runs, and answers its port
    from a thread while the loop is stalled, so a probe learns that the loop
    is stuck, and in which task, instead of timing out.

    When a stop is requested through :func:`engine.current_shutdown` (what
    :func:`engine.run` does on SIGTERM), the server stops accepting
    connections, gives requests in flight ``drain_period`` seconds (/ready
    answers 503 meanwhile), and returns.

    Limits, so that no client can hold the server:

    * ``read_timeout``: a connection on which the client sends nothing for
      this long is closed. That covers a request body withheld or stalled
      (a mounted app reading it sees ``http.disconnect``; the REST API
      answers 408), headers sent by halves, and a silent connection. It is
      hypercorn's ``read_timeout``, which bounds every wait for the client's
      next bytes, so it also cuts a request whose answer takes longer than
      that, and a mounted WebSocket whose client sends nothing (not even a
      pong) for that long. A connection idle between requests is closed
      after 5 s (hypercorn's ``keep_alive_timeout``), or ``read_timeout`` if
      that is shorter.
    * ``max_connections``: connections served at once, idle keep-alive ones
      included. A connection past it gets ``503`` with ``Retry-After: 1``
      and ``Connection: close``, and is closed; up to 64 such answers are in
      progress at once, and past those a connection is closed unanswered.
      The loop watch thread's answers during a stall are outside this bound
      (it answers one connection at a time).
    * A request answered before its body was read (a 405, or a 413 from a
      mounted app's body cap) does not wait on the rest of that body: the
      rest is dropped as it arrives while the answer goes out, and the
      connection is closed unless the whole body had already arrived.
    * A client that leaves mid-request is one INFO line on
      ``engine.ops.http``, not an error.

    Args:
        supervisor: the root of the supervision tree to report on (its
            statistics include the cycles and consumer groups inside its
            children), or ``None``.
        host: the address to bind; loopback by default.
        port: the port to bind; 0 picks a free one (see the returned
            :class:`OpsServer`).
        sources: more things to report on, by name: channels, hubs, anything
            with a ``statistics()`` snapshot. The name labels their metrics.
        routes: more ASGI apps by path prefix (``{"/api": app}``); the four
            endpoints take precedence, a prefix of ``"/"`` gets every other
            path. A mounted app sees the full ``path`` and the prefix as
            ``root_path``; it receives no lifespan events.
        registry: the Prometheus registry to expose; a new one when omitted
            (never the process-wide default).
        stall_threshold: seconds the loop may go without turning before it
            counts as stalled; ``math.inf`` turns the detector off.
        per_step: time every task step with a trio instrument (exact, but
            costs two hook calls per step); see :func:`engine.open_loop_watch`.
        access_log: log every request on logger ``engine.ops.access``.
        drain_period: seconds requests in flight get after a stop request.
        read_timeout: seconds a connection may go without the client sending
            a byte while the server waits for one (see the limits above);
            ``math.inf`` turns it off.
        max_connections: connections served at once; the excess is
            answered 503 and closed.
        ui: serve the observer page at ``/ui``: the supervision tree, the
            sources and the loop, live (see ``docs/observer.md``).
        ui_token: the bearer token that allows the page's actions (stopping
            a child); ``None`` disables them.
        ui_interval: seconds between the page's snapshots.

    Raises:
        OSError: the address could not be bound.
        TypeError, ValueError: for a bad argument, named in the message.
    """
    check_name("host", host)
    check_count("port", port)
    check_duration("stall_threshold", stall_threshold)
    check_duration("drain_period", drain_period, allow_zero=True)
    check_duration("read_timeout", read_timeout)
    check_count("max_connections", max_connections, minimum=1)
    check_finite_duration("ui_interval", ui_interval)
    if ui_token is not None:
        check_name("ui_token", ui_token)
    checked_sources = _check_sources(sources or {})
    checked_routes = _check_routes(routes or {})
    registry = registry if registry is not None else CollectorRegistry()
    sock = await _bind(host, port)
    try:
        async with _maybe_watch(stall_threshold, per_step) as watch:
            app = OpsApp(supervisor, checked_sources, checked_routes, registry, watch)
            if ui:
                app.ui = _observer_app(app, supervisor, ui_token, ui_interval)
                registry.register(_ObserverCollector(app.ui.observer))
            registry.register(EngineCollector(supervisor, checked_sources, watch))
            bound_host, bound_port = sock.getsockname()[:2]
            server = OpsServer(bound_host, bound_port, registry, watch)
            if watch is not None:
                watch.on_stalled = StallAnswerer(sock, watch, _stall_body)
            config = _config(access_log, read_timeout)
            limit = ConnectionLimit(max_connections, registry)
            try:
                await _serve(app, sock, config, limit, drain_period, server, task_status)
            finally:
                if watch is not None:
                    watch.on_stalled = None
    finally:
        trio.lowlevel.notify_closing(sock)
        sock.close()


def _observer_app(
    app: OpsApp, supervisor: HasStatistics | None, token: str | None, interval: float
) -> ObserverApp:
    def build() -> bytes:
        return snapshot(app.status_body(), clock=trio.current_time())

    return ObserverApp(Observer(build, interval=interval), supervisor, token)


@attrs.define(eq=False)
class _ObserverCollector(Collector):
    """The observer's counters on /metrics."""

    observer: Observer

    def collect(self) -> Iterable[Metric]:
        families = Families()
        build_families(families, "", self.observer.statistics())
        return families


def _config(access_log: bool, read_timeout: float) -> Config:
    config = Config()
    config.accesslog = logging.getLogger("engine.ops.access") if access_log else None
    # A logger object, not "-": hypercorn would replace the logger's handlers.
    config.errorlog = logging.getLogger("engine.ops.http")
    # Hypercorn waits for each read under trio.fail_after(read_timeout or inf);
    # it types the setting int, but any number of seconds works.
    config.read_timeout = None if math.isinf(read_timeout) else read_timeout  # type: ignore[assignment]
    return config


async def _serve(
    app: OpsApp,
    sock: socket.socket,
    config: Config,
    limit: ConnectionLimit,
    drain_period: float,
    server: OpsServer,
    task_status: trio.TaskStatus[OpsServer],
) -> None:
    """Accept and serve connections until a stop request, then drain; what ``worker_serve`` does.

    ``worker_serve`` also runs the app's lifespan (the ops app has nothing to
    start, and mounted apps get no lifespan events) and restarts a worker
    after ``max_requests`` (unset here); the rest is this.
    """
    wrapped = wrap_app(cast("ASGIFramework", app), config.wsgi_max_body_size, "asgi")
    context = WorkerContext(None)

    async def connection(stream: trio.SocketStream) -> None:
        # TCPServer takes a plain SocketStream too (it tells TLS apart by
        # the missing do_handshake); it is typed for an SSLStream only.
        tcp_stream = cast("trio.SSLStream[trio.SocketStream]", stream)
        await _Connection(wrapped, config, context, ConnectionState({}), tcp_stream)

    listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
    serve = functools.partial(
        trio.serve_listeners, functools.partial(limit.serve, connection), [listener]
    )
    async with trio.open_nursery() as connections:
        async with trio.open_nursery() as accepting:
            await accepting.start(functools.partial(serve, handler_nursery=connections))
            if app.ui is not None:
                accepting.start_soon(app.ui.observer.run)
            logger.info("ops server listening on %s", server.url)
            task_status.started(server)
            await app.shutdown.wait()
            accepting.cancel_scope.cancel()  # closes the listening socket
        if app.ui is not None:
            app.ui.observer.close()  # live feeds end now rather than at the drain deadline
        # Idle keep-alive connections close now, the others after their response.
        await context.terminated.set()
        connections.cancel_scope.deadline = trio.current_time() + drain_period


class _Connection(TCPServer):
    """Hypercorn's server of one connection, which lets go of it once the client has gone.

    Hypercorn's keeps a connection whose client closed it between requests
    (or whose read timed out) until its keep-alive timer runs out, socket
    and all; with a bound on connections, that would be a slot held by nobody.
    """

    async def _read_data(self) -> None:
        await super()._read_data()
        # No more requests can come: the keep-alive timer has nothing to wait for.
        await self.idle_task.stop()


@attrs.define(eq=False)
class ConnectionLimit:
    """Serves at most ``maximum`` connections at once; the excess is answered 503 and closed.

    A counter around each connection's handler, so it counts connections in
    every state (sending headers, in a request, idle between requests), which
    is what holds a socket and memory.
    """

    maximum: int
    registry: CollectorRegistry
    open: int = 0
    refusing: int = 0
    refused: Counter = attrs.field(init=False)

    @refused.default
    def _refused(self) -> Counter:
        return Counter(
            "engine_ops_http_connections_refused",
            "Connections answered 503 and closed for being past max_connections",
            registry=self.registry,
        )

    def __attrs_post_init__(self) -> None:
        gauge = Gauge(
            "engine_ops_http_connections",
            "HTTP connections open on the ops server",
            registry=self.registry,
        )
        gauge.set_function(lambda: self.open)

    async def serve(
        self,
        handler: Callable[[trio.SocketStream], Awaitable[None]],
        stream: trio.SocketStream,
    ) -> None:
        """Run ``handler(stream)`` if there is room, or refuse the connection."""
        if self.open >= self.maximum:
            self.refused.inc()
            if self.refusing < _MAX_REFUSING:
                self.refusing += 1
                try:
                    await refuse(stream, _BUSY)
                finally:
                    self.refusing -= 1
            return  # trio.serve_listeners closes the stream
        self.open += 1
        try:
            await handler(stream)
        finally:
            self.open -= 1


@asynccontextmanager
async def _maybe_watch(threshold: float, per_step: bool) -> AsyncIterator[LoopWatch | None]:
    """``open_loop_watch`` unless the threshold turns it off."""
    if math.isinf(threshold):
        yield None
        return
    async with open_loop_watch(threshold=threshold, per_step=per_step) as watch:
        yield watch


def _stall_body(stall: LoopStall) -> bytes:
    """What the watch thread answers while the loop is stalled."""
    return verdict_body([loop_stalled(stall)], answered_by="loop watch thread")[1]


async def _bind(host: str, port: int) -> socket.socket:
    """A listening, non-blocking TCP socket on ``host:port`` that the caller closes."""
    infos = await trio.socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind(address)
        sock.listen(_BACKLOG)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def _check_sources(sources: Mapping[str, HasStatistics]) -> dict[str, HasStatistics]:
    for name, source in sources.items():
        check_name("sources key", name)
        if not callable(getattr(source, "statistics", None)):
            raise TypeError(f"sources[{name!r}] must have a statistics() method, got {source!r}")
    return dict(sources)


def _check_routes(routes: Mapping[str, ASGIApp]) -> list[tuple[str, ASGIApp]]:
    checked: list[tuple[str, ASGIApp]] = []
    for prefix, app in routes.items():
        if not isinstance(prefix, str) or not prefix.startswith("/"):
            raise ValueError(f"routes keys must be paths starting with '/', got {prefix!r}")
        if not callable(app):
            raise TypeError(f"routes[{prefix!r}] must be an ASGI app, got {app!r}")
        stripped = prefix.rstrip("/") or "/"
        if stripped in ENDPOINTS:
            raise ValueError(f"routes key {prefix!r} would hide the ops endpoint {stripped}")
        checked.append((stripped, app))
    # Longest prefix first, so "/api/v2" wins over "/api".
    return sorted(checked, key=lambda route: len(route[0]), reverse=True)
