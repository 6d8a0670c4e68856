"""The feed's WebSocket client, against scripted servers on wsproto: messages, pings, closes."""

from __future__ import annotations

import contextlib
import shutil
import ssl
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path

import pytest
import trio
from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Event,
    Ping,
    Pong,
    Request,
    TextMessage,
)
from wsproto.frame_protocol import FrameProtocol

from services.market._wsclient import (
    CLOSE_TIMEOUT,
    ConnectionClosed,
    HandshakeError,
    WebSocketClient,
    open_websocket,
)


class Peer:
    """The server's side of one connection, driven by a test."""

    def __init__(self, stream: trio.abc.Stream, ws: WSConnection, target: str) -> None:
        self.stream, self.ws, self.target = stream, ws, target
        self.pending: list[Event] = []

    async def send(self, *events: Event) -> None:
        """Send every event with one write (so one client read may see them all)."""
        await self.stream.send_all(b"".join(self.ws.send(event) for event in events))

    async def next_event(self) -> Event | None:
        """The client's next event, or ``None`` once it closed its socket."""
        while not self.pending:
            try:
                data = await self.stream.receive_some()
            except trio.BrokenResourceError:  # reset: the client is gone all the same
                return None
            if not data:
                return None
            self.ws.receive_data(bytes(data))
            self.pending.extend(self.ws.events())
        return self.pending.pop(0)

    async def events_until_eof(self) -> list[Event]:
        """The client's events until it closes its socket; its close frame is answered."""
        events = []
        while (event := await self.next_event()) is not None:
            events.append(event)
            if (
                isinstance(event, CloseConnection)
                and self.ws.state is ConnectionState.REMOTE_CLOSING
            ):
                # A client that does not wait for the answer may be gone already.
                with contextlib.suppress(trio.BrokenResourceError):
                    await self.send(event.response())
        return events


Handler = Callable[[Peer], Awaitable[None]]


async def _serve_one(handler: Handler, first: bytes, stream: trio.SocketStream) -> None:
    ws = WSConnection(ConnectionType.SERVER)
    # A client that refused our certificate leaves mid-handshake: not a server failure.
    with contextlib.suppress(trio.BrokenResourceError):
        await _upgrade_and_handle(handler, first, stream, ws)


async def _upgrade_and_handle(
    handler: Handler, first: bytes, stream: trio.SocketStream, ws: WSConnection
) -> None:
    async with stream:
        target = ""
        while not target:
            ws.receive_data(await stream.receive_some())
            target = next((e.target for e in ws.events() if isinstance(e, Request)), "")
        await stream.send_all(ws.send(AcceptConnection()) + first)
        await handler(Peer(stream, ws, target))


@asynccontextmanager
async def websocket_server(
    handler: Handler, *, first: Sequence[str] = (), secure: ssl.SSLContext | None = None
) -> AsyncIterator[str]:
    """Serve WebSocket connections on 127.0.0.1 with ``handler``; yield the base URL.

    ``first`` messages are sent in the same write as the handshake's answer.
    """
    frames = FrameProtocol(client=False, extensions=[])
    serve = partial(_serve_one, handler, b"".join(frames.send_data(text) for text in first))
    async with trio.open_nursery() as nursery:
        if secure is None:
            listeners = await nursery.start(partial(trio.serve_tcp, serve, 0, host="127.0.0.1"))
        else:
            listeners = await nursery.start(
                partial(trio.serve_ssl_over_tcp, serve, 0, secure, host="127.0.0.1")
            )
        sock = (listeners[0].transport_listener if secure else listeners[0]).socket
        scheme = "wss" if secure else "ws"
        yield f"{scheme}://127.0.0.1:{sock.getsockname()[1]}"
        nursery.cancel_scope.cancel()


async def test_one_read_brings_every_message_it_completed() -> None:
    async def handler(peer: Peer) -> None:
        await peer.send(
            TextMessage(data="one"),
            BytesMessage(data=b"\x00two"),
            TextMessage(data="thr", message_finished=False),  # a message in two frames
            TextMessage(data="ee"),
        )
        await peer.events_until_eof()

    with trio.fail_after(10):
        async with websocket_server(handler, first=["zero"]) as url, open_websocket(url) as ws:
            messages = await ws.receive_messages()
            while len(messages) < 4:
                messages += await ws.receive_messages()
    assert messages == ["zero", "one", b"\x00two", "three"]


