"""The REST endpoints, in Binance's shapes: 24h tickers, klines and a few basics.

Errors answer like Binance: HTTP 400 with ``{"code": -1121, "msg": "Invalid
symbol."}`` and its siblings. Every answer is a pure function of the seed,
the anchor and "now", so with ``epoch_ms`` set (which fixes "now") the same
request always gets the same bytes.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import parse_qs, urlsplit

import attrs
import numpy as np

from ._config import INTERVALS_MS
from ._encode import encode
from ._history import Candles, History
from ._instruments import Instrument
from ._weights import RequestWeights, ticker_weight

_DAY_MS = 86_400_000
_MINUTE_MS = 60_000
_DEFAULT_LIMIT = 500
_MAX_LIMIT = 1000
# Typical traded value of one trade, in quote currency, for quantities.
_TRADE_VALUE = 400.0
_QUOTES = ("USDT", "USDC", "FDUSD", "BTC", "ETH", "BNB")


class _Invalid(Exception):
    """A request Binance would answer with 400 and this code and message."""

    def __init__(self, code: int, msg: str) -> None:
        super().__init__(msg)
        self.code = code
        self.msg = msg


def _mandatory(name: str) -> _Invalid:
    return _Invalid(
        -1102, f"Mandatory parameter '{name}' was not sent, was empty/null, or malformed."
    )


_INVALID_SYMBOL = _Invalid(-1121, "Invalid symbol.")


@attrs.frozen
class Reply:
    """An HTTP answer (private): status, a JSON body and extra headers."""

    status: int
    body: bytes
    headers: tuple[tuple[bytes, bytes], ...] = ()


@attrs.frozen
class RestApp:
    """Answers GET requests for the REST paths (private).

    Args:
        history: the candles.
        instruments: the listed symbols.
        epoch_ms: a fixed "now" for a simulated clock, or ``None`` for the wall clock.
        weights: the request-weight budget every answer spends from.
    """

    history: History
    instruments: Mapping[str, Instrument]
    epoch_ms: int | None
    weights: RequestWeights

    def answer(self, method: str, target: str) -> Reply:
        """The reply to ``method target`` (``target`` is the path and query)."""
        parts = urlsplit(target)
        route = _ROUTES.get(parts.path)
        if route is None:
            return _reply(404, {"code": -1, "msg": f"Unknown endpoint {parts.path}."})
        if method not in ("GET", "HEAD"):
            return _reply(405, {"code": -1, "msg": f"Method {method} is not allowed."})
        query = {name: values[-1] for name, values in parse_qs(parts.query).items()}
        weight = _WEIGHTS[parts.path]
        retry_after = self.weights.take(weight if isinstance(weight, int) else weight(query))
        if retry_after is not None:
            return self._with_weight(
                _reply(429, _TOO_MUCH_WEIGHT), (b"retry-after", b"%d" % retry_after)
            )
        try:
            return self._with_weight(_reply(200, route(self, query)))
        except _Invalid as invalid:
            return self._with_weight(_reply(400, {"code": invalid.code, "msg": invalid.msg}))

    def _with_weight(self, reply: Reply, *extra: tuple[bytes, bytes]) -> Reply:
        used = (b"x-mbx-used-weight-1m", b"%d" % self.weights.used)
        return attrs.evolve(reply, headers=(used, *extra))

    def now_ms(self) -> int:
        """Milliseconds since the epoch on the simulator's clock."""
        return self.epoch_ms if self.epoch_ms is not None else int(time.time() * 1000)

    def _instrument(self, symbol: str | None) -> Instrument:
        if not symbol:
            raise _mandatory("symbol")
        instrument = self.instruments.get(symbol)
        if instrument is None:
            raise _INVALID_SYMBOL
        return instrument

    def ping(self, query: Mapping[str, str]) -> object:
        return {}

    def time(self, query: Mapping[str, str]) -> object:
        return {"serverTime": self.now_ms()}

    def exchange_info(self, query: Mapping[str, str]) -> object:
        return {
            "timezone": "UTC",
            "serverTime": self.now_ms(),
            "symbols": [_symbol_info(i) for i in self.instruments.values()],
        }

    def ticker_24hr(self, query: Mapping[str, str]) -> object:
        now = self.now_ms()
        if "symbol" in query:
            return self._ticker(self._instrument(query["symbol"]), now)
        if "symbols" in query:
            return [self._ticker(self._instrument(s), now) for s in _symbol_list(query)]
        return [self._ticker(instrument, now) for instrument in self.instruments.values()]

    def _ticker(self, instrument: Instrument, now: int) -> dict[str, Any]:
        first_open = (now - _DAY_MS) // _MINUTE_MS * _MINUTE_MS + _MINUTE_MS
        day = self.history.candles(instrument, _MINUTE_MS, first_open, _DAY_MS // _MINUTE_MS)
        return _ticker_body(instrument, day, now)

    def klines(self, query: Mapping[str, str]) -> object:
        instrument = self._instrument(query.get("symbol"))
        interval_ms = _interval(query)
        limit = _integer(query, "limit", _DEFAULT_LIMIT)
        if not 1 <= limit <= _MAX_LIMIT:
            raise _Invalid(-1130, "Data sent for parameter 'limit' is not valid.")
        now = self.now_ms()
        earliest = self.history.earliest_open(interval_ms)
        latest = min(_integer(query, "endTime", now), now) // interval_ms * interval_ms
        start = _integer(query, "startTime", -1)
        if start >= 0:
            first = max(earliest, -(-start // interval_ms) * interval_ms)
            count = min(limit, (latest - first) // interval_ms + 1)
        else:
            first = max(earliest, latest - (limit - 1) * interval_ms)
            count = (latest - first) // interval_ms + 1
        if count <= 0:
            return []
        candles = self.history.candles(instrument, interval_ms, first, count)
        return _kline_rows(instrument, candles, interval_ms)


_ROUTES = {
    "/api/v3/ping": RestApp.ping,
    "/api/v3/time": RestApp.time,
    "/api/v3/exchangeInfo": RestApp.exchange_info,
    "/api/v3/ticker/24hr": RestApp.ticker_24hr,
    "/api/v3/klines": RestApp.klines,
}


# Each path's request weight, as Binance's api/v3 counts it.
_WEIGHTS: dict[str, int | Callable[[Mapping[str, str]], int]] = {
    "/api/v3/ping": 1,
    "/api/v3/time": 1,
    "/api/v3/exchangeInfo": 20,
    "/api/v3/ticker/24hr": ticker_weight,
    "/api/v3/klines": 2,
}
_TOO_MUCH_WEIGHT = {
    "code": -1003,
    "msg": "Too much request weight used; please use WebSocket streams for live updates.",
}


def _reply(status: int, body: object) -> Reply:
    return Reply(status, encode(body).encode())


def _symbol_list(query: Mapping[str, str]) -> list[str]:
    """``symbols=["BTCUSDT","ETHUSDT"]``, as Binance takes it."""
    try:
        symbols = json.loads(query["symbols"])
    except ValueError:
        symbols = None
    if not isinstance(symbols, list) or not symbols:
        raise _mandatory("symbols")
    return [str(symbol) for symbol in symbols]


def _interval(query: Mapping[str, str]) -> int:
    name = query.get("interval")
    if not name:
        raise _mandatory("interval")
    if name not in INTERVALS_MS:
        raise _Invalid(-1120, "Invalid interval.")
    return INTERVALS_MS[name]


def _integer(query: Mapping[str, str], name: str, default: int) -> int:
    text = query.get(name)
    if text is None:
        return default
    if not text.isdigit() or len(text) > 20:
        raise _Invalid(
            -1100,
            f"Illegal characters found in parameter '{name}'; legal range is '^[0-9]{{1,20}}$'.",
        )
    return int(text)


def _text(value: float, decimals: int) -> str:
    """Binance's 8-decimal string, exact to ``decimals`` (no float noise beyond)."""
    return f"{value:.{decimals}f}" + "0" * (8 - decimals)


def _fixed(values: np.ndarray[Any, Any], decimals: int) -> list[str]:
    """:func:`_text` of each value, with the format built once."""
    return list(map(f"{{:.{decimals}f}}{'0' * (8 - decimals)}".format, values.tolist()))


def _kline_rows(instrument: Instrument, candles: Candles, interval_ms: int) -> list[list[object]]:
    prices, amounts = instrument.price_decimals, instrument.qty_decimals
    columns = zip(
        candles.open_time.tolist(),
        _fixed(candles.open, prices),
        _fixed(candles.high, prices),
        _fixed(candles.low, prices),
        _fixed(candles.close, prices),
        _fixed(candles.volume, amounts),
        (candles.open_time + interval_ms - 1).tolist(),
        _fixed(candles.quote, prices),
        candles.trades.tolist(),
        _fixed(candles.taker_base, amounts),
        _fixed(candles.taker_quote, prices),
        strict=True,
    )
    return [[*row, "0"] for row in columns]


def _ticker_body(instrument: Instrument, day: Candles, now: int) -> dict[str, Any]:
    prices, amounts = instrument.price_decimals, instrument.qty_decimals
    open_price = round(float(day.open[0]), prices)
    last = round(float(day.close[-1]), prices)
    volume, quote = float(day.volume.sum()), float(day.quote.sum())
    count = int(day.trades.sum())
    last_id = instrument.first_trade_id - 1
    lot = 10.0**-amounts
    return {
        "symbol": instrument.symbol,
        "priceChange": _text(last - open_price, prices),
        "priceChangePercent": f"{(last - open_price) / open_price * 100:.3f}",
        "weightedAvgPrice": _text(quote / volume, prices),
        "prevClosePrice": _text(open_price, prices),
        "lastPrice": _text(last, prices),
        "lastQty": _text(max(lot, _TRADE_VALUE / last), amounts),
        "bidPrice": _text(last - 10.0**-prices, prices),
        "bidQty": _text(max(lot, 10 * _TRADE_VALUE / last), amounts),
        "askPrice": _text(last, prices),
        "askQty": _text(max(lot, 12 * _TRADE_VALUE / last), amounts),
        "openPrice": _text(open_price, prices),
        "highPrice": _text(float(day.high.max()), prices),
        "lowPrice": _text(float(day.low.min()), prices),
        "volume": _text(volume, amounts),
        "quoteVolume": _text(quote, prices),
        "openTime": now - _DAY_MS,
        "closeTime": now,
        "firstId": last_id - count + 1,
        "lastId": last_id,
        "count": count,
    }


def _symbol_info(instrument: Instrument) -> dict[str, Any]:
    symbol = instrument.symbol
    quote = next((q for q in _QUOTES if symbol.endswith(q) and symbol != q), "")
    return {
        "symbol": symbol,
        "status": "TRADING",
        "baseAsset": symbol.removesuffix(quote) if quote else symbol,
        "quoteAsset": quote,
        "baseAssetPrecision": 8,
        "quoteAssetPrecision": 8,
    }
