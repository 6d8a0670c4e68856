"""Binance 24h tickers on the wire, the quotes they become, and ``last_update`` records.

Decoded with msgspec into typed structs whose field names are Binance's, so
the wire format is documented by the types; prices arrive as strings and
become floats here, once.
"""

from __future__ import annotations

import math

import msgspec

TICKER_PATH = "/api/v3/ticker/24hr"
INVALID_SYMBOL = -1121
"""Binance's error code for a symbol it does not list (HTTP 400)."""


class _Ticker(msgspec.Struct, frozen=True):
    """One element of ``GET /api/v3/ticker/24hr?symbols=[...]`` (the FULL type)."""

    symbol: str
    lastPrice: str
    priceChangePercent: str
    volume: str
    closeTime: int
    quoteVolume: str | None = None
    # The MINI ticker type has no book prices: they are optional.
    bidPrice: str | None = None
    askPrice: str | None = None


class _ApiError(msgspec.Struct, frozen=True):
    """Binance's error body: ``{"code": -1121, "msg": "Invalid symbol."}``."""

    code: int
    msg: str


_TICKERS = msgspec.json.Decoder(list[_Ticker])
_ERROR = msgspec.json.Decoder(_ApiError)


class MalformedResponse(ValueError):
    """A 200 answer that is not a list of 24h tickers; the message says what is wrong."""


class Quote(msgspec.Struct, frozen=True):
    """The latest 24h ticker of one symbol, as the watchlist keeps it.

    Attributes:
        symbol: ``"BTCUSDT"``.
        last_price: the last trade price.
        change_pct: the price change over 24 h, in percent.
        volume: 24 h volume in the base asset.
        quote_volume: 24 h volume in the quote asset, when sent.
        bid: the best bid, when sent (the MINI ticker type has none).
        ask: the best ask, when sent.
        close_time: the exchange's time of the ticker, ms since the epoch.
        updated_at: when the watchlist received it: wall-clock seconds since
            the epoch.
    """

    symbol: str
    last_price: float
    change_pct: float
    volume: float
    quote_volume: float | None
    bid: float | None
    ask: float | None
    close_time: int
    updated_at: float


class DatasetUpdate(msgspec.Struct, frozen=True):
    """When a dataset last changed, overall and per symbol.

    Attributes:
        updated_at: wall-clock seconds since the epoch of the latest change,
            ``None`` until there is one. It stops advancing when the dataset
            is in trouble, which makes it the freshness check to watch.
        symbols: the same, per symbol.
    """

    updated_at: float | None
    symbols: dict[str, float]


def _number(text: str, field: str, symbol: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise MalformedResponse(f"{symbol}: {field} is not a finite number: {text!r}")
    return value


def _optional(text: str | None, field: str, symbol: str) -> float | None:
    return None if text is None else _number(text, field, symbol)


def decode_quotes(body: bytes, updated_at: float) -> dict[str, Quote]:
    """The quotes in a ``symbols=[...]`` answer, by symbol.

    Raises:
        MalformedResponse: invalid JSON, a missing or mistyped field, or a
            price that is not a number.
    """
    try:
        tickers = _TICKERS.decode(body)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise MalformedResponse(str(exc)) from exc
    quotes = {}
    for t in tickers:
        quotes[t.symbol] = Quote(
            symbol=t.symbol,
            last_price=_number(t.lastPrice, "lastPrice", t.symbol),
            change_pct=_number(t.priceChangePercent, "priceChangePercent", t.symbol),
            volume=_number(t.volume, "volume", t.symbol),
            quote_volume=_optional(t.quoteVolume, "quoteVolume", t.symbol),
            bid=_optional(t.bidPrice, "bidPrice", t.symbol),
            ask=_optional(t.askPrice, "askPrice", t.symbol),
            close_time=t.closeTime,
            updated_at=updated_at,
        )
    return quotes


def decode_error(body: bytes) -> tuple[int | None, str]:
    """``(code, message)`` of an error answer; ``(None, excerpt)`` if not in Binance's shape."""
    try:
        error = _ERROR.decode(body)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None, body[:120].decode("utf-8", errors="replace")
    return error.code, error.msg


def symbols_param(symbols: list[str]) -> str:
    """Binance's ``symbols`` value: a compact JSON list, ``["BTCUSDT","ETHUSDT"]``."""
    return msgspec.json.encode(symbols).decode()