async def test_messages_that_came_with_the_handshake_need_no_other_read(
    autojump_clock: trio.abc.Clock,
) -> None:
    async def handler(peer: Peer) -> None:
        await peer.events_until_eof()  # sends nothing after the handshake

    async with websocket_server(handler, first=["zero", "one"]) as url, open_websocket(url) as ws:
        with trio.fail_after(1):
            assert await ws.receive_messages() == ["zero", "one"]


async def test_a_message_split_across_reads_is_joined() -> None:
    text = "x" * 50_000

    async def handler(peer: Peer) -> None:
        data = peer.ws.send(TextMessage(data=text))
        for start in range(0, len(data), 1000):  # 1 kB per write
            await peer.stream.send_all(data[start : start + 1000])
            await trio.testing.wait_all_tasks_blocked()
        await peer.events_until_eof()

    with trio.fail_after(10):
        async with websocket_server(handler) as url, open_websocket(url) as ws:
            assert await ws.receive_messages() == [text]


async def test_the_request_names_the_host_port_and_target() -> None:
    seen: list[str] = []

    async def handler(peer: Peer) -> None:
        seen.append(peer.target)
        await peer.send(TextMessage(data="hi"))
        await peer.events_until_eof()

    with trio.fail_after(10):
        async with websocket_server(handler) as url:
            async with open_websocket(f"{url}/stream?streams=a@trade/b@trade") as ws:
                await ws.receive_messages()
            async with open_websocket(url) as ws:
                await ws.receive_messages()
    assert seen == ["/stream?streams=a@trade/b@trade", "/"]


async def test_server_pings_are_answered_and_our_pings_wait_for_their_pong(
    autojump_clock: trio.abc.Clock,
) -> None:
    seen: list[Event] = []
    ponged = trio.Event()

    async def handler(peer: Peer) -> None:
        await peer.send(Ping(payload=b"are you there"))
        while (event := await peer.next_event()) is not None:
            seen.append(event)
            if isinstance(event, Pong):
                ponged.set()
            elif isinstance(event, Ping) and len(seen) == 2:  # answer the first ping only
                await peer.send(event.response())

    async with (
        websocket_server(handler) as url,
        open_websocket(url) as ws,
        trio.open_nursery() as nursery,
    ):
        nursery.start_soon(_read_forever, ws)
        await ponged.wait()
        with trio.fail_after(1):
            await ws.ping()  # answered
        started = trio.current_time()
        with trio.move_on_after(5) as unanswered:
            await ws.ping()
        assert unanswered.cancelled_caught
        assert trio.current_time() - started == 5
        nursery.cancel_scope.cancel()
    assert seen[0] == Pong(payload=b"are you there")
    assert [type(event) for event in seen] == [Pong, Ping, Ping, CloseConnection]
    assert seen[1] != seen[2]  # each ping has its own payload


async def _read_forever(ws: WebSocketClient) -> None:
    while True:
        await ws.receive_messages()


async def test_a_server_close_is_answered_raised_and_the_socket_closed() -> None:
    seen: list[Event | None] = []
    done = trio.Event()

    async def handler(peer: Peer) -> None:
        await peer.send(TextMessage(data="last"), CloseConnection(code=1001, reason="restart"))
        seen.extend(await peer.events_until_eof())
        seen.append(None)  # the client closed its socket
        done.set()

    with trio.fail_after(10):
        async with websocket_server(handler) as url:
            async with open_websocket(url) as ws:
                assert await ws.receive_messages() == ["last"]
                with pytest.raises(ConnectionClosed) as closed:
                    await ws.receive_messages()
                with pytest.raises(ConnectionClosed):  # and it stays closed
                    await ws.receive_messages()
            await done.wait()
    assert (closed.value.code, closed.value.reason) == (1001, "restart")
    assert seen == [CloseConnection(code=1001, reason="restart"), None]


async def test_leaving_the_block_closes_with_a_handshake() -> None:
    seen: list[Event] = []
    done = trio.Event()

    async def handler(peer: Peer) -> None:
        event = await peer.next_event()
        assert isinstance(event, CloseConnection)
        seen.append(event)
        await peer.send(event.response())
        assert await peer.next_event() is None  # then the client's socket closes
        done.set()

    with trio.fail_after(10):
        async with websocket_server(handler) as url:
            async with open_websocket(url):
                pass
            await done.wait()
    assert seen == [CloseConnection(code=1000, reason="")]


async def test_cancellation_still_closes_within_the_close_timeout(
    autojump_clock: trio.abc.Clock,
) -> None:
    async def handler(peer: Peer) -> None:
        await trio.sleep_forever()  # never answers the close

    async with websocket_server(handler) as url:
        started = trio.current_time()
        with trio.move_on_after(1):
            async with open_websocket(url) as ws:
                await ws.receive_messages()
        # Cancelled after 1 s, the close frame went out, and its answer was
        # awaited for CLOSE_TIMEOUT; then the socket was closed all the same.
        assert trio.current_time() - started == 1 + CLOSE_TIMEOUT


