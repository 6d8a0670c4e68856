"""Every stream kind and control frame, on Binance's own example payloads.

The payloads are in ``tests/data/binance/`` (its README names each one's
source): spot ones through the spot decoder, USDⓈ-M futures ones through the
futures decoder, each to its exact struct and published payload; control
frames to their exceptions. ``docs/formats.md`` shows what
``docs/examples/formats_example.py`` prints, and a test here holds it to that.
"""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.bus import MemoryBus
from services.market._events import (
    KINDS,
    AggTrade,
    AvgPrice,
    BookTicker,
    ControlFrame,
    DepthUpdate,
    Event,
    FuturesBookTicker,
    FuturesDepthUpdate,
    FuturesTrade,
    Kline,
    MalformedMessage,
    Market,
    MiniTicker,
    Normalised,
    ServerShutdown,
    SubscriptionReply,
    Ticker,
    Trade,
    decode,
    decoder_for,
    market_of,
    normalise,
    order_key,
    stream_kind,
)

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "tests" / "data" / "binance"

# file -> (stream name, struct, topic, published payload)
SPOT: dict[str, tuple[str, type[Event], str, dict[str, Any]]] = {
    "trade.json": (
        "bnbbtc@trade",
        Trade,
        "trades.BNBBTC",
        {"type": "trade", "symbol": "BNBBTC", "time": 1672515782136, "price": 0.001}
        | {"qty": 100.0, "id": 12345, "buyer_maker": True},
    ),
    "aggTrade.json": (
        "bnbbtc@aggTrade",
        AggTrade,
        "aggtrades.BNBBTC",
        {"type": "aggTrade", "symbol": "BNBBTC", "time": 1672515782136, "price": 0.001}
        | {"qty": 100.0, "id": 12345, "buyer_maker": True},
    ),
    "bookTicker.json": (
        "bnbusdt@bookTicker",
        BookTicker,
        "book.BNBUSDT",
        {"type": "book", "symbol": "BNBUSDT", "time": 0, "bid": 25.3519, "ask": 25.3652}
        | {"id": 400900217},
    ),
    "depthUpdate.json": (
        "bnbbtc@depth",
        DepthUpdate,
        "depth.BNBBTC",
        {"type": "depth", "symbol": "BNBBTC", "time": 1672515782136, "id": 160, "first_id": 157},
    ),
    "kline.json": (
        "bnbbtc@kline_1m",
        Kline,
        "klines.BNBBTC",
        {"type": "kline", "symbol": "BNBBTC", "time": 1672515839999, "price": 0.002}
        | {"qty": 1000.0, "open": 0.001, "high": 0.0025, "low": 0.0015, "trades": 100}
        | {"closed": False, "interval": "1m", "start": 1672515780000},
    ),
    "ticker.json": (
        "bnbbtc@ticker",
        Ticker,
        "tickers.BNBBTC",
        {"type": "ticker", "symbol": "BNBBTC", "time": 1672515782136, "price": 0.0025}
        | {"qty": 10000.0, "bid": 0.0024, "ask": 0.0026, "open": 0.001, "high": 0.0025}
        | {"low": 0.001, "quote_qty": 18.0, "change": 0.0015, "change_pct": 250.0}
        | {"trades": 18151},
    ),
    "miniTicker.json": (
        "bnbbtc@miniTicker",
        MiniTicker,
        "minitickers.BNBBTC",
        {"type": "miniTicker", "symbol": "BNBBTC", "time": 1672515782136, "price": 0.0025}
        | {"qty": 10000.0, "open": 0.001, "high": 0.0025, "low": 0.001, "quote_qty": 18.0},
    ),
    "avgPrice.json": (
        "btcusdt@avgPrice",
        AvgPrice,
        "avgprices.BTCUSDT",
        {"type": "avgPrice", "symbol": "BTCUSDT", "time": 1693907033000, "price": 25776.86}
        | {"interval": "5m"},
    ),
}
USDM: dict[str, tuple[str, type[Event], str, dict[str, Any]]] = {
    "trade.json": (
        "ethusdt@trade",
        FuturesTrade,
        "trades.ETHUSDT",
        {"type": "trade", "symbol": "ETHUSDT", "time": 1749354825200, "price": 10000.19}
        | {"qty": 0.239, "id": 1000000000, "buyer_maker": True, "trade_type": "MARKET"},
    ),
    "aggTrade.json": (
        "btcusdt@aggTrade",
        AggTrade,
        "aggtrades.BTCUSDT",
        {"type": "aggTrade", "symbol": "BTCUSDT", "time": 123456785, "price": 0.001}
        | {"qty": 100.0, "id": 5933014, "buyer_maker": True},
    ),
    "bookTicker.json": (
        "bnbusdt@bookTicker",
        FuturesBookTicker,
        "book.BNBUSDT",
        {"type": "book", "symbol": "BNBUSDT", "time": 1568014460891, "bid": 25.3519}
        | {"ask": 25.3652, "id": 400900217},
    ),
    "depthUpdate.json": (
        "btcusdt@depth",
        FuturesDepthUpdate,
        "depth.BTCUSDT",
        {"type": "depth", "symbol": "BTCUSDT", "time": 123456789, "id": 160, "first_id": 157}
        | {"prev_id": 149},
    ),
}
# Control frames, sent whole: file -> what decoding one raises.
CONTROL: dict[str, ControlFrame] = {
    "reply_subscribe.json": SubscriptionReply(1, None),
    "reply_list_subscriptions.json": SubscriptionReply(3, ["btcusdt@aggTrade"]),
    "reply_get_property.json": SubscriptionReply(2, True),
    "reply_error.json": SubscriptionReply(5, error="code 0: Unknown property"),
    "serverShutdown.json": ServerShutdown(1770123456789),
    "serverShutdown_combined.json": ServerShutdown(1770123456789),
}


