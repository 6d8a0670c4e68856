"""The ops server: /health, /ready, /metrics and /status on hypercorn's trio worker.

A small ASGI app (``_opsapp.py``) answers the four endpoints and hands every
other path to the ASGI apps a service mounts. The listening
socket is bound here, not by hypercorn, for two reasons: the bound port is
known at once (port 0 works), and the loop watch thread can answer that same
socket while the event loop is stalled (see ``_fallback.py``).
"""

from __future__ import annotations

import functools
import logging
import math
import socket
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, cast

import attrs
import trio
from hypercorn.config import Config, Sockets
from hypercorn.trio.run import worker_serve
from hypercorn.utils import wrap_app
from prometheus_client import CollectorRegistry

from ._fallback import StallAnswerer
from ._loopwatch import LoopStall, LoopWatch, open_loop_watch
from ._metrics import EngineCollector, HasStatistics
from ._opsapp import ENDPOINTS, ASGIApp, OpsApp
from ._probes import loop_stalled, verdict_body
from ._validation import check_count, check_duration, check_name

if TYPE_CHECKING:
    from hypercorn.typing import ASGIFramework

logger = logging.getLogger("engine.ops")

_BACKLOG = 128


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

    Raises:
        OSError: the address could not be bound.
        TypeError, ValueError: for a bad argument, named in the message.
    """
    check_name("host", host)
    check_count("port", port)
    check_duration("stall_threshold", stall_threshold)
    check_duration("drain_period", drain_period, allow_zero=True)
    checked_sources = _check_sources(sources or {})
    checked_routes = _check_routes(routes or {})
    registry = registry if registry is not None else CollectorRegistry()
    sock = await _bind(host, port)
    try:
        async with _maybe_watch(stall_threshold, per_step) as watch:
            app = OpsApp(supervisor, checked_sources, checked_routes, registry, watch)
            registry.register(EngineCollector(supervisor, checked_sources, watch))
            bound_host, bound_port = sock.getsockname()[:2]
            server = OpsServer(bound_host, bound_port, registry, watch)
            if watch is not None:
                watch.on_stalled = StallAnswerer(sock, watch, _stall_body)
            try:
                await _serve(app, sock, access_log, drain_period, server, task_status)
            finally:
                if watch is not None:
                    watch.on_stalled = None
    finally:
        trio.lowlevel.notify_closing(sock)
        sock.close()


async def _serve(
    app: OpsApp,
    sock: socket.socket,
    access_log: bool,
    drain_period: float,
    server: OpsServer,
    task_status: trio.TaskStatus[OpsServer],
) -> None:
    config = Config()
    config.accesslog = logging.getLogger("engine.ops.access") if access_log else None
    # A logger object, not "-": hypercorn would replace the logger's handlers.
    config.errorlog = logging.getLogger("engine.ops.http")
    config.graceful_timeout = drain_period
    wrapped = wrap_app(cast("ASGIFramework", app), config.wsgi_max_body_size, "asgi")
    serve = functools.partial(
        worker_serve,
        wrapped,
        config,
        sockets=Sockets(secure_sockets=[], insecure_sockets=[sock], quic_sockets=[]),
        shutdown_trigger=app.shutdown.wait,
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(serve)
        logger.info("ops server listening on %s", server.url)
        task_status.started(server)


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
