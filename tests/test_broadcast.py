"""The broadcast server over real sockets: topics, slow clients, limits, auth, close codes."""

from __future__ import annotations

import json
import math
import re
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, cast

import pytest
import trio
import trio.testing
from trio_websocket import ConnectionClosed, WebSocketConnection, wrap_client_stream
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    CloseConnection,
    Event,
    Message,
    Ping,
    RejectConnection,
    Request,
)

import engine
from engine.broadcast import (
    CLOSE_GOING_AWAY,
    CLOSE_PING_TIMEOUT,
    CLOSE_TOO_BIG,
    CLOSE_TOO_SLOW,
    BroadcastConfig,
    BroadcastServer,
    serve_broadcast,
)
from engine.broadcast._client import Client
from engine.broadcast._topics import expand, parse_pattern, parse_request
from engine.bus import MemoryBus

ROOT = Path(__file__).resolve().parent.parent
GUARD = 10  # seconds: an absolute bound on every real-socket test
VIRTUAL_GUARD = 1000  # the same under the autojump clock, where time only jumps when idle

UNIVERSE = ("book.BTCUSDT", "trades.BTCUSDT", "trades.ETHUSDT", "book.ETHUSDT", "klines.BTCUSDT")


@asynccontextmanager
async def serving(**options: Any) -> AsyncIterator[tuple[BroadcastServer, MemoryBus]]:
    """A broadcast server on 127.0.0.1 port 0 over a MemoryBus; cancelled at the end."""
    options.setdefault("ping_interval", math.inf)
    bus = MemoryBus()
    async with trio.open_nursery() as nursery:
        server = await nursery.start(serve_broadcast, bus, BroadcastConfig(**options))
        yield server, bus
        nursery.cancel_scope.cancel()


