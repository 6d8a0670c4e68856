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

import engine
from engine.bus import MemoryBus
from services.market._events import (
    AggTrade,
    BookTicker,
    DepthUpdate,
    Kline,
    MalformedMessage,
    Trade,
    decode,
    normalise,
)
from services.market.feed import Feed, FeedConfig


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
        b'{"type":"kline","symbol":"X","time":59999,"price":2.0,"qty":10.0}',
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
            "/btcusdt@depth/btcusdt@kline_1m"
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
