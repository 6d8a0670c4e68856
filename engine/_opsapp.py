"""The ops server's ASGI app: the four endpoints, mounted apps, and 404 for the rest.

Every answer is built from fresh statistics snapshots, in the trio thread,
when the request arrives; nothing is cached between requests.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import attrs
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest

from ._bridgestats import bridge_statistics
from ._loopwatch import LoopWatch
from ._metrics import HasStatistics
from ._probes import (
    Problem,
    dumps,
    liveness,
    readiness,
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


@attrs.define(eq=False)
class OpsApp:
    """The ASGI app: the four endpoints, the mounted apps, and 404 for the rest."""

    supervisor: HasStatistics | None
    sources: dict[str, HasStatistics]
    routes: list[tuple[str, ASGIApp]]
    registry: CollectorRegistry
    watch: LoopWatch | None
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
        path: str = scope["path"]
        if scope["type"] == "http" and path in ENDPOINTS:
            await self._endpoint(scope["method"], path, send)
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
            return _verdict(liveness(tree), loop, warnings=notes)
        if path == "/ready":
            stopping = self.shutdown.reason if self.shutdown.requested else None
            return _verdict(readiness(tree, stopping=stopping), loop)
        if path == "/metrics":
            return 200, CONTENT_TYPE_LATEST.encode(), generate_latest(self.registry)
        return 200, _JSON, self._status(tree, loop)

    def _tree(self) -> SupervisorStatistics | None:
        if self.supervisor is None:
            return None
        stats = self.supervisor.statistics()
        return stats if isinstance(stats, SupervisorStatistics) else None

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
        status = 500  # if the app raises before it starts a response, hypercorn sends 500

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