def combined(market: str, name: str, stream: str) -> bytes:
    data = json.loads((DATA / market / name).read_text())
    return json.dumps({"stream": stream, "data": data}).encode()


def test_every_sample_is_tested_and_has_its_source_named() -> None:
    assert {p.name for p in (DATA / "spot").glob("*.json")} == set(SPOT) | set(CONTROL)
    assert {p.name for p in (DATA / "usdm").glob("*.json")} == set(USDM)
    readme = (DATA / "README.md").read_text(encoding="utf-8")
    for name in [*SPOT, *CONTROL, *USDM]:
        assert f"`{name}`" in readme


@pytest.mark.parametrize("name", sorted(SPOT))
def test_spot_samples_decode_whole_and_publish_their_shape(name: str) -> None:
    stream, cls, topic, payload = SPOT[name]
    got_stream, event = decode(combined("spot", name, stream))
    assert got_stream == stream
    assert type(event) is cls
    got_topic, data = normalise(event)
    assert got_topic == topic
    assert json.loads(data) == payload
    assert list(json.loads(data))[:3] == ["type", "symbol", "time"]  # the common part first


@pytest.mark.parametrize("name", sorted(USDM))
def test_futures_samples_decode_whole_and_publish_their_extra_fields(name: str) -> None:
    stream, cls, topic, payload = USDM[name]
    got_stream, event = decoder_for(Market.USDM)(combined("usdm", name, stream))
    assert got_stream == stream
    assert type(event) is cls
    assert normalise(event) == (topic, msgspec.json.encode(payload))


def test_futures_structs_carry_their_extra_fields_and_stay_spot_structs() -> None:
    decode_usdm = decoder_for(Market.USDM)
    _, trade = decode_usdm(combined("usdm", "trade.json", "ethusdt@trade"))
    _, book = decode_usdm(combined("usdm", "bookTicker.json", "bnbusdt@bookTicker"))
    _, depth = decode_usdm(combined("usdm", "depthUpdate.json", "btcusdt@depth@100ms"))
    assert isinstance(trade, FuturesTrade)
    assert trade.X == "MARKET"
    assert isinstance(book, FuturesBookTicker)
    assert (book.E, book.T) == (1568014460893, 1568014460891)
    assert isinstance(depth, FuturesDepthUpdate)
    assert (depth.T, depth.pu) == (123456788, 149)
    # Code written for the spot struct (the feed's trade-gap count) takes them.
    assert isinstance(trade, Trade)
    assert isinstance(book, BookTicker)
    assert isinstance(depth, DepthUpdate)


@pytest.mark.parametrize(
    ("name", "stream", "missing"),
    [
        ("trade.json", "bnbbtc@trade", "X"),
        ("bookTicker.json", "bnbusdt@bookTicker", "E"),
        ("depthUpdate.json", "bnbbtc@depth", "T"),
    ],
)
def test_a_futures_decoder_refuses_a_message_without_its_futures_fields(
    name: str, stream: str, missing: str
) -> None:
    with pytest.raises(MalformedMessage, match=f"missing required field `{missing}`"):
        decoder_for(Market.USDM)(combined("spot", name, stream))


def test_avg_price_is_spot_only() -> None:
    frame = combined("spot", "avgPrice.json", "btcusdt@avgPrice")
    with pytest.raises(MalformedMessage, match=r"unknown stream kind .* for usdm streams"):
        decoder_for(Market.USDM)(frame)


