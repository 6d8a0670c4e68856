"""The market feed: decoding, malformed frames, reconnects with gaps counted, publishing."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from typing import Any

import pytest
import trio
import trio_websocket
from hypothesis import given
from hypothesis import strategies as st
from wsproto.events import CloseConnection, Event, Ping, TextMessage

import engine
from engine.bus import MemoryBus
from services.market._events import (
    KINDS,
    AggTrade,
    BookTicker,
    DepthUpdate,
    Kline,
    MalformedMessage,
    Trade,
    decode,
    normalise,
)
from services.market._wsclient import ConnectionClosed
from services.market.feed import Feed, FeedConfig, FeedDisconnected
from services.market.simulator import SimulatorConfig, serve_simulator
from tests.test_wsclient import Peer, websocket_server


def trade(symbol: str, trade_id: int, price: str = "100.5") -> str:
    data = {"e": "trade", "E": 1, "s": symbol, "t": trade_id, "p": price, "q": "0.2", "T": 2}
    data |= {"m": False, "M": True}
    return json.dumps({"stream": f"{symbol.lower()}@trade", "data": data})


def book(symbol: str) -> str:
    data = {"u": 7, "s": symbol, "b": "99.5", "B": "1", "a": "100.5", "A": "2"}
    return json.dumps({"stream": f"{symbol.lower()}@bookTicker", "data": data})


def test_decode_every_stream_kind() -> None:
    assert decode(trade("BTCUSDT", 5)) == (
        "btcusdt@trade",
        Trade(E=1, s="BTCUSDT", t=5, p="100.5", q="0.2", T=2, m=False),
    )
    assert isinstance(decode(book("ETHUSDT"))[1], BookTicker)
    agg = {"e": "aggTrade", "E": 1, "s": "X", "a": 1, "p": "1", "q": "1", "f": 1, "l": 2, "T": 3}
    assert isinstance(
        decode(json.dumps({"stream": "x@aggTrade", "data": agg | {"m": True}}))[1], AggTrade
    )
    depth = {"e": "depthUpdate", "E": 1, "s": "X", "U": 1, "u": 2, "b": [["1", "2"]], "a": []}
    assert isinstance(
        decode(json.dumps({"stream": "x@depth@100ms", "data": depth}))[1], DepthUpdate
    )
    k = {"t": 0, "T": 59_999, "s": "X", "i": "1m", "o": "1", "c": "2", "h": "3", "l": "0.5"}
    k |= {"v": "10", "n": 4, "x": False}
    event = decode(
        json.dumps({"stream": "x@kline_1m", "data": {"e": "kline", "E": 1, "s": "X", "k": k}})
    )[1]
    assert isinstance(event, Kline)
    assert normalise(event) == (
        "klines.X",
        b'{"type":"kline","symbol":"X","time":59999,"price":2.0,"qty":10.0,"open":1.0,'
        b'"high":3.0,"low":0.5,"trades":4,"closed":false,"interval":"1m","start":0}',
    )


@pytest.mark.parametrize(
    ("frame", "message"),
    [
        ("{truncated", "malformed"),
        ('{"stream": "btcusdt@trade", "data": {"s": "BTCUSDT"}}', "missing required field"),
        ('{"stream": "btcusdt@nonsense", "data": {}}', "unknown stream kind"),
        ('{"stream": "nostream", "data": {}}', "not a stream name"),
        ('{"stream": "x@trade", "data": {"E": 1, "s": "X", "t": "one"}}', "Expected `int`"),
    ],
)
def test_malformed_frames_raise_the_typed_error(frame: str, message: str) -> None:
    with pytest.raises(MalformedMessage, match=message):
        decode(frame)


@given(st.one_of(st.text(), st.binary()))
def test_decode_never_raises_anything_but_malformed(frame: str | bytes) -> None:
    with contextlib.suppress(MalformedMessage):  # anything else fails the test
        decode(frame)


class FakeExchange:
    """A WebSocket server that plays a script of frames per connection, then drops it."""

    def __init__(self, scripts: list[list[str]]) -> None:
        self.scripts = scripts
        self.connections = 0
        self.paths: list[str] = []

    async def handler(self, request: trio_websocket.WebSocketRequest) -> None:
        self.paths.append(request.path)
        ws = await request.accept()
        script = self.scripts[min(self.connections, len(self.scripts) - 1)]
        self.connections += 1
        for frame in script:
            await ws.send_message(frame)
        if self.connections < len(self.scripts):
            await ws.aclose(code=1001, reason="exchange restarting")  # the drop
        else:
            await trio.sleep_forever()


async def run_until(predicate: Callable[[], bool]) -> None:
    while not predicate():  # noqa: ASYNC110 -- real sockets; no event to wait on
        await trio.sleep(0.01)


async def test_feed_publishes_reconnects_and_counts_gaps_and_malformed_frames() -> None:
    exchange = FakeExchange(
        [
            [trade("BTCUSDT", i) for i in range(1, 6)] + ["{broken", book("BTCUSDT")],
            [trade("BTCUSDT", 9), trade("BTCUSDT", 10)],  # 6, 7 and 8 were missed
        ]
    )
    bus = MemoryBus()
    published: list[Any] = []
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            server = await nursery.start(
                trio_websocket.serve_websocket, exchange.handler, "127.0.0.1", 0, None
            )
            port = server.port
            config = FeedConfig(f"ws://127.0.0.1:{port}", ["BTCUSDT"], processors=2)
            feed = Feed(config, bus)
            async with bus.subscribe(">", maxsize=100) as everything:

                async def collect() -> None:
                    async for message in everything:
                        published.append((message.topic, json.loads(message.data)))

                nursery.start_soon(collect)
                async with engine.open_supervisor(name="market", max_restarts=10) as sup:
                    await sup.start(feed.process, name="processors")
                    sup.start_soon(
                        feed.connect,
                        name="feed",
                        reports_ready=True,
                        backoff=engine.Backoff(initial=0.01, jitter=0),
                    )
                    await run_until(lambda: len(published) == 8)
                    sup.cancel()
            nursery.cancel_scope.cancel()
    stats = feed.statistics()
    assert (stats.connections, stats.disconnects) == (2, 2)
    assert (stats.received, stats.malformed, stats.missing_trades, stats.published) == (
        9,
        1,
        3,
        8,
    )
    assert stats.malformed_samples == ("{broken",)
    assert (
        exchange.paths
        == [
            "/stream?streams=btcusdt@trade/btcusdt@aggTrade/btcusdt@bookTicker"
            "/btcusdt@depth/btcusdt@kline_1m/btcusdt@ticker/btcusdt@miniTicker/btcusdt@avgPrice"
        ]
        * 2
    )
    ids = sorted(body["id"] for topic, body in published if topic == "trades.BTCUSDT")
    assert ids == [1, 2, 3, 4, 5, 9, 10]
    assert (
        "book.BTCUSDT",
        {"type": "book", "symbol": "BTCUSDT", "time": 0, "bid": 99.5, "ask": 100.5, "id": 7},
    ) in published
    assert feed.queue.statistics().dropped == 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"url": "http://x"}, "url must start with ws://"),
        ({"symbols": []}, "symbols must be non-empty"),
        ({"symbols": ["BTC/USDT"]}, "alphanumeric"),
        ({"queue_size": 0}, "queue_size must be >= 1"),
        ({"processors": 0}, "processors must be >= 1"),
    ],
)
def test_feed_config_rejects_bad_values(kwargs: dict[str, Any], message: str) -> None:
    options: dict[str, Any] = {"url": "ws://127.0.0.1:1", "symbols": ["BTCUSDT"]} | kwargs
    with pytest.raises(ValueError, match=message):
        FeedConfig(**options)


# -- the connection: keepalive, closes, the queue's policy, the real simulator ----------


def trades(symbol: str, first: int, count: int) -> list[str]:
    return [trade(symbol, first + i) for i in range(count)]


async def test_an_unanswered_ping_ends_the_connection_and_the_supervisor_reconnects(
    autojump_clock: trio.abc.Clock,
) -> None:
    connected_at: list[float] = []
    seen: dict[int, list[Event]] = {}

    async def silent(peer: Peer) -> None:  # reads everything, answers nothing
        connection = len(connected_at)
        connected_at.append(trio.current_time())
        seen[connection] = await peer.events_until_eof()

    async with websocket_server(silent) as url:
        feed = Feed(FeedConfig(url, ["BTCUSDT"], ping_interval=5), MemoryBus())
        started = trio.current_time()
        with pytest.raises(FeedDisconnected, match="1011 keepalive ping unanswered") as info:
            await feed.connect()
        # A ping after 5 s, unanswered for 5 s more: dropped at exactly 10 s.
        assert trio.current_time() - started == 10
        assert isinstance(info.value.__cause__, ConnectionClosed)
        async with engine.open_supervisor(name="market", max_restarts=5) as sup:
            sup.start_soon(
                feed.connect,
                name="feed",
                reports_ready=True,
                backoff=engine.Backoff(initial=1, jitter=0),
            )
            while len(connected_at) < 3:  # noqa: ASYNC110 -- virtual time; a counter
                await trio.sleep(1)
            sup.cancel()
    # Connected at 0, dropped at 10; reconnected at once, dropped at 20; the
    # backoff's first delay; reconnected at 21.
    assert [t - started for t in connected_at] == [0, 10, 21]
    assert [type(e) for e in seen[0]] == [Ping, CloseConnection]  # the close: no wait
    assert seen[0][1] == CloseConnection(code=1011, reason="keepalive ping unanswered")
    stats = feed.statistics()
    assert (stats.connections, stats.disconnects, stats.connected) == (3, 3, False)


async def test_a_server_close_is_a_disconnect_and_the_socket_is_closed() -> None:
    seen: list[object] = []
    done = trio.Event()

    async def closing(peer: Peer) -> None:
        await peer.send(
            TextMessage(data=trade("BTCUSDT", 1)), CloseConnection(code=1001, reason="restart")
        )
        seen.extend(await peer.events_until_eof())
        seen.append("socket closed")
        done.set()

    with trio.fail_after(10):
        async with websocket_server(closing) as url:
            feed = Feed(FeedConfig(url, ["BTCUSDT"]), MemoryBus())
            with pytest.raises(FeedDisconnected, match="1001 restart") as info:
                await feed.connect()
            await done.wait()
    assert isinstance(info.value.__cause__, ConnectionClosed)
    assert seen == [CloseConnection(code=1001, reason="restart"), "socket closed"]
    stats = feed.statistics()
    assert (stats.received, stats.connections, stats.disconnects) == (1, 1, 1)


@pytest.mark.parametrize(
    ("overflow", "depth", "dropped", "waiting"),
    [("drop_newest", 3, 7, 0), ("drop_oldest", 3, 7, 0), ("block", 3, 0, 1)],
)
async def test_a_read_is_queued_by_the_overflow_policy(
    overflow: str, depth: int, dropped: int, waiting: int
) -> None:
    async def burst(peer: Peer) -> None:
        await peer.send(*(TextMessage(data=t) for t in trades("BTCUSDT", 1, 10)))
        await peer.events_until_eof()

    bus = MemoryBus()
    with trio.fail_after(10):
        async with websocket_server(burst) as url, trio.open_nursery() as nursery:
            feed = Feed(FeedConfig(url, ["BTCUSDT"], queue_size=3, overflow=overflow), bus)
            async with bus.subscribe(">", maxsize=100) as everything:
                await nursery.start(feed.connect)
                while feed.statistics().received < 10:
                    await trio.testing.wait_all_tasks_blocked()
                await trio.testing.wait_all_tasks_blocked()
                queue = feed.queue.statistics()
                assert (queue.depth, queue.dropped, queue.senders_waiting) == (
                    depth,
                    dropped,
                    waiting,
                )
                await nursery.start(feed.process)  # the processors drain it
                published = [
                    json.loads((await everything.__anext__()).data) for _ in range(10 - dropped)
                ]
            nursery.cancel_scope.cancel()
    ids = [body["id"] for body in published]
    expected = {"drop_newest": [1, 2, 3], "drop_oldest": [8, 9, 10], "block": list(range(1, 11))}
    assert ids == expected[overflow]
    assert feed.statistics().published == 10 - dropped


async def test_a_number_that_is_not_one_is_malformed_not_fatal() -> None:
    async def script(peer: Peer) -> None:
        await peer.send(
            TextMessage(data=trade("BTCUSDT", 1, price="lots")),
            TextMessage(data=trade("BTCUSDT", 2)),
        )
        await peer.events_until_eof()

    bus = MemoryBus()
    with trio.fail_after(10):
        async with websocket_server(script) as url, trio.open_nursery() as nursery:
            feed = Feed(FeedConfig(url, ["BTCUSDT"]), bus)
            async with bus.subscribe(">", maxsize=100) as everything:
                await nursery.start(feed.process)
                await nursery.start(feed.connect)
                message = await everything.__anext__()
            nursery.cancel_scope.cancel()
    assert json.loads(message.data)["id"] == 2
    stats = feed.statistics()
    assert (stats.received, stats.malformed, stats.published) == (2, 1, 1)
    assert "lots" in stats.malformed_samples[0]


async def test_every_stream_of_the_simulator_arrives_typed_and_published() -> None:
    symbols = ("BTCUSDT", "ETHUSDT")
    bus = MemoryBus()
    kinds: dict[str, int] = {}
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            simulator = await nursery.start(
                serve_simulator, SimulatorConfig(symbols=symbols, rate=20_000)
            )
            feed = Feed(FeedConfig(simulator.address.ws_url, symbols), bus)
            async with bus.subscribe(">", maxsize=10_000) as everything:
                await nursery.start(feed.process)
                await nursery.start(feed.connect)
                while (count := sum(kinds.values())) < 2_000:
                    for message in await everything.receive_batch(2_000 - count):
                        kinds[message.topic] = kinds.get(message.topic, 0) + 1
            nursery.cancel_scope.cancel()
    assert set(kinds) == {f"{p}.{s}" for p in KINDS for s in symbols}
    assert set(kinds.values()) == {125}  # message i goes to stream i mod 16
    stats = feed.statistics()
    assert (stats.malformed, stats.missing_trades) == (0, 0)
    assert feed.queue.statistics().dropped == 0


class AwaitingBus:
    """A bus with only ``publish`` (as the Redis and NATS adapters): every publish waits."""

    def __init__(self) -> None:
        self.published: list[tuple[str, int]] = []
        self.enough = trio.Event()

    async def publish(self, topic: str, data: bytes, *, msg_id: str | None = None) -> None:
        await trio.sleep(0.001)  # a round trip to a broker
        self.published.append((topic, json.loads(data)["id"]))
        if len(self.published) == 5:
            self.enough.set()


async def test_a_bus_that_waits_gets_every_event_published(autojump_clock: trio.abc.Clock) -> None:
    async def script(peer: Peer) -> None:
        await peer.send(*(TextMessage(data=t) for t in trades("ETHUSDT", 1, 5)))
        await peer.events_until_eof()

    bus = AwaitingBus()
    async with websocket_server(script) as url, trio.open_nursery() as nursery:
        feed = Feed(FeedConfig(url, ["ETHUSDT"], processors=1), bus)  # type: ignore[arg-type]  # a partial Bus
        await nursery.start(feed.process)
        await nursery.start(feed.connect)
        await bus.enough.wait()
        nursery.cancel_scope.cancel()
    assert bus.published == [("trades.ETHUSDT", i) for i in range(1, 6)]
    assert feed.statistics().published == 5
