"""The feed's WebSocket client: wsproto over a trio stream it owns, a socket read at a time.

A client that hands over one message per call (trio-websocket's
``get_message``, whose reader task puts every message on a memory channel)
makes each message cost its own trips through the scheduler, and so does
all that follows it; that, not the network, would limit the feed. So this
client does per socket read what such a client does per message: it reads
up to :data:`RECEIVE_SIZE` bytes, hands them to wsproto, and returns every
message they completed in one list (a few hundred at full rate). The
figures, against trio-websocket, are in ``docs/getting-started.md``. It
also owns its TCP (or TLS) stream and always closes it, which
trio-websocket 0.12's client does not when the server closes first.

wsproto does the protocol: ``WSConnection`` the opening handshake (an
HTTP/1.1 upgrade, its key and answer checked), and its frame layer,
``FrameProtocol``, the frames: parsing (with UTF-8 validation), masking,
building pings, pongs and close frames. The frames of the open connection
are read from the frame layer directly, as the simulator writes them,
because ``wsproto.connection.Connection.events`` wraps each frame in an
event object on the way, a real share of the cost of reading a message.
What the frame layer leaves to its user, and ``Connection`` would
otherwise do, is here: answering pings and the server's close, and the
closing state.
"""

from __future__ import annotations

import contextlib
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import cast
from urllib.parse import urlsplit

import trio
from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import AcceptConnection, RejectConnection, RejectData, Request
from wsproto.frame_protocol import FrameProtocol, Opcode, ParseFailed
from wsproto.utilities import RemoteProtocolError

RECEIVE_SIZE = 65536
"""Bytes asked of the socket per read: about 280 stream messages of the usual mix."""
MAX_MESSAGE_SIZE = 1 << 20
"""Bytes (or characters) of one message at most by default; larger closes with 1009."""
CLOSE_TIMEOUT = 2.0
"""Seconds the closing handshake may take before the socket is closed anyway."""
MAX_RESPONSE_HEAD = 16384
"""Bytes of the server's answer to the upgrade request (its status line and headers)."""
MAX_REFUSAL_BODY = 1024
"""Bytes of a refusal's body read at most, for the reason it gives."""

_NORMAL = 1000
_ABNORMAL = 1006
_TOO_BIG = 1009
_TEXT, _BINARY, _CLOSE, _PING, _PONG = (
    Opcode.TEXT,
    Opcode.BINARY,
    Opcode.CLOSE,
    Opcode.PING,
    Opcode.PONG,
)


class ConnectionClosed(Exception):
    """The WebSocket connection ended, by either side or by the network.

    Attributes:
        code: the close code (1006: the connection was lost without a close frame).
        reason: the close reason, possibly empty.
    """

    def __init__(self, code: int, reason: str) -> None:
        code = int(code)  # wsproto's codes are IntEnum members
        super().__init__(f"connection closed: {code} {reason}".rstrip())
        self.code = code
        self.reason = reason


class HandshakeError(Exception):
    """The server did not upgrade the connection (an HTTP error, or not WebSocket at all).

    Attributes:
        status: the HTTP status of the refusal, or ``None`` when there was none.
    """

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


def _closing_scope() -> trio.CancelScope:
    # Shielded: closing must happen even when (usually because) we are
    # being cancelled; bounded, since the server may never answer.
    return trio.CancelScope(shield=True, deadline=trio.current_time() + CLOSE_TIMEOUT)


def _target(url: str) -> tuple[str, int, str, str, bool]:
    """``(host, port, Host header, request target, secure)`` of a ws:// or wss:// URL."""
    parts = urlsplit(url)
    if parts.scheme not in ("ws", "wss"):
        raise ValueError(f"url must start with ws:// or wss://, got {url!r}")
    secure = parts.scheme == "wss"
    host = parts.hostname or "localhost"
    default = 443 if secure else 80
    port = parts.port or default
    name = f"[{host}]" if ":" in host else host
    header = name if port == default else f"{name}:{port}"
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return host, port, header, target, secure