class RawClient:
    """A client that does only what a test tells it: wsproto on a bare TCP stream."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.ws = WSConnection(ConnectionType.CLIENT)

    async def upgrade(self, target: str = "/ws") -> Event:
        await self.stream.send_all(self.ws.send(Request(host="127.0.0.1", target=target)))
        return (await self.events(until=(AcceptConnection, RejectConnection)))[-1]

    async def events(self, until: tuple[type[Event], ...] = ()) -> list[Event]:
        """Events until one of ``until`` arrives, or until the server closes TCP."""
        seen: list[Event] = []
        while data := await self.stream.receive_some(65536):
            self.ws.receive_data(data)
            for event in self.ws.events():
                seen.append(event)
                if isinstance(event, until):
                    return seen
        return seen


@asynccontextmanager
async def raw_client(port: int, *, receive_buffer: int | None = None) -> AsyncIterator[RawClient]:
    """A :class:`RawClient` connected to ``port``, closed at the end."""
    sock = trio.socket.socket()
    if receive_buffer is not None:  # set before connecting, so the window stays small
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    async with trio.SocketStream(sock) as stream:
        await sock.connect(("127.0.0.1", port))
        yield RawClient(stream)


@asynccontextmanager
async def ws_client(
    server: BroadcastServer, query: str = "", **options: Any
) -> AsyncIterator[WebSocketConnection]:
    """A trio-websocket client on a TCP stream the test owns and closes.

    (trio-websocket 0.12 leaves its socket open when the server closes first,
    or refuses the upgrade; ``open_websocket_url`` would leak it.)
    """
    async with raw_client(server.port) as raw, trio.open_nursery() as nursery:
        target = server.config.path + query
        ws = await wrap_client_stream(nursery, raw.stream, "127.0.0.1", target, **options)
        try:
            yield ws
        finally:
            await ws.aclose()


def close_of(error: ConnectionClosed) -> tuple[int, str | None]:
    """The close code and reason a trio-websocket client received."""
    assert error.reason is not None
    return error.reason.code, error.reason.reason


async def publish_all(bus: MemoryBus, topics: tuple[str, ...]) -> None:
    for topic in topics:
        await bus.publish(topic, topic.encode())


# -- configuration and topic rules --------------------------------------------


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"port": 70000}, "port"),
        ({"max_clients": 0}, "max_clients"),
        ({"queue_size": 0}, "queue_size"),
        ({"max_lost": -1}, "max_lost"),
        ({"max_inbound_size": 0}, "max_inbound_size"),
        ({"ping_timeout": math.inf}, "ping_timeout"),
        ({"close_timeout": 0}, "close_timeout"),
        ({"path": "ws"}, "path"),
        ({"bus_topics": ("trades",)}, "bus_topics"),
        ({"frame": "json"}, "frame"),
        ({"allowed_origins": ("",)}, "allowed_origins"),
        ({"token": "two words"}, "token"),
    ],
)
def test_config_rejects_bad_settings_by_name(options: dict[str, Any], named: str) -> None:
    with pytest.raises(ValueError, match=named):
        BroadcastConfig(**options)


def test_config_hides_the_token() -> None:
    assert "s3cret" not in repr(BroadcastConfig(token="s3cret"))


@pytest.mark.parametrize(
    ("topics", "symbols", "patterns"),
    [
        (["trades"], [], ["trades.>"]),
        (["trades.BTCUSDT", "book.*"], [], ["trades.BTCUSDT", "book.*"]),
        (["trades", "book"], ["BTCUSDT"], ["trades.BTCUSDT", "book.BTCUSDT"]),
        ([], ["ETHUSDT"], ["*.ETHUSDT"]),
        ([">"], [], [">"]),
        (["trades", "trades.>"], [], ["trades.>"]),
    ],
)
def test_topics_expand(topics: list[str], symbols: list[str], patterns: list[str]) -> None:
    assert expand(topics, symbols, limit=64) == patterns


@pytest.mark.parametrize("bad", ["", "a..b", "trades.>.x", "tr*des", "a b", "x" * 201, 7])
def test_bad_patterns_are_refused(bad: object) -> None:
    with pytest.raises(ValueError, match="topic"):
        parse_pattern(bad)


@pytest.mark.parametrize(
    ("message", "error"),
    [
        ("not json", "JSON object"),
        ("[1]", "JSON object"),
        ('{"op": "publish", "topics": ["a"]}', "op must be"),
        ('{"op": "subscribe"}', "at least one topic"),
        ('{"op": "subscribe", "topics": "trades"}', "lists of strings"),
        ('{"op": "subscribe", "topics": ["a b"]}', "printable ASCII"),
        ('{"op": "subscribe", "topics": ["a"], "id": [1]}', "id must be"),
    ],
)
def test_bad_requests_say_why(message: str, error: str) -> None:
    with pytest.raises(ValueError, match=re.escape(error)):
        parse_request(message, BroadcastConfig().topic_rules)


# -- choosing topics ----------------------------------------------------------


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("?topics=trades", ["trades.BTCUSDT", "trades.ETHUSDT"]),
        ("?topics=trades.BTCUSDT", ["trades.BTCUSDT"]),
        ("?symbols=ETHUSDT", ["trades.ETHUSDT", "book.ETHUSDT"]),
        ("?topics=book,klines&symbols=BTCUSDT", ["book.BTCUSDT", "klines.BTCUSDT"]),
        (
            "?topics=trades.*&topics=book.ETHUSDT",
            ["trades.BTCUSDT", "trades.ETHUSDT", "book.ETHUSDT"],
        ),
        ("?topics=>", list(UNIVERSE)),
    ],
)
async def test_query_string_selects_topics(query: str, expected: list[str]) -> None:
    with trio.fail_after(GUARD):
        async with serving() as (server, bus), ws_client(server, query) as ws:
            await publish_all(bus, UNIVERSE)
            await publish_all(bus, (expected[0],))  # anything unwanted would come before this
            got = [await ws.get_message() for _ in range(len(expected) + 1)]
            assert got == [*expected, expected[0]]
            topics = tuple(expand(*_query_lists(query), limit=64))
            assert server.statistics().connections[0].topics == topics


def _query_lists(query: str) -> tuple[list[str], list[str]]:
    from engine.broadcast._topics import parse_target

    target = parse_target("/ws" + query)
    return list(target.topics), list(target.symbols)


async def test_subscribe_and_unsubscribe_messages_change_topics() -> None:
    with trio.fail_after(GUARD):
        async with serving() as (server, bus), ws_client(server) as ws:
            await bus.publish("trades.ETHUSDT", b"before anyone asked")
            await trio.testing.wait_all_tasks_blocked()  # dispatched, to nobody
            request = {"op": "subscribe", "topics": ["trades"], "symbols": ["ETHUSDT"], "id": 1}
            await ws.send_message(json.dumps(request))
            ack = {"op": "subscribed", "id": 1, "topics": ["trades.ETHUSDT"]}
            assert json.loads(await ws.get_message()) == ack
            await publish_all(bus, ("trades.BTCUSDT", "trades.ETHUSDT"))
            assert await ws.get_message() == "trades.ETHUSDT"

            await ws.send_message(json.dumps({"op": "subscribe", "topics": ["book.*"]}))
            assert json.loads(await ws.get_message())["topics"] == ["trades.ETHUSDT", "book.*"]
            await ws.send_message(json.dumps({"op": "unsubscribe", "topics": ["trades.ETHUSDT"]}))
            assert json.loads(await ws.get_message()) == {
                "op": "unsubscribed",
                "topics": ["book.*"],
            }
            await publish_all(bus, ("trades.ETHUSDT", "book.BTCUSDT"))
            assert await ws.get_message() == "book.BTCUSDT"
            # The first message, trades.BTCUSDT, and trades.ETHUSDT once unsubscribed.
            assert server.statistics().unrouted == 3


async def test_malformed_requests_get_an_error_and_the_connection_stays() -> None:
    with trio.fail_after(GUARD):
        async with serving(max_topics=2) as (server, bus), ws_client(server) as ws:
            await ws.send_message("not json")
            assert json.loads(await ws.get_message()) == {
                "op": "error",
                "error": "a request must be a JSON object",
            }
            await ws.send_message(json.dumps({"op": "subscribe", "topics": ["a b"], "id": "x"}))
            reply = json.loads(await ws.get_message())
            assert (reply["op"], reply["id"]) == ("error", "x")
            await ws.send_message(json.dumps({"op": "subscribe", "topics": ["a", "b", "c"]}))
            assert "at most 2 topics" in json.loads(await ws.get_message())["error"]
            await ws.send_message(b'{"op": "subscribe", "topics": ["trades"]}')  # binary is fine
            assert json.loads(await ws.get_message())["op"] == "subscribed"
            await bus.publish("trades.BTCUSDT", b"still here")
            assert await ws.get_message() == "still here"


async def test_a_message_matching_several_patterns_is_sent_once() -> None:
    with trio.fail_after(GUARD):
        async with (
            serving() as (server, bus),
            ws_client(server, "?topics=trades,trades.BTCUSDT,*.BTCUSDT") as ws,
        ):
            await publish_all(bus, ("trades.BTCUSDT", "book.BTCUSDT"))
            assert [await ws.get_message() for _ in range(2)] == ["trades.BTCUSDT", "book.BTCUSDT"]
            assert server.statistics().sent == 2


async def test_fragmented_requests_are_assembled_and_bounded() -> None:
    with trio.fail_after(GUARD):
        async with serving(max_inbound_size=60) as (server, _), raw_client(server.port) as raw:
            assert isinstance(await raw.upgrade(), AcceptConnection)
            request = json.dumps({"op": "subscribe", "topics": ["trades"]})
            for start in range(0, len(request), 10):
                part = request[start : start + 10]
                last = start + 10 >= len(request)
                await raw.stream.send_all(raw.ws.send(Message(data=part, message_finished=last)))
            reply = texts(await raw.events(until=(Message,)))
            assert json.loads(reply[0]) == {"op": "subscribed", "topics": ["trades.>"]}
            piece = Message(data="x" * 10, message_finished=False)
            for _ in range(7):  # 70 bytes in parts, over the limit of 60
                await raw.stream.send_all(raw.ws.send(piece))
            close = (await raw.events(until=(CloseConnection,)))[-1]
            assert isinstance(close, CloseConnection)
            assert (close.code, close.reason) == (CLOSE_TOO_BIG, "message over 60 bytes")


# -- slow clients -------------------------------------------------------------


async def test_slow_client_is_closed_while_a_fast_one_gets_every_message() -> None:
    payload = b"x" * 4000
    options = {"queue_size": 100, "max_lost": 10, "close_timeout": 30}
    with trio.fail_after(GUARD):
        async with (
            serving(**options) as (server, bus),
            ws_client(server, "?topics=trades") as fast,
            # The slow client reads nothing until the burst is over; its
            # socket's window is small, so the server's writes block soon.
            raw_client(server.port, receive_buffer=4096) as slow,
        ):
            assert isinstance(await slow.upgrade("/ws?topics=trades"), AcceptConnection)
            published = received = 0
            while not server.statistics().slow_disconnects:
                for _ in range(20):
                    await bus.publish("trades.BTCUSDT", f"{published:06d}".encode() + payload)
                    published += 1
                while received < published:  # the fast client keeps up: nothing is lost
                    assert await fast.get_message() == f"{received:06d}" + payload.decode()
                    received += 1
            assert published < 2000  # the slow client was cut off early, not at the end

            events = await slow.events(until=(CloseConnection,))
            close = events[-1]
            assert isinstance(close, CloseConnection)
            assert (close.code, close.reason) == (CLOSE_TOO_SLOW, "too slow: lost 11 messages")
            # What reached its socket before it was cut off, in order; what was
            # still queued was dropped (11, oldest first) or discarded at close.
            got = texts(events)
            assert got == [f"{i:06d}" + payload.decode() for i in range(len(got))]
            assert len(got) < published - 100
            await slow.stream.send_all(slow.ws.send(close.response()))
            assert await slow.events() == []  # the server closes TCP: the client is gone

            await bus.publish("trades.BTCUSDT", b"after")
            assert await fast.get_message() == "after"
            stats = server.statistics()
            assert stats.slow_disconnects == 1
            assert stats.disconnected == {"too_slow": 1}
            assert stats.clients == 1
            assert stats.connections[0].dropped == 0
            # The 11 lost to overflow; what was still queued at the close is
            # dropped too, as "closed".
            assert stats.dropped_by_reason["overflow"] == 11
            assert stats.dropped == 11 + stats.dropped_by_reason["closed"]
            assert stats.offered == stats.sent + stats.dropped + stats.queued
            assert stats.aborted == 0


async def test_a_reader_at_its_own_pace_gets_a_whole_burst_with_the_defaults() -> None:
    burst = 20_000
    received: list[str | bytes] = []
    with trio.fail_after(GUARD * 3):
        async with (
            serving(ping_interval=BroadcastConfig().ping_interval) as (server, bus),
            ws_client(server, "?topics=trades") as ws,
            trio.open_nursery() as nursery,
        ):
            assert server.config == BroadcastConfig(port=0)  # the defaults

            done = trio.Event()

            async def read() -> None:
                while len(received) <= burst:  # the burst, then the reply
                    received.append(await ws.get_message())
                    if len(received) % 10 == 0:  # far slower than the publisher
                        await trio.sleep(0.001)
                done.set()

            nursery.start_soon(read)
            for i in range(burst):
                await bus.publish("trades.BTCUSDT", b'{"trade": %d, "price": "64000.10"}' % i)
            await ws.send_message('{"op": "subscribe", "topics": ["book"]}')  # still open
            await done.wait()
            stats = server.statistics()
    messages = [json.loads(m) for m in received]
    # A reply overtakes the frames still queued: it is somewhere in the stream.
    assert [m["op"] for m in messages if "op" in m] == ["subscribed"]
    assert [m["trade"] for m in messages if "trade" in m] == list(range(burst))
    assert (stats.clients, stats.disconnected) == (1, {})
    assert (stats.slow_disconnects, stats.dropped_by_reason["overflow"]) == (0, 0)


async def test_a_client_that_stops_reading_is_closed_once_max_lag_behind(
    autojump_clock: trio.testing.MockClock,
) -> None:
    payload = b"x" * 4000
    options = {"close_timeout": 60}  # max_lag keeps its default
    with trio.fail_after(VIRTUAL_GUARD):
        async with (
            serving(**options) as (server, bus),
            raw_client(server.port, receive_buffer=4096) as slow,
        ):
            max_lag = server.config.max_lag
            assert max_lag == 10.0
            assert isinstance(await slow.upgrade("/ws?topics=trades"), AcceptConnection)
            # Until its writer is stuck on a full socket, with frames queued.
            # A pause after each frame lets the writer take it alone, so once the
            # socket is full one frame is in the stuck write and the rest wait.
            published = 0
            while server.statistics().connections[0].queued < 10:
                await bus.publish("trades.BTCUSDT", b"%06d" % published + payload)
                published += 1
                await trio.sleep(0.001)
            await trio.sleep(max_lag - 0.5)
            assert server.statistics().slow_disconnects == 0
            await trio.sleep(1.6)  # checked at least once a second
            assert server.statistics().slow_disconnects == 1
            assert server.statistics().connections[0].queued > 0  # its write is still stuck

            events = await slow.events(until=(CloseConnection,))
            close = events[-1]
            assert isinstance(close, CloseConnection)
            assert (close.code, close.reason) == (CLOSE_TOO_SLOW, "too slow: more than 10 s behind")
            got = texts(events)
            assert got == [f"{i:06d}" + payload.decode() for i in range(len(got))]
            stats = server.statistics()
            assert 0 < len(got) < published
            assert stats.disconnected == {"too_slow": 1}
            assert stats.dropped_by_reason["overflow"] == 0


def texts(events: list[Event]) -> list[str]:
    """The complete text messages among ``events`` (wsproto may split one into parts)."""
    done: list[str] = []
    parts: list[str] = []
    for event in events:
        if isinstance(event, Message):
            parts.append(event.data)
            if event.message_finished:
                done.append("".join(parts))
                parts = []
    return done


async def test_a_client_that_never_reads_is_dropped_after_close_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    options = {"queue_size": 10, "max_lost": 0, "close_timeout": 3}
    with trio.fail_after(VIRTUAL_GUARD):
        async with (
            serving(**options) as (server, bus),
            raw_client(server.port, receive_buffer=4096) as raw,
        ):
            assert isinstance(await raw.upgrade("/ws?topics=>"), AcceptConnection)
            while not server.statistics().slow_disconnects:
                await bus.publish("trades.BTCUSDT", b"x" * 4000)
            # Its writer is stuck on a full socket, so the close frame cannot go out.
            await trio.sleep(2.9)
            assert server.statistics().clients == 1
            await trio.sleep(0.2)
            stats = server.statistics()
            assert stats.clients == 0
            assert stats.disconnected == {"too_slow": 1}
            assert stats.aborted == 1


# -- limits, authentication, origins -------------------------------------------


async def rejection(port: int, target: str, headers: list[tuple[bytes, bytes]]) -> int | None:
    """The HTTP status an upgrade is refused with, or ``None`` if it is accepted.

    A wsproto client: trio-websocket 0.12 leaves its socket open when refused.
    """
    async with raw_client(port) as raw:
        request = Request(host="127.0.0.1", target=target, extra_headers=headers)
        await raw.stream.send_all(raw.ws.send(request))
        answer = (await raw.events(until=(AcceptConnection, RejectConnection)))[-1]
        if isinstance(answer, RejectConnection):
            return answer.status_code
        await raw.stream.send_all(raw.ws.send(CloseConnection(code=1000)))
        await raw.events(until=(CloseConnection,))
        return None


async def test_max_clients_answers_503() -> None:
    with trio.fail_after(GUARD):
        async with serving(max_clients=1) as (server, _), ws_client(server):
            assert await rejection(server.port, "/ws", []) == 503
            assert server.statistics().rejected == {"full": 1}


@pytest.mark.parametrize(
    ("target", "headers", "status"),
    [
        ("/ws", [], 401),
        ("/ws", [(b"Authorization", b"Bearer wrong")], 401),
        ("/ws?token=wrong", [], 401),
        ("/ws", [(b"Authorization", b"Basic s3cret")], 401),
        ("/ws", [(b"Authorization", b"Bearer s3cret")], None),
        ("/ws", [(b"authorization", b"bearer s3cret")], None),
        ("/ws?topics=trades&token=s3cret", [], None),
    ],
)
async def test_bearer_token(target: str, headers: list[tuple[bytes, bytes]], status: int) -> None:
    with trio.fail_after(GUARD):
        async with serving(token="s3cret") as (server, _):
            assert await rejection(server.port, target, headers) == status
            stats = server.statistics()
            assert stats.rejected == ({} if status is None else {"unauthorized": 1})
            assert stats.accepted == (status is None)


async def test_a_token_in_the_header_admits_a_real_client() -> None:
    with trio.fail_after(GUARD):
        async with serving(token="s3cret") as (server, bus):
            headers = [(b"Authorization", b"Bearer s3cret")]
            async with ws_client(server, "?topics=trades", extra_headers=headers) as ws:
                await bus.publish("trades.BTCUSDT", b"welcome")
                assert await ws.get_message() == "welcome"


@pytest.mark.parametrize(
    ("origin", "status"),
    [(b"https://dash.example", None), (b"https://evil.example", 403), (None, None)],
)
async def test_origin_allow_list(origin: bytes | None, status: int | None) -> None:
    headers = [] if origin is None else [(b"Origin", origin)]
    with trio.fail_after(GUARD):
        async with serving(allowed_origins=["https://dash.example"]) as (server, _):
            assert await rejection(server.port, "/ws", headers) == status
            stats = server.statistics()
            assert stats.rejected == ({} if status is None else {"origin": 1})


@pytest.mark.parametrize(
    ("target", "status", "reason"),
    [
        ("/other", 404, "not_found"),
        ("/ws?topics=a..b", 400, "bad_topics"),
        ("/ws?topics=a,b,c", 400, "too_many_topics"),
    ],
)
async def test_bad_requests_are_answered_with_http_errors(
    target: str, status: int, reason: str
) -> None:
    with trio.fail_after(GUARD):
        async with serving(max_topics=2) as (server, _), raw_client(server.port) as raw:
            answer = await raw.upgrade(target)
            assert isinstance(answer, RejectConnection)
            assert answer.status_code == status
            assert server.statistics().rejected == {reason: 1}


async def test_plain_http_is_refused_with_400() -> None:
    with trio.fail_after(GUARD):
        async with serving() as (server, _), raw_client(server.port) as raw:
            await raw.stream.send_all(b"GET /ws HTTP/1.1\r\nHost: x\r\n\r\n")
            response = b""
            while chunk := await raw.stream.receive_some(4096):
                response += chunk
            assert response.startswith(b"HTTP/1.1 400")
            assert server.statistics().rejected == {"bad_request": 1}


async def test_an_oversized_message_closes_with_1009() -> None:
    with trio.fail_after(GUARD):
        async with (
            serving(max_inbound_size=100) as (server, _),
            ws_client(server) as ws,
        ):
            await ws.send_message("x" * 101)
            with pytest.raises(ConnectionClosed) as closed:
                await ws.get_message()
            assert close_of(closed.value) == (CLOSE_TOO_BIG, "message over 100 bytes")
        assert server.statistics().disconnected == {"message_too_big": 1}


async def test_a_protocol_error_closes_with_1002() -> None:
    with trio.fail_after(GUARD):
        async with serving() as (server, _), raw_client(server.port) as raw:
            assert isinstance(await raw.upgrade(), AcceptConnection)
            await raw.stream.send_all(b"\x81\x05hello")  # unmasked: clients must mask
            events = await raw.events(until=(CloseConnection,))
            assert isinstance(events[-1], CloseConnection)
            assert events[-1].code == 1002
            assert await raw.events() == []  # then it closes TCP without waiting for us
            stats = server.statistics()
            assert stats.disconnected == {"protocol_error": 1}
            assert stats.aborted == 0


# -- time limits (virtual time, real sockets) ---------------------------------


async def test_unanswered_pings_close_with_1011(autojump_clock: trio.testing.MockClock) -> None:
    with trio.fail_after(VIRTUAL_GUARD):
        async with (
            serving(ping_interval=10, ping_timeout=5, close_timeout=2) as (server, _),
            raw_client(server.port) as raw,
        ):
            assert isinstance(await raw.upgrade(), AcceptConnection)
            start = trio.current_time()
            events = await raw.events()  # never answers: not the ping, not the close
            assert trio.current_time() - start == 10 + 5 + 2
            assert [type(e) for e in events] == [Ping, CloseConnection]
            close = events[1]
            assert isinstance(close, CloseConnection)
            assert (close.code, close.reason) == (CLOSE_PING_TIMEOUT, "keepalive ping timeout")
            stats = server.statistics()
            assert stats.disconnected == {"ping_timeout": 1}
            assert stats.aborted == 1


async def test_answered_pings_keep_a_quiet_client(autojump_clock: trio.testing.MockClock) -> None:
    with trio.fail_after(VIRTUAL_GUARD):
        async with (
            serving(ping_interval=10, ping_timeout=5) as (server, bus),
            ws_client(server, "?topics=trades") as ws,
        ):
            await trio.sleep(100)  # trio-websocket answers every ping by itself
            await bus.publish("trades.BTCUSDT", b"still subscribed")
            assert await ws.get_message() == "still subscribed"
            assert server.statistics().disconnected == {}


async def test_a_silent_connection_is_dropped_after_the_handshake_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(VIRTUAL_GUARD):
        async with (
            serving(handshake_timeout=7) as (server, _),
            raw_client(server.port) as raw,
        ):
            start = trio.current_time()
            assert await raw.stream.receive_some(4096) == b""
            assert trio.current_time() - start == 7
            assert server.statistics().rejected == {"handshake_timeout": 1}


# -- shutting down ------------------------------------------------------------


async def test_shutdown_closes_clients_with_1001() -> None:
    bus = MemoryBus()
    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery:
            scope = trio.CancelScope()

            async def run(task_status: trio.TaskStatus[BroadcastServer]) -> None:
                with scope:
                    await serve_broadcast(bus, BroadcastConfig(), task_status=task_status)

            server: BroadcastServer = await nursery.start(run)
            async with ws_client(server) as first, ws_client(server):
                scope.cancel()
                with pytest.raises(ConnectionClosed) as closed:
                    await first.get_message()
                assert close_of(closed.value) == (CLOSE_GOING_AWAY, "server shutting down")
        stats = server.statistics()
        assert stats.disconnected == {"shutdown": 2}
        assert stats.aborted == 0


async def test_close_waits_for_answers_and_abort_ends_the_wait(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(VIRTUAL_GUARD):
        async with (
            serving(close_timeout=3) as (server, _),
            raw_client(server.port) as mute,
            ws_client(server) as polite,
        ):
            assert isinstance(await mute.upgrade("/ws?topics=>"), AcceptConnection)
            server.close()
            # The polite client answers the close at once; the mute one never does.
            with pytest.raises(ConnectionClosed) as closed:
                await polite.get_message()
            assert close_of(closed.value) == (CLOSE_GOING_AWAY, "server shutting down")
            with trio.move_on_after(1):
                await server.wait_closed()
            assert server.statistics().clients == 1
            # A forced stop does not wait out the mute client's close_timeout.
            started = trio.current_time()
            server.abort()
            await server.wait_closed()
            assert trio.current_time() == started
            stats = server.statistics()
            assert (stats.clients, stats.aborted) == (0, 1)
            assert stats.disconnected == {"shutdown": 2}


async def test_serve_broadcast_returns_once_close_has_closed_every_client() -> None:
    bus = MemoryBus()
    returned_at: list[float] = []

    async def run(task_status: trio.TaskStatus[BroadcastServer]) -> None:
        await serve_broadcast(bus, BroadcastConfig(), task_status=task_status)
        returned_at.append(trio.current_time())

    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery:
            server: BroadcastServer = await nursery.start(run)
            async with ws_client(server, "?topics=trades") as ws:
                await bus.publish("trades.BTCUSDT", b"hello")
                assert await ws.get_message() == "hello"
                server.close()
                with pytest.raises(ConnectionClosed) as closed:
                    await ws.get_message()
                assert close_of(closed.value) == (CLOSE_GOING_AWAY, "server shutting down")
            await server.wait_closed()
        # The nursery exited without a cancel: serve_broadcast returned by itself.
        assert len(returned_at) == 1
        assert server.statistics().disconnected == {"shutdown": 1}


async def read_until_closed(ws: WebSocketConnection) -> tuple[list[str], ConnectionClosed]:
    """Every message until the connection closes, and how it closed."""
    got: list[str] = []
    while True:
        try:
            got.append(cast(str, await ws.get_message()))
        except ConnectionClosed as closed:
            return got, closed


async def test_close_hands_on_what_the_bus_held_before_the_close_frame() -> None:
    with trio.fail_after(GUARD):
        async with serving() as (server, bus), ws_client(server, "?topics=trades") as ws:
            await bus.publish("trades.BTCUSDT", b"first")
            assert await ws.get_message() == "first"
            # Published without a checkpoint: all still in the bus subscription's queue.
            for i in range(500):
                bus.publish_nowait("trades.BTCUSDT", b"%d" % i)
            server.close()
            got, closed = await read_until_closed(ws)
            assert close_of(closed) == (CLOSE_GOING_AWAY, "server shutting down")
            assert got == [str(i) for i in range(500)]
            stats = server.statistics()
            assert (stats.received, stats.sent, stats.dropped) == (501, 501, 0)


async def test_a_supervised_broadcast_drains_when_its_child_is_asked_to_stop() -> None:
    bus = MemoryBus()
    with trio.fail_after(GUARD):
        async with engine.open_supervisor() as sup:
            server = await sup.start(serve_broadcast, bus, BroadcastConfig(), name="broadcast")
            assert isinstance(server, BroadcastServer)
            async with ws_client(server, "?topics=trades") as ws:
                await bus.publish("trades.BTCUSDT", b"hello")
                assert await ws.get_message() == "hello"
                for i in range(100):
                    bus.publish_nowait("trades.BTCUSDT", b"%d" % i)
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(sup.shutdown)
                    got, closed = await read_until_closed(ws)
            assert close_of(closed) == (CLOSE_GOING_AWAY, "server shutting down")
            assert got == [str(i) for i in range(100)]
            report = await sup.shutdown()
        assert [(c.name, c.outcome) for c in report.children] == [("broadcast", "returned")]


async def test_serve_broadcast_returns_at_once_after_abort(
    autojump_clock: trio.testing.MockClock,
) -> None:
    bus = MemoryBus()
    with trio.fail_after(VIRTUAL_GUARD):
        async with trio.open_nursery() as nursery:
            server = await nursery.start(serve_broadcast, bus, BroadcastConfig(close_timeout=30))
            async with raw_client(server.port) as mute:
                assert isinstance(await mute.upgrade("/ws?topics=>"), AcceptConnection)
                started = trio.current_time()
                server.abort()
        assert trio.current_time() == started  # not close_timeout later
        assert server.statistics().clients == 0


async def test_the_bus_closing_ends_the_server() -> None:
    bus = MemoryBus()
    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery:
            server = await nursery.start(serve_broadcast, bus, BroadcastConfig())
            async with ws_client(server, "?topics=trades") as ws:
                await bus.publish("trades.BTCUSDT", b"last words")
                await bus.aclose()
                assert await ws.get_message() == "last words"
                with pytest.raises(ConnectionClosed) as closed:
                    await ws.get_message()
                assert close_of(closed.value) == (CLOSE_GOING_AWAY, "server shutting down")
        # the nursery exited: serve_broadcast returned by itself


# -- frames and statistics ----------------------------------------------------


async def test_text_frames_skip_payloads_that_are_not_utf8() -> None:
    with trio.fail_after(GUARD):
        async with (
            serving() as (server, bus),
            ws_client(server, "?topics=trades") as ws,
        ):
            await bus.publish("trades.BTCUSDT", b"\xff\xfe")
            await bus.publish("trades.BTCUSDT", b'{"ok": true}')
            assert await ws.get_message() == '{"ok": true}'
            stats = server.statistics()
            assert (stats.received, stats.invalid, stats.sent) == (2, 1, 1)


async def test_binary_frames_carry_any_bytes() -> None:
    with trio.fail_after(GUARD):
        async with (
            serving(frame="binary") as (server, bus),
            ws_client(server, "?topics=trades") as ws,
        ):
            await bus.publish("trades.BTCUSDT", b"\xff\xfe")
            assert await ws.get_message() == b"\xff\xfe"


async def test_statistics_count_frames_writes_and_departures() -> None:
    with trio.fail_after(GUARD):
        async with serving(bus_topics=["trades.>", "book.>"]) as (server, bus):
            async with ws_client(server, "?topics=trades,book") as ws:
                for index in range(50):
                    await bus.publish("trades.BTCUSDT" if index % 2 else "book.BTCUSDT", b"m")
                for _ in range(50):
                    assert await ws.get_message() == "m"
                await bus.publish("orders.X", b"not subscribed by the server")
                live = server.statistics()
                assert live.clients == 1
                assert live.connections[0].sent == 50
                assert live.connections[0].writes <= 50
            stats = server.statistics()
            assert (stats.peak_clients, stats.accepted) == (1, 1)
            assert (stats.received, stats.sent, stats.dropped) == (50, 50, 0)
            assert stats.disconnected == {"client_closed": 1}
            assert stats.bytes_sent > 50 * 3  # frames, and the close
            assert stats.url == server.url


# -- the docs page's example --------------------------------------------------


@pytest.mark.subprocess
def test_docs_example_runs() -> None:
    page = (ROOT / "docs" / "broadcast.md").read_text()
    match = re.search(r"<!-- example -->\n```python\n(.*?)```", page, re.DOTALL)
    assert match is not None, "docs/broadcast.md lost its example"
    result = subprocess.run(
        [sys.executable, "-c", match.group(1)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "fast got 300 of 300"
    assert lines[1].startswith("slow closed: 4000 too slow: lost ")
    assert lines[2].startswith("statistics: 1 slow disconnect(s)")


# -- queued covers the write under way ------------------------------------------
#
# A frame handed to the writer has left the queue but is not sent yet: queued
# still counts it, so queued + sent + dropped is every frame offered.


class _HeldWrite:
    """A client socket whose write is under way until the test ends it."""

    def __init__(self) -> None:
        self.socket = self  # for the client's peer name
        self.written: list[bytes] = []
        self.done = trio.Event()

    def getpeername(self) -> tuple[str, int]:
        return ("127.0.0.1", 1)

    async def send_all(self, data: bytes) -> None:
        self.written.append(data)  # a reader may have it from here on
        await self.done.wait()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        await trio.sleep_forever()


async def test_a_broadcast_client_counts_frames_as_queued_until_they_are_written() -> None:
    stream = _HeldWrite()
    config = BroadcastConfig(ping_interval=math.inf)
    client = Client(cast(trio.SocketStream, stream), config, 1, lambda _: None)
    client.open(("trades.>",))
    seen: list[tuple[int, int]] = []

    def look() -> None:
        stats = client.statistics()
        seen.append((stats.queued, stats.sent))

    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.run)
            await trio.testing.wait_all_tasks_blocked()  # the writer waits for frames
            client.offer(b"frame")
            look()  # handed to the waiting writer, which has not run yet
            await trio.testing.wait_all_tasks_blocked()
            look()  # being written
            stream.done.set()
            await trio.testing.wait_all_tasks_blocked()
            look()
            nursery.cancel_scope.cancel()
    assert stream.written == [b"frame"]
    assert seen == [(1, 0), (1, 0), (0, 1)]