def test_a_rolling_window_ticker_is_not_the_24_hour_ticker() -> None:
    assert stream_kind("bnbbtc@ticker_1h") == "ticker_1h"
    assert stream_kind("bnbbtc@kline_1m@+08:00") == "kline"
    assert stream_kind("bnbbtc@depth@100ms") == "depth"
    with pytest.raises(MalformedMessage, match="unknown stream kind"):
        decode(combined("spot", "ticker.json", "bnbbtc@ticker_1h"))


def test_a_closed_candle_is_published_as_closed() -> None:
    data = json.loads((DATA / "spot" / "kline.json").read_text())
    published = []
    for closed in (False, True):
        data["k"]["x"] = closed
        frame = json.dumps({"stream": "bnbbtc@kline_1m", "data": data})
        published.append(json.loads(normalise(decode(frame)[1])[1]))
    in_progress, final = published
    assert (in_progress["closed"], final["closed"]) == (False, True)
    assert {k: v for k, v in in_progress.items() if k != "closed"} == {
        k: v for k, v in final.items() if k != "closed"
    }
    assert (final["open"], final["high"], final["low"], final["price"]) == (
        0.001,
        0.0025,
        0.0015,
        0.002,
    )
    assert final["trades"] == 100


def test_every_topic_is_of_a_listed_kind_and_every_payload_reads_as_normalised() -> None:
    bus = MemoryBus()
    seen = set()
    for market, table in (("spot", SPOT), ("usdm", USDM)):
        decode_market = decoder_for(Market.SPOT if market == "spot" else Market.USDM)
        for name, (stream, _, _, _) in table.items():
            topic, data = normalise(decode_market(combined(market, name, stream))[1])
            kind, _, symbol = topic.partition(".")
            assert kind in KINDS
            seen.add(kind)
            bus.publish_nowait(topic, data)  # the bus takes the topic
            common = msgspec.json.decode(data, type=Normalised)
            assert common.symbol == symbol
    assert seen == set(KINDS)


# The key that orders each sample's stream: the id or the time Binance gives it.
ORDER_KEYS = {
    ("spot", "trade.json"): 12345,
    ("spot", "aggTrade.json"): 12345,
    ("spot", "bookTicker.json"): 400900217,
    ("spot", "depthUpdate.json"): 160,
    ("spot", "kline.json"): 1672515782136,
    ("spot", "ticker.json"): 1672515782136,
    ("spot", "miniTicker.json"): 1672515782136,
    ("spot", "avgPrice.json"): 1693907033000,
    ("usdm", "trade.json"): 1000000000,
    ("usdm", "aggTrade.json"): 5933014,
    ("usdm", "bookTicker.json"): 400900217,
    ("usdm", "depthUpdate.json"): 160,
}


def test_every_kind_has_an_order_key() -> None:
    for (market, name), key in ORDER_KEYS.items():
        table, decode_market = (
            (SPOT, decode) if market == "spot" else (USDM, decoder_for(Market.USDM))
        )
        _, event = decode_market(combined(market, name, table[name][0]))
        assert order_key(event) == key
    assert len(ORDER_KEYS) == len(SPOT) + len(USDM)
    with pytest.raises(TypeError, match="not a stream event"):
        order_key(object())  # type: ignore[arg-type]  # the point of the test


@pytest.mark.parametrize(
    ("field", "value"),
    [("c", "NaN"), ("P", "Infinity"), ("q", "-inf")],
)
def test_a_ticker_number_that_is_not_finite_is_refused(field: str, value: str) -> None:
    data = json.loads((DATA / "spot" / "ticker.json").read_text()) | {field: value}
    _, event = decode(json.dumps({"stream": "bnbbtc@ticker", "data": data}))
    with pytest.raises(ValueError, match="not a finite number"):
        normalise(event)


def test_a_kline_open_that_is_not_finite_is_refused() -> None:
    data = json.loads((DATA / "spot" / "kline.json").read_text())
    data["k"]["o"] = "1e999"
    _, event = decode(json.dumps({"stream": "bnbbtc@kline_1m", "data": data}))
    with pytest.raises(ValueError, match="not a finite number"):
        normalise(event)


def test_normalise_refuses_what_is_not_an_event() -> None:
    with pytest.raises(TypeError, match="not a stream event"):
        normalise("trade")  # type: ignore[arg-type]  # the point of the test