class WebSocketClient:
    """An open client connection; use it through :func:`open_websocket`.

    One task reads (:meth:`receive_messages`); others may :meth:`ping` and
    :meth:`abort` meanwhile (sends are serialised by a lock).
    """

    def __init__(self, stream: trio.abc.Stream, first: bytes, *, max_message_size: int) -> None:
        self._stream = stream
        self._frames = FrameProtocol(client=True, extensions=[])
        self._frames.receive_bytes(first)
        self._unread = bool(first)
        self._state = ConnectionState.OPEN
        self._max_size = max_message_size
        self._send_lock = trio.StrictFIFOLock()
        self._parts: list[str | bytes] = []
        self._part_size = 0
        self._pings = 0
        self._awaited: dict[bytes, trio.Event] = {}
        self._closed: ConnectionClosed | None = None

    @property
    def state(self) -> ConnectionState:
        """wsproto's name for where the connection is: OPEN, LOCAL_CLOSING, CLOSED."""
        return self._state

    async def receive_messages(self) -> list[str | bytes]:
        """Every message completed by the next socket read (or reads): at least one.

        Text messages are ``str``, binary ones ``bytes``. Pings are answered
        and pongs reported to :meth:`ping` on the way.

        Raises:
            ConnectionClosed: the server closed (the close is answered), the
                connection was lost (1006), a frame broke the protocol (the
                code wsproto chose), or a message exceeded
                ``max_message_size`` (1009).
        """
        while True:
            if self._closed is not None:
                raise self._closed
            if self._unread:  # frames that came with the handshake's answer
                self._unread = False
            else:
                await self._read()
            messages = await self._take()
            if messages:
                return messages

    async def _read(self) -> None:
        try:
            data = await self._stream.receive_some(RECEIVE_SIZE)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise self._lost(str(exc)) from exc
        if not data:
            raise self._lost("the server closed the TCP connection")
        self._frames.receive_bytes(bytes(data))  # a no-op on bytes, a copy of a bytearray

    async def _take(self) -> list[str | bytes]:
        """The messages of the frames received so far; control frames handled on the way."""
        messages: list[str | bytes] = []
        reply = bytearray()
        limit = self._max_size
        try:
            for frame in self._frames.received_frames():
                opcode = frame.opcode
                if opcode is _TEXT or opcode is _BINARY:  # continuations come as their message's
                    payload = frame.payload
                    if not isinstance(payload, str):
                        payload = bytes(cast(bytes, payload))  # a bytearray from the frame layer
                    if frame.message_finished and not self._parts and len(payload) <= limit:
                        messages.append(payload)
                    elif not self._add_part(payload, frame.message_finished, messages):
                        reply += self._close_frame(_TOO_BIG, "message too big")
                        break
                elif opcode is _PING:
                    if self._state is ConnectionState.OPEN:
                        reply += self._frames.pong(cast(bytes, frame.payload))
                elif opcode is _PONG:
                    waiter = self._awaited.pop(bytes(cast(bytes, frame.payload)), None)
                    if waiter is not None:
                        waiter.set()
                elif opcode is _CLOSE:
                    code, reason = cast(tuple[int, str], frame.payload)
                    if self._state is ConnectionState.OPEN:  # the server's: answer it
                        reply += self._frames.close(code, reason)
                        self._closed = ConnectionClosed(code, reason)
                    self._state = ConnectionState.CLOSED  # (or it answered ours)
                    break
        except ParseFailed as exc:  # a broken frame: close with the code wsproto chose
            reply += self._close_frame(exc.code, str(exc))
        if reply:
            # A failure is recorded, and the next read raises it; these
            # messages arrived whole all the same.
            with contextlib.suppress(ConnectionClosed):
                await self._send(bytes(reply))
        return messages

    def _add_part(self, data: str | bytes, finished: bool, messages: list[str | bytes]) -> bool:
        self._parts.append(data)
        self._part_size += len(data)
        if self._part_size > self._max_size:
            return False
        if finished:
            # The frames of one message share its type: all str or all bytes.
            if isinstance(data, str):
                messages.append("".join(cast(list[str], self._parts)))
            else:
                messages.append(b"".join(cast(list[bytes], self._parts)))
            self._parts, self._part_size = [], 0
        return True

    def _close_frame(self, code: int, reason: str) -> bytes:
        """Our close frame (the state becomes LOCAL_CLOSING), or nothing if one went."""
        self._closed = self._closed or ConnectionClosed(code, reason)
        if self._state is not ConnectionState.OPEN:
            return b""
        self._state = ConnectionState.LOCAL_CLOSING
        return bytes(self._frames.close(code, reason))

    def _lost(self, why: str) -> ConnectionClosed:
        self._state = ConnectionState.CLOSED
        if self._closed is None:
            self._closed = ConnectionClosed(_ABNORMAL, why)
        return self._closed

    async def _send(self, data: bytes) -> None:
        async with self._send_lock:
            try:
                await self._stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise self._lost(str(exc)) from exc

    async def ping(self) -> None:
        """Send a ping and wait for its pong (which the reading task receives).

        Cancellation:
            Wrap it in ``trio.move_on_after`` to bound the wait; a pong that
            arrives later is ignored.

        Raises:
            ConnectionClosed: the connection has ended.
        """
        if self._closed is not None:
            raise self._closed
        self._pings += 1
        payload = self._pings.to_bytes(8, "big")
        answered = self._awaited[payload] = trio.Event()
        try:
            await self._send(bytes(self._frames.ping(payload)))
            await answered.wait()
        finally:
            self._awaited.pop(payload, None)

    async def abort(self, code: int, reason: str) -> None:
        """Send a close frame without waiting for its answer, and close the socket.

        For a server that stopped answering: the reading task then gets
        :class:`ConnectionClosed` with this code and reason. The close frame
        is best effort, bounded by :data:`CLOSE_TIMEOUT`.
        """
        data = self._close_frame(code, reason)
        if data:
            with _closing_scope(), contextlib.suppress(ConnectionClosed):
                await self._send(data)
        self._state = ConnectionState.CLOSED
        await trio.aclose_forcefully(self._stream)

    async def aclose(self, code: int = _NORMAL, reason: str = "") -> None:
        """The closing handshake: send a close frame (unless one went), wait for the server's.

        Messages that arrive meanwhile are discarded. Shielded from
        cancellation and bounded by :data:`CLOSE_TIMEOUT`; the socket is
        closed by :func:`open_websocket` afterwards whatever happened.
        """
        with _closing_scope():
            data = self._close_frame(code, reason)
            try:
                if data:
                    await self._send(data)
                while True:
                    await self._take()  # what is buffered may hold the answer
                    if self._state is not ConnectionState.LOCAL_CLOSING:
                        break
                    await self._read()
            except ConnectionClosed:
                pass  # lost on the way: nothing left to close but the socket


