"""The feed with control frames: replies counted apart, a shutdown notice renews the connection."""

from __future__ import annotations

import json
from typing import Any

import pytest
import trio
import trio_websocket

import engine
from engine.bus import MemoryBus
from services.market._events import Market
from services.market.feed import Feed, FeedConfig
from tests.test_feed import FakeExchange, run_until, trade

SHUTDOWN = json.dumps({"stream": "!serverShutdown", "data": {"e": "serverShutdown", "E": 1}})
REPLY = json.dumps({"result": None, "id": 1})
REFUSED = json.dumps({"error": {"code": 2, "msg": "Invalid request"}, "id": 2})


async def run_feed(exchange: FakeExchange, done: Any, **options: Any) -> Feed:
    bus = MemoryBus()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            server = await nursery.start(
                trio_websocket.serve_websocket, exchange.handler, "127.0.0.1", 0, None
            )
            config = FeedConfig(f"ws://127.0.0.1:{server.port}", ["BTCUSDT"], **options)
            feed = Feed(config, bus)
            async with engine.open_supervisor(name="market", max_restarts=10) as sup:
                await sup.start(feed.process, name="processors")
                sup.start_soon(
                    feed.connect,
                    name="feed",
                    reports_ready=True,
                    backoff=engine.Backoff(initial=5, jitter=0),  # a restart would time out
                )
                await run_until(lambda: done(feed.statistics()))
                sup.cancel()
            nursery.cancel_scope.cancel()
    return feed


async def test_replies_are_counted_as_control_not_malformed() -> None:
    exchange = FakeExchange([[trade("BTCUSDT", 1), REPLY, REFUSED, trade("BTCUSDT", 2)]])
    feed = await run_feed(exchange, lambda s: s.published == 2)
    stats = feed.statistics()
    assert (stats.received, stats.control, stats.malformed, stats.published) == (4, 2, 0, 2)
    assert feed.in_flight() == 0


async def test_a_shutdown_notice_renews_the_connection_at_once() -> None:
    # The exchange stays with the second connection; a restart by the
    # supervisor (backoff 5 s) would not be in time.
    exchange = FakeExchange(
        [[trade("BTCUSDT", 1), trade("BTCUSDT", 2), SHUTDOWN], [trade("BTCUSDT", 3)]]
    )
    feed = await run_feed(exchange, lambda s: s.published == 3)
    stats = feed.statistics()
    assert (stats.connections, stats.renewals, stats.control) == (2, 1, 1)
    assert (stats.missing_trades, stats.malformed) == (0, 0)


async def test_a_connection_is_renewed_after_renew_after() -> None:
    exchange = FakeExchange([[trade("BTCUSDT", 1)]])  # never closed by the exchange
    feed = await run_feed(exchange, lambda s: s.published >= 3, renew_after=0.05)
    stats = feed.statistics()
    assert stats.connections >= 3
    assert stats.renewals >= 2
    assert stats.disconnects >= stats.renewals
    assert (stats.malformed, stats.control) == (0, 0)


def test_the_url_selects_the_market() -> None:
    assert FeedConfig("wss://fstream.binance.com", ["BTCUSDT"]).market is Market.USDM
    assert FeedConfig("wss://stream.binance.com:9443", ["BTCUSDT"]).market is Market.SPOT
    with pytest.raises(ValueError, match="COIN-M"):
        FeedConfig("wss://dstream.binance.com", ["BTCUSDT"])
    with pytest.raises(ValueError, match="renew_after must be > 0"):
        FeedConfig("wss://stream.binance.com", ["BTCUSDT"], renew_after=0)
