"""One TCP connection: HTTP/1.1 requests (h11) until one upgrades to a WebSocket.

REST and WebSocket share the port, as on a real exchange gateway: h11 parses
each request; a ``GET`` with ``Upgrade: websocket`` on a stream path is
handed to wsproto (which checks the handshake and answers 101), every other
request gets a REST answer and the connection stays open for the next one.
"""

from __future__ import annotations

from urllib.parse import parse_qs, unquote, urlsplit

import attrs
import h11
import trio
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, Request
from wsproto.utilities import RemoteProtocolError

from ._encode import encode
from ._pacing import Pacer
from ._rest import Reply
from ._session import MAX_BURST, Session, reject
from ._state import SharedState
from ._streams import UnknownStream, parse_streams
from ._tape import Tape

_RECEIVE_SIZE = 65536
_MAX_REQUEST = 16384


@attrs.frozen
class StreamRoute:
    """Which streams a WebSocket path asks for (private).

    Attributes:
        combined: ``/stream?streams=...``: messages wrapped with their stream name.
        names: the stream names, in the order given.
    """

    combined: bool
    names: list[str]


def stream_route(target: str) -> StreamRoute | None:
    """The streams of a WebSocket request target, or ``None`` for another path.

    ``/ws``, ``/ws/<stream>`` and ``/ws/<stream>/<stream>``: raw messages;
    ``/stream`` and ``/stream?streams=<stream>/<stream>``: combined.
    """
    parts = urlsplit(target)
    path = unquote(parts.path)
    if path in ("/ws", "/ws/") or path.startswith("/ws/"):
        return StreamRoute(False, path[len("/ws/") :].split("/"))
    if path in ("/stream", "/stream/"):
        query = parse_qs(parts.query)
        return StreamRoute(True, query.get("streams", [""])[-1].split("/"))
    return None


async def handle_connection(state: SharedState, stream: trio.SocketStream) -> None:
    """Serve one accepted connection until it closes (a ``serve_listeners`` handler)."""
    try:
        await _serve(
            state, stream, h11.Connection(h11.SERVER, max_incomplete_event_size=_MAX_REQUEST)
        )
    except (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError):
        pass  # the client went away or spoke nonsense: its connection ends, nothing else
    finally:
        await trio.aclose_forcefully(stream)


async def _serve(state: SharedState, stream: trio.SocketStream, conn: h11.Connection) -> None:
    while True:
        event = await _next_event(stream, conn)
        if not isinstance(event, h11.Request):
            return  # the client closed, or h11 paused on something it will not parse
        target = event.target.decode("ascii", errors="replace")
        upgrade = _header(event, b"upgrade").lower() == b"websocket"
        while not isinstance(await _next_event(stream, conn), h11.EndOfMessage):
            pass  # a body: none of the endpoints reads one
        if upgrade:
            await _websocket(state, stream, conn, event, target)
            return
        state.counters.rest_requests += 1
        method = event.method.decode("ascii", errors="replace")
        await _respond(stream, conn, state.rest.answer(method, target), head=method == "HEAD")
        if conn.our_state is not h11.DONE:
            return
        conn.start_next_cycle()


async def _next_event(stream: trio.SocketStream, conn: h11.Connection) -> object:
    while True:
        event = conn.next_event()
        if event is not h11.NEED_DATA:
            return event
        conn.receive_data(await stream.receive_some(_RECEIVE_SIZE))


def _error(status: int, message: str) -> Reply:
    return Reply(status, encode({"code": -1, "msg": message}).encode())


def _header(request: h11.Request, name: bytes) -> bytes:
    return next((value for key, value in request.headers if key == name), b"")


async def _respond(
    stream: trio.SocketStream, conn: h11.Connection, reply: Reply, *, head: bool = False
) -> None:
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(reply.body)).encode()),
        *reply.headers,
    ]
    data = conn.send(h11.Response(status_code=reply.status, headers=headers)) or b""
    data += conn.send(h11.Data(data=b"" if head else reply.body)) or b""
    data += conn.send(h11.EndOfMessage()) or b""
    await stream.send_all(data)


async def _websocket(
    state: SharedState,
    stream: trio.SocketStream,
    conn: h11.Connection,
    request: h11.Request,
    target: str,
) -> None:
    route = stream_route(target)
    if route is None:
        await _respond(stream, conn, _error(404, f"No stream endpoint at {target}."))
        return
    ws = WSConnection(ConnectionType.SERVER)
    try:
        ws.initiate_upgrade_connection(list(request.headers), request.target)
        if not any(isinstance(e, Request) for e in ws.events()):
            raise RemoteProtocolError("no WebSocket request", event_hint=None)
    except RemoteProtocolError as exc:
        await _respond(stream, conn, _error(400, f"Bad WebSocket handshake: {exc}"))
        return
    await stream.send_all(ws.send(AcceptConnection()))
    trailing, _ = conn.trailing_data
    if trailing:
        ws.receive_data(trailing)
    await _run_session(state, stream, ws, route)


async def _run_session(
    state: SharedState, stream: trio.SocketStream, ws: WSConnection, route: StreamRoute
) -> None:
    try:
        specs = parse_streams(route.names, state.instruments)
    except UnknownStream as exc:
        await reject(state, stream, ws, str(exc))
        return
    config = state.config
    # Ids continue past every message sent before, so a client that reconnects
    # sees the jump an exchange's ids make while it is away (a gap to count).
    tape = Tape(
        config.seed,
        specs,
        combined=route.combined,
        epoch_ms=config.epoch_ms,
        rate=config.rate,
        trade_id_offset=state.counters.messages_sent,
    )
    state.counters.connections_total += 1
    await Session(state, stream, ws, tape, Pacer(config.rate, MAX_BURST)).run()