async def _connect(
    host: str, port: int, secure: bool, context: ssl.SSLContext | None
) -> trio.abc.Stream:
    if not secure:
        return await trio.open_tcp_stream(host, port)
    return await trio.open_ssl_over_tcp_stream(
        host,
        port,
        ssl_context=context or ssl.create_default_context(),
        # No TLS close_notify exchange on close: the WebSocket closing
        # handshake already says the stream ended on purpose.
        https_compatible=True,
    )


async def _handshake(stream: trio.abc.Stream, header: str, target: str) -> bytes:
    """Upgrade the connection; return the bytes that came after the answer (the first frames)."""
    ws = WSConnection(ConnectionType.CLIENT)
    await stream.send_all(ws.send(Request(host=header, target=target)))
    # The answer's head ends at its first blank line (a 101 has no body):
    # wsproto checks the head, the frame layer gets what follows.
    received = b""
    while (end := received.find(b"\r\n\r\n")) < 0:
        if len(received) > MAX_RESPONSE_HEAD:
            raise HandshakeError(f"the answer's head exceeds {MAX_RESPONSE_HEAD} bytes")
        data = await stream.receive_some(RECEIVE_SIZE)
        if not data:
            raise HandshakeError("the server closed the connection during the handshake")
        received += data
    try:
        ws.receive_data(received[: end + 4])
        events = list(ws.events())
    except RemoteProtocolError as exc:
        raise HandshakeError(f"not a WebSocket answer to the upgrade: {exc}") from exc
    for event in events:
        if isinstance(event, AcceptConnection):
            return received[end + 4 :]
        if isinstance(event, RejectConnection):
            status = event.status_code
            why = await _refusal_reason(stream, ws, received[end + 4 :]) if event.has_body else ""
            refused = f"the server refused the upgrade with HTTP {status}"
            raise HandshakeError(f"{refused}: {why}" if why else refused, status)
    raise HandshakeError("the server answered the upgrade with something else")


