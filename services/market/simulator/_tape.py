"""The message sequence of one WebSocket connection, deterministic from the seed.

Message ``i`` goes to stream ``i mod n`` of the connection's ``n`` streams.
Every message first moves its symbol's market one step (a seeded random walk
of the price, and order-book update ids), then reports it as its stream type
does on Binance:

* ``trade``: a new trade; trade ids on the stream are consecutive. A later
  connection's ids start past every message the simulator sent before it
  (the ``trade_id_offset``), as an exchange's ids move on while a client is
  away, so a client that reconnects sees a gap.
* ``aggTrade``: the trades since the symbol's previous ``aggTrade`` (one new
  trade if there were none), so ``f..l`` ranges chain without gaps and cover
  the ids the ``trade`` stream reported.
* ``bookTicker``: the best bid and ask, with the current update id ``u``.
* ``depthUpdate``: a few changed levels; ``U`` is the previous message's
  ``u + 1``, so a consumer can check the chain as on Binance.
* ``kline``: the current candle of the interval, built from the symbol's
  trades (one new trade if none happened since the stream's previous
  message); when the interval rolls over, the closed candle (``"x": true``)
  is sent once first.
* ``24hrTicker``, ``24hrMiniTicker``: the last 24 hours as the connection
  saw them: the window opens at the symbol's base price, its high and low
  are the extremes of that and the last price, and its trades are those
  since the connection began.
* ``avgPrice``: the current price, as the 5-minute average.

So the sequence depends only on the seed, the stream list and ``i``: never on
pacing, bursts or timing (except for wall-clock timestamps, see
``SimulatorConfig.epoch_ms``). This is the hot path of the simulator: plain
classes with ``__slots__``, ``random.random()`` for every draw, and one JSON
encode per message.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import Any

from ._encode import encode
from ._instruments import Instrument
from ._streams import Kind, StreamSpec

# Relative price step per message: uniform in [-_STEP/2, _STEP/2], a standard
# deviation of about 0.9e-4.
_STEP = 3e-4
# Pull of the price back towards its base per message, so a long run stays
# plausible: the price wanders with a spread of about 20 %.
_PULL = 1e-7
# Typical traded value of one trade, in quote currency.
_TRADE_VALUE = 400.0
# A rate of math.inf stamps simulated time as if it were this rate.
UNLIMITED_STAMP_RATE = 100_000.0

Message = dict[str, Any]
Draw = Callable[[], float]


class _Book:
    """One symbol's live state on one connection."""

    __slots__ = (
        "agg_id",
        "agg_last",
        "agg_qty",
        "base_price",
        "decimals",
        "depth_from",
        "first_trade",
        "klines",
        "lot",
        "maker",
        "price",
        "price_text",
        "qty",
        "qty_decimals",
        "qty_text",
        "shown",
        "symbol",
        "tick",
        "trade_id",
        "unit_qty",
        "update_id",
    )

    def __init__(self, instrument: Instrument, trade_id_offset: int = 0) -> None:
        self.symbol = instrument.symbol
        self.decimals = instrument.price_decimals
        self.qty_decimals = instrument.qty_decimals
        self.tick = 10.0**-self.decimals
        self.lot = 10.0**-self.qty_decimals
        self.unit_qty = _TRADE_VALUE / instrument.base_price
        self.price = self.base_price = instrument.base_price
        self.shown = round(self.price, self.decimals)
        self.price_text = f"{self.shown:.8f}"
        self.qty, self.qty_text, self.maker = self.lot, f"{self.lot:.8f}", False
        first = instrument.first_trade_id + trade_id_offset
        self.trade_id = self.agg_last = first - 1
        self.first_trade = first
        self.agg_id = first // 3 - 1
        self.agg_qty = 0.0
        self.update_id = instrument.first_update_id - 1
        self.depth_from = instrument.first_update_id
        self.klines: list[_Kline] = []

    def move(self, draw: Draw) -> None:
        """One step of the market: the price moves and the book updates."""
        step = draw()
        self.price *= 1.0 + _STEP * (step - 0.5) - _PULL * (self.price / self.base_price - 1.0)
        self.shown = round(self.price, self.decimals)
        self.price_text = f"{self.shown:.8f}"
        self.update_id += 1 + int(step * 1000) % 3

    def trade(self, draw: Draw, ts: int) -> None:
        """One trade at the current price, of a random size and side."""
        size = draw()
        qty = round(self.unit_qty * (0.05 + 4.0 * size * size * size), self.qty_decimals)
        self.qty = qty if qty > 0 else self.lot
        self.qty_text = f"{self.qty:.8f}"
        self.maker = draw() < 0.5
        self.trade_id += 1
        self.agg_qty += self.qty
        for kline in self.klines:
            kline.add(self, ts)