async def test_a_lost_connection_raises_1006() -> None:
    async def handler(peer: Peer) -> None:
        await peer.send(TextMessage(data="before"))
        await peer.stream.aclose()  # no close frame

    with trio.fail_after(10):
        async with websocket_server(handler) as url, open_websocket(url) as ws:
            assert await ws.receive_messages() == ["before"]
            with pytest.raises(ConnectionClosed) as closed:
                await ws.receive_messages()
    assert closed.value.code == 1006


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        (b"\x81\x03\xff\xfe\xfd", 1007),  # a text frame that is not UTF-8
        (b"\x81\x83abcd\x00\x00\x00", 1002),  # a masked frame from a server
        (b"\x89\x7e\x00\x80" + b"p" * 128, 1002),  # a control frame over 125 bytes
    ],
)
async def test_a_broken_frame_closes_with_the_code_wsproto_chose(frame: bytes, code: int) -> None:
    seen: list[Event | None] = []

    async def handler(peer: Peer) -> None:
        await peer.stream.send_all(frame)
        seen.append(await peer.next_event())

    with trio.fail_after(10):
        async with websocket_server(handler) as url, open_websocket(url) as ws:
            with pytest.raises(ConnectionClosed) as closed:
                await ws.receive_messages()
    assert closed.value.code == code
    assert isinstance(seen[0], CloseConnection)
    assert seen[0].code == code


async def test_a_message_over_the_limit_closes_with_1009() -> None:
    async def handler(peer: Peer) -> None:
        await peer.send(TextMessage(data="small"), TextMessage(data="y" * 101))
        await peer.events_until_eof()

    with trio.fail_after(10):
        async with (
            websocket_server(handler) as url,
            open_websocket(url, max_message_size=100) as ws,
        ):
            messages = await ws.receive_messages()
            with pytest.raises(ConnectionClosed) as closed:
                await ws.receive_messages()
    assert messages == ["small"]
    assert closed.value.code == 1009


async def test_a_refused_upgrade_is_a_handshake_error() -> None:
    async def not_websocket(stream: trio.SocketStream) -> None:
        async with stream:
            await stream.receive_some()
            await stream.send_all(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n")

    async def not_http(stream: trio.SocketStream) -> None:
        async with stream:
            await stream.receive_some()
            await stream.send_all(b"SSH-2.0-OpenSSH_9.6\r\n\r\n")

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            for server, message in ((not_websocket, "HTTP 404"), (not_http, "not a WebSocket")):
                listeners = await nursery.start(
                    partial(trio.serve_tcp, server, 0, host="127.0.0.1")
                )
                port = listeners[0].socket.getsockname()[1]
                with pytest.raises(HandshakeError, match=message):
                    async with open_websocket(f"ws://127.0.0.1:{port}/ws"):
                        pass
            nursery.cancel_scope.cancel()


@pytest.mark.parametrize(
    ("url", "kwargs", "message"),
    [
        ("http://127.0.0.1:1/", {}, "url must start with ws:// or wss://"),
        ("ws://127.0.0.1:1/", {"max_message_size": 0}, "max_message_size must be >= 1"),
    ],
)
async def test_bad_arguments_are_named(url: str, kwargs: dict[str, int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        async with open_websocket(url, **kwargs):  # type: ignore[arg-type]  # ints only
            pass


@pytest.fixture
def certificate(tmp_path: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1, made now (so it is valid now)."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is needed to make a test certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-nodes", "-days", "2", "-subj", "/CN=localhost"),
            *("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"),
            *("-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)),
        ],
        check=True,
        capture_output=True,
        timeout=30,
    )
    return cert, key


async def test_wss_uses_tls_and_checks_the_certificate(certificate: tuple[Path, Path]) -> None:
    cert, key = certificate
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(cert, key)
    trusting = ssl.create_default_context(cafile=str(cert))

    async def handler(peer: Peer) -> None:
        await peer.send(TextMessage(data="secret"))
        await peer.events_until_eof()

    with trio.fail_after(10):
        async with websocket_server(handler, secure=server_context) as url:
            async with open_websocket(url, ssl_context=trusting) as ws:
                assert await ws.receive_messages() == ["secret"]
            with pytest.raises(HandshakeError, match="certificate verify failed"):
                async with open_websocket(url):  # the system's CAs do not know it
                    pass
