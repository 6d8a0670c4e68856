"""The simulator's ticker, mini ticker and average price streams, read by the feed's decoder."""

from __future__ import annotations

import json

from services.market._events import AvgPrice, MiniTicker, Ticker, decode, normalise
from services.market.simulator import SimulatorConfig
from services.market.simulator._instruments import instruments
from services.market.simulator._streams import Kind, parse_streams
from services.market.simulator._tape import Tape

STREAMS = ["btcusdt@trade", "btcusdt@ticker", "btcusdt@miniTicker", "btcusdt@avgPrice"]


def test_the_new_kinds_decode_and_publish() -> None:
    specs = parse_streams(STREAMS, instruments(SimulatorConfig().symbols, 7))
    assert [spec.kind for spec in specs][1:] == [Kind.TICKER, Kind.MINI_TICKER, Kind.AVG_PRICE]
    tape = Tape(7, specs, combined=True, epoch_ms=1_700_000_000_000, rate=1000.0)
    seen: dict[type, int] = {}
    for text in tape.texts(40):
        _, event = decode(text)
        seen[type(event)] = seen.get(type(event), 0) + 1
        topic, data = normalise(event)
        body = json.loads(data)
        assert topic.endswith(".BTCUSDT")
        if isinstance(event, Ticker | MiniTicker):
            assert body["low"] <= body["price"] <= body["high"]
            assert body["qty"] > 0
        if isinstance(event, Ticker):
            assert body["bid"] < body["ask"]
            assert body["trades"] == event.L - event.F + 1
    assert seen[Ticker] == seen[MiniTicker] == seen[AvgPrice] == 10


def test_the_tape_is_the_same_for_the_same_seed() -> None:
    specs = parse_streams(STREAMS, instruments(SimulatorConfig().symbols, 7))
    one = Tape(7, specs, combined=True, epoch_ms=0, rate=1000.0).texts(20)
    two = Tape(7, specs, combined=True, epoch_ms=0, rate=1000.0).texts(20)
    assert one == two