class _Kline:
    """The current candle of one kline stream, built from its symbol's trades."""

    __slots__ = (
        "base",
        "close",
        "closed",
        "count",
        "first",
        "high",
        "interval",
        "interval_ms",
        "last",
        "low",
        "open",
        "quote",
        "reported",
        "start",
        "taker_base",
        "taker_quote",
    )

    def __init__(self, interval: str, interval_ms: int, reported: int) -> None:
        self.interval = interval
        self.interval_ms = interval_ms
        self.closed: dict[str, Any] | None = None
        self.reported = reported  # the last trade id a message of this stream covered
        self._reset(-1)

    def _reset(self, start: int) -> None:
        self.start = start
        self.count = 0
        self.open = self.high = self.low = self.close = 0.0
        self.base = self.quote = self.taker_base = self.taker_quote = 0.0
        self.first = self.last = -1

    def roll(self, symbol: str, ts: int) -> None:
        """Start the candle holding ``ts``, keeping the finished one to send."""
        start = ts - ts % self.interval_ms
        if start != self.start:
            if self.count:
                self.closed = self.candle(symbol, closed=True)
            self._reset(start)

    def add(self, book: _Book, ts: int) -> None:
        self.roll(book.symbol, ts)
        price, qty = book.shown, book.qty
        if not self.count:
            self.open = self.high = self.low = price
            self.first = book.trade_id
        self.high = max(self.high, price)
        self.low = min(self.low, price)
        self.close = price
        self.last = book.trade_id
        self.count += 1
        self.base += qty
        self.quote += qty * price
        if not book.maker:  # the buyer took liquidity
            self.taker_base += qty
            self.taker_quote += qty * price

    def candle(self, symbol: str, *, closed: bool) -> dict[str, Any]:
        return {
            "t": self.start,
            "T": self.start + self.interval_ms - 1,
            "s": symbol,
            "i": self.interval,
            "f": self.first,
            "L": self.last,
            "o": f"{self.open:.8f}",
            "c": f"{self.close:.8f}",
            "h": f"{self.high:.8f}",
            "l": f"{self.low:.8f}",
            "v": f"{self.base:.8f}",
            "n": self.count,
            "x": closed,
            "q": f"{self.quote:.8f}",
            "V": f"{self.taker_base:.8f}",
            "Q": f"{self.taker_quote:.8f}",
            "B": "0",
        }


def _trade(book: _Book, ts: int, kline: _Kline | None, draw: Draw) -> Message:
    book.trade(draw, ts)
    return {
        "e": "trade",
        "E": ts,
        "s": book.symbol,
        "t": book.trade_id,
        "p": book.price_text,
        "q": book.qty_text,
        "T": ts,
        "m": book.maker,
        "M": True,
    }


def _agg_trade(book: _Book, ts: int, kline: _Kline | None, draw: Draw) -> Message:
    if book.trade_id == book.agg_last:
        book.trade(draw, ts)
    first, book.agg_last = book.agg_last + 1, book.trade_id
    qty, book.agg_qty = book.agg_qty, 0.0
    book.agg_id += 1
    return {
        "e": "aggTrade",
        "E": ts,
        "s": book.symbol,
        "a": book.agg_id,
        "p": book.price_text,
        "q": f"{round(qty, book.qty_decimals):.8f}",
        "f": first,
        "l": book.trade_id,
        "T": ts,
        "m": book.maker,
        "M": True,
    }