@pytest.mark.parametrize("name", sorted(CONTROL))
def test_control_frames_raise_their_control_exception(name: str) -> None:
    expected = CONTROL[name]
    frame = (DATA / "spot" / name).read_bytes()
    for decode_market in (decode, decoder_for(Market.USDM)):
        with pytest.raises(type(expected)) as caught:
            decode_market(frame)
        assert caught.value.__reduce__() == expected.__reduce__()
        # Not market data, but a reader that knows only malformed frames still counts it.
        assert isinstance(caught.value, ControlFrame)
        assert isinstance(caught.value, MalformedMessage)


def test_control_exceptions_survive_pickling() -> None:
    for error in CONTROL.values():
        copy = pickle.loads(pickle.dumps(error))
        assert type(copy) is type(error)
        assert copy.__reduce__() == error.__reduce__()
        assert str(copy) == str(error)


def test_control_exceptions_say_what_they_are() -> None:
    assert str(CONTROL["reply_error.json"]) == "reply to request 5: error code 0: Unknown property"
    assert str(CONTROL["reply_subscribe.json"]) == "reply to request 1: result None"
    assert str(CONTROL["serverShutdown.json"]) == (
        "the server announced its shutdown at 1770123456789"
    )


@pytest.mark.parametrize(
    "frame",
    [
        {"id": 1},  # a request's id, but no result or error
        {"result": None},  # a result, but no id
        {"id": "x" * 37, "result": None},  # ids are at most 36 characters
        {"id": 2**63, "result": None},  # or 64-bit integers
        {"id": 1, "error": {"code": "two"}},
        {"e": "serverShutdown"},  # no event time
        {"e": "serverShutdown", "E": "soon"},
        {"stream": "!serverShutdown", "data": {"e": "other", "E": 1}},
        {"stream": "!serverShutdown", "data": {"E": 1}},
        [{"result": None, "id": 1}],
        "serverShutdown",
    ],
)
def test_frames_that_only_look_like_control_frames_are_malformed(frame: object) -> None:
    with pytest.raises(MalformedMessage) as caught:
        decode(json.dumps(frame))
    assert not isinstance(caught.value, ControlFrame)


_KEYS = st.sampled_from(["id", "result", "error", "code", "msg", "e", "E", "stream", "data"])
_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=40) | st.just("serverShutdown"),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_KEYS, inner, max_size=3),
    max_leaves=8,
)


@given(st.dictionaries(_KEYS, _VALUES, max_size=5))
@settings(max_examples=300, deadline=None)
def test_decoding_a_control_like_frame_raises_nothing_but_malformed(frame: dict[str, Any]) -> None:
    # No event can come of these: every event has a symbol ("s").
    with pytest.raises(MalformedMessage) as caught:
        decode(json.dumps(frame))
    error = caught.value
    if isinstance(error, ServerShutdown):
        assert isinstance(error.time, int)
    elif isinstance(error, SubscriptionReply):
        assert error.id == frame["id"]


@pytest.mark.parametrize(
    ("url", "market"),
    [
        ("wss://stream.binance.com:9443", Market.SPOT),
        ("wss://stream.binance.com:443/stream", Market.SPOT),
        ("wss://data-stream.binance.vision", Market.SPOT),
        ("ws://127.0.0.1:8765", Market.SPOT),
        ("wss://fstream.binance.com", Market.USDM),
        ("wss://FSTREAM.binance.com/public", Market.USDM),
        ("wss://fstream.binancefuture.com", Market.USDM),
    ],
)
def test_the_market_follows_the_url(url: str, market: Market) -> None:
    assert market_of(url) is market


def test_coin_m_futures_urls_are_refused() -> None:
    with pytest.raises(ValueError, match="COIN-M futures streams are not supported"):
        market_of("wss://dstream.binance.com")


def test_decoder_for_wants_a_market() -> None:
    with pytest.raises(ValueError, match="market must be a Market, got 'spot'"):
        decoder_for("spot")  # type: ignore[arg-type]  # the point of the test


def test_each_decoder_remembers_its_own_streams() -> None:
    # The same stream name means a different struct to each market's decoder.
    frame = combined("usdm", "bookTicker.json", "bnbusdt@bookTicker")
    assert type(decode(frame)[1]) is BookTicker
    assert type(decoder_for(Market.USDM)(frame)[1]) is FuturesBookTicker
    assert type(decode(frame)[1]) is BookTicker


@pytest.mark.subprocess
def test_the_formats_page_shows_what_its_example_prints() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "docs" / "examples" / "formats_example.py")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    page = (ROOT / "docs" / "formats.md").read_text(encoding="utf-8")
    shown = page.split("<!-- formats_example output -->\n```text\n", 1)[1].split("```", 1)[0]
    assert result.stdout == shown
    for kind in KINDS:
        assert f"`{kind}.<SYMBOL>`" in page
