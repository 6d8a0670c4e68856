"""The HTTP upgrade, with wsproto: read the request, admit it or answer why not."""

from __future__ import annotations

import hmac
from http import HTTPStatus

import attrs
import h11
import trio
from wsproto import WSConnection
from wsproto.events import AcceptConnection, RejectConnection, RejectData, Request
from wsproto.utilities import LocalProtocolError, RemoteProtocolError

from .._refusal import refuse
from ._config import BroadcastConfig
from ._topics import TooManyTopics, UnknownTopic, parse_target

RECEIVE_SIZE = 65536

Headers = tuple[tuple[bytes, bytes], ...]


@attrs.frozen
class Rejection:
    """Why a request is answered with an HTTP error instead of an upgrade.

    Attributes:
        status: the HTTP status.
        reason: the key it is counted under in the statistics.
        message: the plain-text body.
        headers: extra response headers.
    """

    status: int
    reason: str
    message: str
    headers: Headers = ()


async def receive_request(stream: trio.abc.Stream, ws: WSConnection) -> Request | Rejection | None:
    """Read until the upgrade request is complete.

    Returns:
        The request; a :class:`Rejection` if it is not a valid WebSocket
        upgrade (h11 bounds its size); ``None`` if the peer went away.
    """
    while True:
        try:
            data = await stream.receive_some(RECEIVE_SIZE)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return None
        if not data:
            return None
        try:
            ws.receive_data(bytes(data))
        except RemoteProtocolError as exc:
            hint = exc.event_hint
            if isinstance(hint, RejectConnection):
                return Rejection(hint.status_code, "bad_request", str(exc), tuple(hint.headers))
            return Rejection(400, "bad_request", str(exc))
        for event in ws.events():
            if isinstance(event, Request):
                return event


def _authorised(header: bytes | None, query_token: str | None, token: str) -> bool:
    expected = token.encode()
    if header is not None:
        scheme, _, credentials = header.partition(b" ")
        if scheme.lower() == b"bearer" and hmac.compare_digest(credentials.strip(), expected):
            return True
    if query_token is None:
        return False
    # surrogatepass: whatever the query decoded to, it becomes bytes to compare.
    return hmac.compare_digest(query_token.encode("utf-8", "surrogatepass"), expected)


RETRY_AFTER = ((b"retry-after", b"5"),)
"""The header of a 503: try again in a few seconds."""


def refusal_at_accept(
    config: BroadcastConfig, handshaking: int, same_address: int | None
) -> Rejection | None:
    """Why a connection just accepted is refused at once, or ``None`` to serve it.

    Args:
        config: the server's settings.
        handshaking: connections in the upgrade now (this one not included).
        same_address: connections from its address now, or ``None`` if unknown.
    """
    limit = config.max_handshaking
    if handshaking >= limit:
        return Rejection(503, "busy", f"at most {limit} connections in the upgrade", RETRY_AFTER)
    per_ip = config.max_clients_per_ip
    if per_ip is not None and same_address is not None and same_address >= per_ip:
        message = f"at most {per_ip} connections per address"
        return Rejection(503, "per_ip", message, RETRY_AFTER)
    return None


def admit_client(
    request: Request, config: BroadcastConfig, closing: bool, clients: int
) -> tuple[str, ...] | Rejection:
    """:func:`admit`, and then the server's own state: closing, or full at ``clients``."""
    if closing:
        return Rejection(503, "shutting_down", "the server is shutting down")
    verdict = admit(request, config)
    if not isinstance(verdict, Rejection) and clients >= config.max_clients:
        message = f"at most {config.max_clients} clients"
        return Rejection(503, "full", message, RETRY_AFTER)
    return verdict


def admit(request: Request, config: BroadcastConfig) -> tuple[str, ...] | Rejection:
    """Check a request against the path, token, origin and topic rules.

    Args:
        request: the upgrade request.
        config: the server's settings (``config.topic_rules`` for the topics).

    Returns:
        The client's initial topic patterns, or why it is refused.
    """
    try:
        target = parse_target(request.target)
    except ValueError:
        return Rejection(400, "bad_request", "the request target cannot be parsed")
    if target.path != config.path:
        return Rejection(404, "not_found", f"no WebSocket endpoint at {target.path[:100]!r}")
    headers = {name.lower(): value for name, value in request.extra_headers}
    if config.token is not None and not _authorised(
        headers.get(b"authorization"), target.token, config.token
    ):
        challenge = ((b"www-authenticate", b"Bearer"),)
        return Rejection(401, "unauthorized", "a valid bearer token is required", challenge)
    origin = headers.get(b"origin")
    if (
        config.allowed_origins is not None
        and origin is not None
        and origin.decode("latin-1") not in config.allowed_origins
    ):
        return Rejection(403, "origin", "origin not allowed")
    try:
        patterns = config.topic_rules.patterns(target.topics, target.symbols)
    except TooManyTopics as exc:
        return Rejection(400, "too_many_topics", str(exc))
    except UnknownTopic as exc:
        return Rejection(400, "unknown_topics", str(exc))
    except ValueError as exc:
        return Rejection(400, "bad_topics", str(exc))
    return tuple(patterns)


def accept_bytes(ws: WSConnection) -> bytes:
    """The 101 response. No extensions: every client gets the same frame bytes."""
    return ws.send(AcceptConnection())


def reject_bytes(ws: WSConnection, rejection: Rejection) -> bytes:
    """The HTTP error response for ``rejection``, or nothing if h11 cannot send one now."""
    body = rejection.message.encode() + b"\n"
    headers = [
        (b"content-type", b"text/plain; charset=utf-8"),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),
        *rejection.headers,
    ]
    try:
        head = ws.send(
            RejectConnection(status_code=rejection.status, headers=headers, has_body=True)
        )
        return head + ws.send(RejectData(data=body, body_finished=True))
    except (LocalProtocolError, h11.LocalProtocolError):
        return b""


def early_bytes(rejection: Rejection) -> bytes:
    """``rejection`` as a complete HTTP response, sent before any request was read."""
    body = rejection.message.encode() + b"\n"
    headers = [
        (b"content-type", b"text/plain; charset=utf-8"),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),
        *rejection.headers,
    ]
    reason = HTTPStatus(rejection.status).phrase.encode()
    head = b"HTTP/1.1 %d %s\r\n" % (rejection.status, reason)
    head += b"".join(name + b": " + value + b"\r\n" for name, value in headers)
    return head + b"\r\n" + body


async def refuse_at_once(stream: trio.abc.HalfCloseableStream, rejection: Rejection) -> None:
    """Answer ``rejection`` without reading the request, then drop what the client sends."""
    await refuse(stream, early_bytes(rejection))