async def _refusal_reason(stream: trio.abc.Stream, ws: WSConnection, data: bytes) -> str:
    """The first line of a refusal's body, where servers say why; empty if there is none.

    At most :data:`MAX_REFUSAL_BODY` bytes are read, within :data:`CLOSE_TIMEOUT`.
    """
    body = b""
    finished = False
    with trio.move_on_after(CLOSE_TIMEOUT):
        while not finished and len(body) < MAX_REFUSAL_BODY:
            try:
                data = data or bytes(await stream.receive_some(RECEIVE_SIZE))
                if not data:
                    break  # the server closed: what came is all there is
                ws.receive_data(data)
                for event in ws.events():
                    if isinstance(event, RejectData):
                        body += event.data
                        finished = event.body_finished
            except (RemoteProtocolError, trio.BrokenResourceError, trio.ClosedResourceError):
                break
            data = b""
    lines = body[:MAX_REFUSAL_BODY].decode("utf-8", "replace").strip().splitlines()
    return lines[0] if lines else ""


@asynccontextmanager
async def open_websocket(
    url: str,
    *,
    ssl_context: ssl.SSLContext | None = None,
    max_message_size: int = MAX_MESSAGE_SIZE,
) -> AsyncIterator[WebSocketClient]:
    """Connect to ``url`` (``ws://`` or ``wss://``) for the length of an ``async with`` block.

    On the way out the closing handshake runs (unless the connection already
    ended) and the socket is closed, whatever happened.

    Args:
        url: where to connect; ``wss://`` uses TLS with ``ssl_context``.
        ssl_context: for ``wss://``; the system's default verification if ``None``.
        max_message_size: the largest message accepted, in bytes or characters.

    Raises:
        ValueError: ``url`` is not a ws:// or wss:// URL, or a bad ``max_message_size``.
        OSError: the TCP connection (or the TLS one) could not be made.
        HandshakeError: the server did not upgrade the connection.
    """
    host, port, header, target, secure = _target(url)
    if isinstance(max_message_size, bool) or not (
        isinstance(max_message_size, int) and max_message_size >= 1
    ):
        raise ValueError(f"max_message_size must be >= 1, got {max_message_size!r}")
    stream = await _connect(host, port, secure, ssl_context)
    try:
        try:
            first = await _handshake(stream, header, target)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            why = exc.__cause__ or exc  # trio's wrapper says nothing; its cause does (TLS)
            raise HandshakeError(f"the connection broke during the handshake: {why}") from exc
        client = WebSocketClient(stream, first, max_message_size=max_message_size)
        try:
            yield client
        finally:
            await client.aclose()
    finally:
        # Gracefully (a TLS stream says close_notify) but within the
        # closing bound; a cancelled aclose still closes the socket.
        with _closing_scope():
            await stream.aclose()
