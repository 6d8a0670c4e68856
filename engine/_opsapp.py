"""The ops server's ASGI app: the four endpoints, mounted apps, and 404 for the rest.

Every answer is built from fresh statistics snapshots, in the trio thread,
when the request arrives; nothing is cached between requests.

Every HTTP request goes through :class:`Exchange`, which keeps two promises
hypercorn does not: an answer given before the request body was read never
waits on that body, and a client that leaves mid-request is one line of log.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import attrs
import trio
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest

from ._bridgestats import bridge_statistics
from ._health import HasHealth, SourceHealth
from ._loopwatch import LoopWatch
from ._metrics import HasStatistics
from ._observer_app import ObserverApp
from ._probes import (
    Problem,
    dumps,
    liveness,
    readiness,
    sources_not_ready,
    to_jsonable,
    verdict_body,
    warnings,
)
from ._runtime import Shutdown, current_shutdown
from ._statistics import SupervisorStatistics

Scope = Mapping[str, Any]
Message = Mapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
# What a mounted app may be. ASGI frameworks type scope and messages each their
# own way (Starlette: MutableMapping; asgiref: TypedDicts), and callables are
# contravariant in their arguments, so a precise type here would refuse them all.
ASGIApp = Callable[[Any, Any, Any], Awaitable[None]]

ENDPOINTS = ("/health", "/ready", "/metrics", "/status")
_JSON = b"application/json"

logger = logging.getLogger("engine.ops.http")


@attrs.define(eq=False)
class OpsApp:
    """The ASGI app: the four endpoints, the mounted apps, and 404 for the rest."""

    supervisor: HasStatistics | None
    sources: dict[str, HasStatistics]
    routes: list[tuple[str, ASGIApp]]
    registry: CollectorRegistry
    watch: LoopWatch | None
    ui: ObserverApp | None = None
    shutdown: Shutdown = attrs.field(init=False, factory=current_shutdown)
    requests: Counter = attrs.field(init=False)

    @requests.default
    def _requests(self) -> Counter:
        return Counter(
            "engine_ops_http_requests",
            "HTTP requests answered by the ops server",
            ["endpoint", "code"],
            registry=self.registry,
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] == "http":
            streamed = None if self.ui is None else await self.ui.streams(scope, receive, send)
            if streamed is not None:
                self.requests.labels("/ui/events", str(streamed)).inc()
                return
            await Exchange.serve(self._route, scope, receive, send)
        else:
            await self._route(scope, receive, send)

    async def _route(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope["path"]
        if scope["type"] == "http" and path in ENDPOINTS:
            await self._endpoint(scope["method"], path, send)
            return
        if scope["type"] == "http" and self.ui is not None and self.ui.handles(path):
            status = await self.ui(scope, receive, send)
            self.requests.labels("/ui", str(status)).inc()
            return
        for prefix, mounted in self.routes:
            if prefix == "/" or path == prefix or path.startswith(prefix + "/"):
                await self._mounted(prefix, mounted, scope, receive, send)
                return
        if scope["type"] == "http":
            body = dumps({"error": "not found", "endpoints": list(ENDPOINTS)})
            await self._reply(send, "unmatched", 404, _JSON, body, with_body=True)
        else:  # a WebSocket to nowhere: closing before accepting answers 403
            await send({"type": "websocket.close", "code": 1008})

    async def _endpoint(self, method: str, path: str, send: Send) -> None:
        if method not in ("GET", "HEAD"):
            body = dumps({"error": f"method {method} not allowed", "allow": ["GET", "HEAD"]})
            await self._reply(send, path, 405, _JSON, body, with_body=True, allow=b"GET, HEAD")
            return
        status, content_type, body = self._answer(path)
        await self._reply(send, path, status, content_type, body, with_body=method == "GET")

    def _answer(self, path: str) -> tuple[int, bytes, bytes]:
        tree = self._tree()
        loop = self.watch.statistics() if self.watch is not None else None
        if path == "/health":
            notes = [to_jsonable(w) for w in warnings(tree)]
            states = {name: _shown(h) for name, h in self._health().items()}
            return _verdict(liveness(tree), loop, warnings=notes, sources=states)
        if path == "/ready":
            stopping = self.shutdown.reason if self.shutdown.requested else None
            problems = readiness(tree, stopping=stopping)
            problems += sources_not_ready(self._health())
            return _verdict(problems, loop)
        if path == "/metrics":
            return 200, CONTENT_TYPE_LATEST.encode(), generate_latest(self.registry)
        return 200, _JSON, self._status(tree, loop)

    def _health(self) -> dict[str, SourceHealth]:
        return {
            name: source.health()
            for name, source in self.sources.items()
            if isinstance(source, HasHealth)
        }

    def _tree(self) -> SupervisorStatistics | None:
        if self.supervisor is None:
            return None
        stats = self.supervisor.statistics()
        return stats if isinstance(stats, SupervisorStatistics) else None

    def status_body(self) -> bytes:
        """The body of ``/status`` now."""
        loop = self.watch.statistics() if self.watch is not None else None
        return self._status(self._tree(), loop)

    def _status(self, tree: SupervisorStatistics | None, loop: object) -> bytes:
        return dumps(
            {
                "supervisor": to_jsonable(tree),
                "sources": {name: to_jsonable(s.statistics()) for name, s in self.sources.items()},
                "bridges": to_jsonable(bridge_statistics()),
                "loop": to_jsonable(loop),
            }
        )

    async def _mounted(
        self, prefix: str, app: ASGIApp, scope: Scope, receive: Receive, send: Send
    ) -> None:
        root = scope.get("root_path", "") + ("" if prefix == "/" else prefix)
        if scope["type"] != "http":
            await app({**scope, "root_path": root}, receive, send)
            return
        status = 500  # if the app raises before it starts a response, the exchange sends 500

        async def counting_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await app({**scope, "root_path": root}, receive, counting_send)
        finally:
            self.requests.labels(prefix, str(status)).inc()

    async def _reply(
        self,
        send: Send,
        endpoint: str,
        status: int,
        content_type: bytes,
        body: bytes,
        *,
        with_body: bool,
        allow: bytes | None = None,
    ) -> None:
        headers = [
            (b"content-type", content_type),
            (b"content-length", str(len(body)).encode()),
            (b"cache-control", b"no-store"),
        ]
        if allow is not None:
            headers.append((b"allow", allow))
        self.requests.labels(endpoint, str(status)).inc()
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body if with_body else b""})


@attrs.define(eq=False)
class Exchange:
    """One HTTP request and its response, as the app sees them.

    Hypercorn hands the app its request body through a queue of ten
    messages; the queue's filling up is what stops hypercorn reading the
    socket. When the app answers without reading the body (a 405, a 413 on
    ``Content-Length``, a 413 past a running cap), the queue may be full, and
    hypercorn's own end of the response then waits for room in it (to post
    ``http.disconnect``) while nobody reads it: the connection hangs until
    the server stops. So the final message of a response to a request whose
    body the app has not read to its end is sent while the rest of the queue
    is discarded, until ``http.disconnect``; then hypercorn closes the
    connection (or keeps it, if the body had been read off the socket).

    A client that goes away before the app has its response out shows up as
    ``http.disconnect``, and frameworks then raise (Starlette's
    ``ClientDisconnect``). That is the client's doing, not a server error:
    it is logged as one INFO line on ``engine.ops.http``, and whatever the app
    raised after it is swallowed.

    An app that raises or returns without starting a response gets a 500
    from here (hypercorn's own would wait on the queue like any other answer).
    """

    _receive: Receive
    _send: Send
    has_body: bool
    body_ended: bool = False
    client_left: bool = False
    received: int = 0
    started: bool = False
    finished: bool = False

    @classmethod
    async def serve(
        cls,
        app: Callable[[Scope, Receive, Send], Awaitable[None]],
        scope: Scope,
        receive: Receive,
        send: Send,
    ) -> None:
        """Run ``app`` on one HTTP request through an exchange."""
        exchange = cls(receive, send, _declares_body(scope))
        try:
            await app(scope, exchange.receive, exchange.send)
        except Exception as exc:
            if not exchange.client_left:
                if not exchange.started:
                    await exchange.send_error()
                raise
            exchange.log_departure(scope, exc)
            return
        if exchange.client_left:
            exchange.log_departure(scope, None)
        elif not exchange.started:
            await exchange.send_error()

    async def receive(self) -> Message:
        """The next request message, noting the end of the body and the client's leaving."""
        message = await self._receive()
        if message["type"] == "http.request":
            self.received += len(message.get("body", b""))
            self.body_ended = not message.get("more_body", False)
        elif message["type"] == "http.disconnect":
            if not self.finished:
                self.client_left = True
            self.body_ended = True
        return message

    async def send(self, message: Message) -> None:
        """Send a response message; the final one alongside a discard of the body's rest."""
        if message["type"] == "http.response.start":
            self.started = True
        elif message["type"] == "http.response.body" and not message.get("more_body", False):
            self.finished = True
            if self.has_body and not self.body_ended:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._discard)
                    await self._send(message)
                return
        await self._send(message)

    async def send_error(self) -> None:
        """Answer 500, for an app that ended without an answer."""
        body = dumps({"error": "internal server error"})
        headers = [(b"content-type", _JSON), (b"content-length", str(len(body)).encode())]
        await self.send({"type": "http.response.start", "status": 500, "headers": headers})
        await self.send({"type": "http.response.body", "body": body})

    def log_departure(self, scope: Scope, exc: Exception | None) -> None:
        """The one line that says the client left, and what the app made of it."""
        declared = _header(scope, b"content-length")
        of = f" of {declared.decode('latin-1')}" if declared is not None else ""
        then = f"; the app then raised {type(exc).__name__}" if exc is not None else ""
        client = scope.get("client")
        where = f"{client[0]}:{client[1]}" if client else "unknown client"
        logger.info(
            "%s %s from %s: the client left or went silent before the answer, after %d%s body"
            " bytes%s",
            scope["method"],
            scope["path"],
            where,
            self.received,
            of,
            then,
        )

    async def _discard(self) -> None:
        while (await self._receive())["type"] != "http.disconnect":
            pass
        self.body_ended = True


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return bytes(value)
    return None


def _declares_body(scope: Scope) -> bool:
    """Whether the request may have a body: HTTP/1 frames one with a length or chunks."""
    if scope.get("http_version") not in ("1.0", "1.1"):
        return True  # HTTP/2 frames a body without either header
    if _header(scope, b"transfer-encoding") is not None:
        return True
    length = _header(scope, b"content-length")
    return length is not None and length.strip() != b"0"


def _shown(health: SourceHealth) -> dict[str, object]:
    return {"state": health.state, "ready": health.ready, **health.detail}


def _verdict(problems: list[Problem], loop: object, **extra: object) -> tuple[int, bytes, bytes]:
    status, body = verdict_body(problems, loop=loop, **extra)
    return status, _JSON, body


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
