"""The ``/ui`` routes of the ops server: the observer page, its live feed, and guarded actions.

* ``GET /ui``: the page (static HTML, CSS and JS shipped in
  ``engine/_observer_static``; no build step, nothing fetched from elsewhere).
* ``GET /ui/events``: server-sent events, one snapshot per tick
  (see :class:`~engine._observer.Observer` for what bounds its cost).
* ``GET /ui/pulse``: ``200`` while the loop turns. While the loop is stalled
  the loop watch thread answers every new connection on the port with ``503``
  and the stall, so the page, which polls this when the feed goes quiet,
  shows "event loop blocked" with the task and the line.
* ``POST /ui/actions/stop``: stop a child of the root supervisor. Refused
  with ``403`` unless the ops server has a token, ``401`` without the right
  ``Authorization: Bearer``; each action is logged with who and what.

Every answer carries ``Connection: close``: a browser must never hold an
idle kept-alive connection to the port, since a request sent on one while
the loop is stalled would wait for the loop instead of reaching the watch
thread.
"""

from __future__ import annotations

import hmac
import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from importlib import resources
from typing import Any

import attrs
import trio

from ._observer import Observer, TooManyViewers, Viewer, frame
from ._probes import dumps

Scope = Mapping[str, Any]
Message = Mapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

PREFIX = "/ui"

logger = logging.getLogger("engine.ops.ui")

_STATIC = {
    "": ("index.html", b"text/html; charset=utf-8"),
    "/": ("index.html", b"text/html; charset=utf-8"),
    "/observer.js": ("observer.js", b"text/javascript; charset=utf-8"),
    "/observer.css": ("observer.css", b"text/css; charset=utf-8"),
}
_JSON = b"application/json"
# The largest action request body read; actions carry a child's name.
_MAX_BODY = 4096


def _static(name: str) -> bytes:
    return resources.files("engine").joinpath("_observer_static", name).read_bytes()


@attrs.define(eq=False)
class ObserverApp:
    """Serves the ``/ui`` paths.

    Args:
        observer: the feed the page streams.
        supervisor: the root supervisor, for actions (anything with an
            ``async stop(name)``), or ``None``.
        token: the bearer token that allows actions; ``None`` disables them.
    """

    observer: Observer
    supervisor: object | None
    token: str | None
    _files: dict[str, bytes] = attrs.field(factory=dict, init=False)

    def handles(self, path: str) -> bool:
        """Whether ``path`` is one of the observer's."""
        return path == PREFIX or path.startswith(PREFIX + "/")

    async def streams(self, scope: Scope, receive: Receive, send: Send) -> int | None:
        """Serve ``/ui/events`` if that is the request and return its status; ``None`` otherwise.

        The stream is served outside the ops app's request bookkeeping: a
        viewer closing its page is how a stream ends, not a client leaving
        mid-answer.
        """
        if scope["path"] != PREFIX + "/events" or scope["method"] != "GET":
            return None
        return await self._events(receive, send)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> int:
        """Answer one ``/ui`` request other than the stream; returns the status sent."""
        rest = scope["path"][len(PREFIX) :]
        method = scope["method"]
        if rest in _STATIC and method in ("GET", "HEAD"):
            name, content_type = _STATIC[rest]
            if name not in self._files:
                self._files[name] = _static(name)
            return await _reply(send, 200, content_type, self._files[name], method == "GET")
        if rest == "/pulse" and method in ("GET", "HEAD"):
            body = dumps({"status": "ok", "actions": self.token is not None})
            return await _reply(send, 200, _JSON, body, method == "GET")
        if rest == "/actions/stop" and method == "POST":
            status, body = await self._stop(scope, receive)
            extra = [(b"www-authenticate", b"Bearer")] if status == 401 else []
            return await _reply(send, status, _JSON, body, True, extra)
        return await _reply(send, 404, _JSON, dumps({"error": "not found"}), method != "HEAD")

    async def _events(self, receive: Receive, send: Send) -> int:
        try:
            with self.observer.viewer() as viewer:
                headers = [
                    (b"content-type", b"text/event-stream"),
                    (b"cache-control", b"no-store"),
                    (b"connection", b"close"),
                ]
                await send({"type": "http.response.start", "status": 200, "headers": headers})
                # EventSource reconnects this soon after the stream ends.
                hello = {"type": "http.response.body", "body": b"retry: 500\n\n", "more_body": True}
                await send(hello)
                ended = False  # by the server stopping, rather than the viewer leaving
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(_until_disconnect, receive, nursery.cancel_scope)
                    await _stream(viewer, send)
                    ended = True
                    nursery.cancel_scope.cancel()
                if ended:
                    await send({"type": "http.response.body", "body": b""})
                return 200
        except TooManyViewers as exc:
            return await _reply(send, 503, _JSON, dumps({"error": str(exc)}), True)

    async def _stop(self, scope: Scope, receive: Receive) -> tuple[int, bytes]:
        who = _client(scope)
        verdict = self.authorize(_header(scope, b"authorization"))
        if verdict is not None:
            status, reason = verdict
            logger.warning("ui action stop refused for %s: %s", who, reason)
            return status, dumps({"error": reason})
        try:
            request = json.loads(await _body(receive))
            child = request["child"]
            if not isinstance(child, str):
                raise TypeError(child)
        except (ValueError, KeyError, TypeError):
            return 400, dumps({"error": 'the body must be JSON {"child": "<name>"}'})
        stop = getattr(self.supervisor, "stop", None)
        if stop is None:
            return 404, dumps({"error": "no supervisor to act on"})
        logger.warning("ui action by %s: stop child %r", who, child)
        try:
            await stop(child)
        except KeyError:
            return 404, dumps({"error": f"no child {child!r}"})
        return 200, dumps({"stopped": child})

    def authorize(self, authorization: bytes | None) -> tuple[int, str] | None:
        """``None`` when an action may run, else the status and reason to refuse it."""
        if self.token is None:
            return 403, "actions are disabled: the ops server has no token"
        expected = b"Bearer " + self.token.encode()
        if authorization is None or not hmac.compare_digest(authorization, expected):
            return 401, "actions need Authorization: Bearer <token>"
        return None


async def _stream(viewer: Viewer, send: Send) -> None:
    while True:
        try:
            snapshot = await viewer.next()
        except trio.EndOfChannel:
            return
        event = frame(snapshot, dropped=viewer.dropped)
        await send({"type": "http.response.body", "body": event, "more_body": True})


async def _until_disconnect(receive: Receive, scope: trio.CancelScope) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
    scope.cancel()


async def _body(receive: Receive) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            break
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > _MAX_BODY:
            raise ValueError("body too large")
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


async def _reply(
    send: Send,
    status: int,
    content_type: bytes,
    body: bytes,
    with_body: bool,
    extra: list[tuple[bytes, bytes]] | None = None,
) -> int:
    headers = [
        (b"content-type", content_type),
        (b"content-length", str(len(body)).encode()),
        (b"cache-control", b"no-store"),
        (b"connection", b"close"),
        *(extra or []),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body if with_body else b""})
    return status


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return bytes(value)
    return None


def _client(scope: Scope) -> str:
    client = scope.get("client")
    return f"{client[0]}:{client[1]}" if client else "unknown client"