def _book_ticker(book: _Book, ts: int, kline: _Kline | None, draw: Draw) -> Message:
    bid = round(book.shown - book.tick * (1 + int(draw() * 2)), book.decimals)
    ask = round(bid + book.tick, book.decimals)
    return {
        "u": book.update_id,
        "s": book.symbol,
        "b": f"{bid:.8f}",
        "B": _level_qty(book, draw()),
        "a": f"{ask:.8f}",
        "A": _level_qty(book, draw()),
    }


def _depth(book: _Book, ts: int, kline: _Kline | None, draw: Draw) -> Message:
    first, book.depth_from = book.depth_from, book.update_id + 1
    return {
        "e": "depthUpdate",
        "E": ts,
        "s": book.symbol,
        "U": first,
        "u": book.update_id,
        "b": _levels(book, draw, -1.0),
        "a": _levels(book, draw, 1.0),
    }


def _levels(book: _Book, draw: Draw, side: float) -> list[list[str]]:
    """One to three changed price levels on one side; a quantity of 0 removes one."""
    spacing = max(book.tick, book.shown * 1e-4)
    levels = []
    for depth in range(1 + int(draw() * 3)):
        price = round(book.shown + side * spacing * (depth + 1), book.decimals)
        amount = draw()
        qty = "0.00000000" if amount < 0.25 else _level_qty(book, amount)
        levels.append([f"{price:.8f}", qty])
    return levels


def _level_qty(book: _Book, amount: float) -> str:
    qty = round(book.unit_qty * (1.0 + 20.0 * amount), book.qty_decimals)
    return f"{max(qty, book.lot):.8f}"


def _kline(book: _Book, ts: int, kline: _Kline | None, draw: Draw) -> Message:
    assert kline is not None  # a kline stream always has its candle
    kline.roll(book.symbol, ts)
    # A new trade only when none happened since this stream's previous message
    # (a lone kline stream makes its own). Not merely because the interval
    # rolled over: then the closed candle is what this message sends, and a
    # trade made here would be one the trade stream never reports.
    if book.trade_id == kline.reported or (not kline.count and kline.closed is None):
        book.trade(draw, ts)
    kline.reported = book.trade_id
    candle = kline.closed
    if candle is None:
        candle = kline.candle(book.symbol, closed=False)
    kline.closed = None
    return {"e": "kline", "E": ts, "s": book.symbol, "k": candle}


_DAY_MS = 86_400_000


def _window(book: _Book, ts: int) -> Message:
    """The 24-hour statistics both tickers share (see the module's docstring)."""
    open_ = round(book.base_price, book.decimals)
    trades = book.trade_id - book.first_trade + 1
    volume = trades * book.unit_qty
    return {
        "E": ts,
        "s": book.symbol,
        "c": book.price_text,
        "o": f"{open_:.8f}",
        "h": f"{max(open_, book.shown):.8f}",
        "l": f"{min(open_, book.shown):.8f}",
        "v": f"{volume:.8f}",
        "q": f"{volume * book.shown:.8f}",
    }


def _ticker(book: _Book, ts: int, kline: _Kline | None, draw: Draw) -> Message:
    window = _window(book, ts)
    open_ = float(window["o"])
    change = book.shown - open_
    return {
        "e": "24hrTicker",
        **window,
        "p": f"{change:.8f}",
        "P": f"{100.0 * change / open_:.2f}",
        "w": f"{(open_ + book.shown) / 2:.8f}",
        "x": window["o"],
        "Q": book.qty_text,
        "b": f"{book.shown - book.tick:.8f}",
        "B": _level_qty(book, draw()),
        "a": f"{book.shown + book.tick:.8f}",
        "A": _level_qty(book, draw()),
        "O": ts - _DAY_MS,
        "C": ts,
        "F": book.first_trade,
        "L": book.trade_id,
        "n": book.trade_id - book.first_trade + 1,
    }


def _mini_ticker(book: _Book, ts: int, kline: _Kline | None, draw: Draw) -> Message:
    return {"e": "24hrMiniTicker", **_window(book, ts)}


def _avg_price(book: _Book, ts: int, kline: _Kline | None, draw: Draw) -> Message:
    return {"e": "avgPrice", "E": ts, "s": book.symbol, "i": "5m", "w": book.price_text, "T": ts}


_Builder = Callable[[_Book, int, "_Kline | None", Draw], Message]

_BUILDERS: dict[Kind, _Builder] = {
    Kind.TRADE: _trade,
    Kind.AGG_TRADE: _agg_trade,
    Kind.BOOK_TICKER: _book_ticker,
    Kind.DEPTH: _depth,
    Kind.KLINE: _kline,
    Kind.TICKER: _ticker,
    Kind.MINI_TICKER: _mini_ticker,
    Kind.AVG_PRICE: _avg_price,
}


class Tape:
    """The messages of one connection, in order (private).

    Args:
        seed: the simulator's seed.
        streams: the connection's streams, in order.
        combined: wrap each message as ``{"stream": name, "data": message}``.
        epoch_ms: start of the simulated clock, or ``None`` for the wall clock.
        rate: messages per second, which paces the simulated clock.
        trade_id_offset: added to every symbol's first trade id: a later
            connection continues past the ids of earlier ones, as an
            exchange's ids advance while a client is away.
    """

    __slots__ = (
        "_books",
        "_combined",
        "_draw",
        "_epoch_ms",
        "_index",
        "_klines",
        "_ms_per_message",
        "_position",
        "_streams",
        "_trade_id_offset",
        "specs",
    )

    def __init__(
        self,
        seed: int,
        streams: list[StreamSpec],
        *,
        combined: bool,
        epoch_ms: int | None,
        rate: float,
        trade_id_offset: int = 0,
    ) -> None:
        self._draw = random.Random(seed).random
        self._trade_id_offset = trade_id_offset
        self._combined = combined
        self._epoch_ms = epoch_ms
        self._ms_per_message = 1000.0 / min(rate, UNLIMITED_STAMP_RATE)
        self._index = 0
        self._position = 0
        self._books: dict[str, _Book] = {}
        self._klines: dict[str, _Kline] = {}
        self._streams: list[tuple[str, _Book, _Builder, _Kline | None]] = []
        self.specs: list[StreamSpec] = []
        self.set_streams(streams)

    def set_streams(self, specs: list[StreamSpec]) -> None:
        """Serve ``specs`` from the next message on; symbols keep their state."""
        self.specs = list(specs)
        self._streams = [self._entry(spec) for spec in self.specs]
        self._position = 0
        for book in self._books.values():
            book.klines = []
        for _, book, _, kline in self._streams:
            if kline is not None:
                book.klines.append(kline)

    def _entry(self, spec: StreamSpec) -> tuple[str, _Book, _Builder, _Kline | None]:
        book = self._books.get(spec.instrument.symbol)
        if book is None:
            book = _Book(spec.instrument, self._trade_id_offset)
            self._books[spec.instrument.symbol] = book
        kline = None
        if spec.kind is Kind.KLINE:
            kline = self._klines.get(spec.name)
            if kline is None:
                kline = _Kline(spec.interval, spec.interval_ms, book.trade_id)
                self._klines[spec.name] = kline
        return spec.name, book, _BUILDERS[spec.kind], kline

    def texts(self, count: int) -> list[str]:
        """The next ``count`` messages as JSON texts (none without streams)."""
        streams = self._streams
        if not streams:
            return []
        draw, epoch, combined = self._draw, self._epoch_ms, self._combined
        per = self._ms_per_message
        wall = int(time.time() * 1000) if epoch is None else 0
        position, index, n = self._position, self._index, len(streams)
        out: list[str] = []
        for _ in range(count):
            name, book, build, kline = streams[position]
            position = position + 1 if position + 1 < n else 0
            ts = wall if epoch is None else epoch + int(index * per)
            index += 1
            book.move(draw)
            data = build(book, ts, kline, draw)
            out.append(encode({"stream": name, "data": data}) if combined else encode(data))
        self._position, self._index = position, index
        return out
