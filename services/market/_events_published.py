"""What the service publishes for each event: a topic and a ``Normalised`` payload.

Every payload shares :class:`Normalised`'s members (``type``, ``symbol``,
``time``, then whichever of ``price``, ``qty``, ``bid``, ``ask``, ``id``,
``buyer_maker`` the kind has); kinds that carry more are subclasses that add
members after those, so a consumer that decodes any payload as
``Normalised`` reads the common part, and one that knows the kind reads all
of it. Members a kind has not are left out of the JSON (``omit_defaults``).
``docs/formats.md`` lists each kind's topic and payload.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgspec

from ._events_wire import (
    AggTrade,
    AvgPrice,
    BookTicker,
    DepthUpdate,
    Event,
    FuturesBookTicker,
    FuturesDepthUpdate,
    FuturesTrade,
    Kline,
    MiniTicker,
    Ticker,
    Trade,
)


class Normalised(msgspec.Struct, frozen=True, omit_defaults=True, gc=False):
    """What the service publishes on its bus and sends to its clients."""

    type: str
    symbol: str
    time: int
    price: float | None = None
    qty: float | None = None
    bid: float | None = None
    ask: float | None = None
    id: int | None = None
    buyer_maker: bool | None = None


class NormalisedTrade(Normalised, frozen=True, omit_defaults=True, gc=False):
    """A futures trade: a trade with its type (``"MARKET"``, ``"LIQUIDATION"``...)."""

    trade_type: str | None = None


class NormalisedDepth(Normalised, frozen=True, omit_defaults=True, gc=False):
    """A depth update's place in its chain: ``first_id`` .. ``id``, after ``prev_id`` (futures)."""

    first_id: int | None = None
    prev_id: int | None = None


class NormalisedKline(Normalised, frozen=True, omit_defaults=True, gc=False):
    """A candle: ``price`` is its close, ``qty`` its base volume, ``time`` its close time."""

    open: float | None = None
    high: float | None = None
    low: float | None = None
    trades: int | None = None
    closed: bool | None = None
    interval: str | None = None
    start: int | None = None


class NormalisedTicker(Normalised, frozen=True, omit_defaults=True, gc=False):
    """24-hour statistics: ``price`` is the last price, ``qty`` the base volume."""

    open: float | None = None
    high: float | None = None
    low: float | None = None
    quote_qty: float | None = None
    change: float | None = None
    change_pct: float | None = None
    trades: int | None = None


class NormalisedAvgPrice(Normalised, frozen=True, omit_defaults=True, gc=False):
    """The average price (``price``) over ``interval``."""

    interval: str | None = None


KINDS = ("trades", "aggtrades", "book", "depth", "klines", "tickers", "minitickers", "avgprices")
"""The first tokens of the topics :func:`normalise` publishes on."""

_ENCODER = msgspec.json.Encoder()


def _finite(first: str, second: str) -> tuple[float, float]:
    """Two decimal strings as floats; ``ValueError`` unless both are finite."""
    a, b = float(first), float(second)
    # ``x - x == 0.0`` is false exactly for infinities and NaN, with no call
    # per number: this is on the path every message takes.
    if not a - a == b - b == 0.0:
        shown = ", ".join(repr(text[:40]) for text in (first, second))
        raise ValueError(f"not a finite number: {shown}")
    return a, b


def _numbers(*texts: str) -> list[float]:
    """Decimal strings as floats; ``ValueError`` unless all are finite (the slower kinds)."""
    numbers = [float(text) for text in texts]
    for text, number in zip(texts, numbers, strict=True):
        if not number - number == 0.0:
            raise ValueError(f"not a finite number: {text[:40]!r}")
    return numbers


def _optional(text: str | None) -> float | None:
    return None if text is None else _numbers(text)[0]


def _trade(event: Trade) -> tuple[str, Normalised]:
    price, qty = _finite(event.p, event.q)
    body = Normalised("trade", event.s, event.T, price, qty, None, None, event.t, event.m)
    return f"trades.{event.s}", body


def _futures_trade(event: FuturesTrade) -> tuple[str, Normalised]:
    price, qty = _finite(event.p, event.q)
    body = NormalisedTrade(
        "trade", event.s, event.T, price, qty, None, None, event.t, event.m, event.X
    )
    return f"trades.{event.s}", body


def _agg_trade(event: AggTrade) -> tuple[str, Normalised]:
    price, qty = _finite(event.p, event.q)
    body = Normalised("aggTrade", event.s, event.T, price, qty, None, None, event.a, event.m)
    return f"aggtrades.{event.s}", body


def _book(event: BookTicker) -> tuple[str, Normalised]:
    bid, ask = _finite(event.b, event.a)
    # Spot's book ticker has no time of its own.
    body = Normalised("book", event.s, 0, None, None, bid, ask, event.u)
    return f"book.{event.s}", body


def _futures_book(event: FuturesBookTicker) -> tuple[str, Normalised]:
    bid, ask = _finite(event.b, event.a)
    body = Normalised("book", event.s, event.T, None, None, bid, ask, event.u)
    return f"book.{event.s}", body


def _depth(event: DepthUpdate) -> tuple[str, Normalised]:
    body = NormalisedDepth("depth", event.s, event.E, id=event.u, first_id=event.U)
    return f"depth.{event.s}", body


def _futures_depth(event: FuturesDepthUpdate) -> tuple[str, Normalised]:
    body = NormalisedDepth(
        "depth", event.s, event.E, id=event.u, first_id=event.U, prev_id=event.pu
    )
    return f"depth.{event.s}", body


def _kline(event: Kline) -> tuple[str, Normalised]:
    # Positional arguments and number pairs: a kline stream sends as often
    # as a trade stream does on a quiet symbol.
    k = event.k
    close, volume = _finite(k.c, k.v)
    high, low = _finite(k.h, k.l)
    open_, _ = _finite(k.o, k.o)
    body = NormalisedKline(
        "kline",
        event.s,
        k.T,
        close,
        volume,
        None,  # bid
        None,  # ask
        None,  # id
        None,  # buyer_maker
        open_,
        high,
        low,
        k.n,
        k.x,
        k.i,
        k.t,
    )
    return f"klines.{event.s}", body


def _ticker(event: Ticker) -> tuple[str, Normalised]:
    last, volume, open_, high, low, quote, change, pct = _numbers(
        event.c, event.v, event.o, event.h, event.l, event.q, event.p, event.P
    )
    body = NormalisedTicker(
        "ticker",
        event.s,
        event.E,
        last,
        volume,
        bid=_optional(event.b),
        ask=_optional(event.a),
        open=open_,
        high=high,
        low=low,
        quote_qty=quote,
        change=change,
        change_pct=pct,
        trades=event.n,
    )
    return f"tickers.{event.s}", body


def _mini_ticker(event: MiniTicker) -> tuple[str, Normalised]:
    last, volume, open_, high, low, quote = _numbers(
        event.c, event.v, event.o, event.h, event.l, event.q
    )
    body = NormalisedTicker(
        "miniTicker",
        event.s,
        event.E,
        last,
        volume,
        open=open_,
        high=high,
        low=low,
        quote_qty=quote,
    )
    return f"minitickers.{event.s}", body


def _avg_price(event: AvgPrice) -> tuple[str, Normalised]:
    (price,) = _numbers(event.w)
    body = NormalisedAvgPrice("avgPrice", event.s, event.E, price, interval=event.i)
    return f"avgprices.{event.s}", body


# By exact type, so a futures struct is not taken for the spot one it extends.
_BODIES: dict[type[Any], Callable[[Any], tuple[str, Normalised]]] = {
    Trade: _trade,
    FuturesTrade: _futures_trade,
    AggTrade: _agg_trade,
    BookTicker: _book,
    FuturesBookTicker: _futures_book,
    DepthUpdate: _depth,
    FuturesDepthUpdate: _futures_depth,
    Kline: _kline,
    Ticker: _ticker,
    MiniTicker: _mini_ticker,
    AvgPrice: _avg_price,
}


def normalise(event: Event) -> tuple[str, bytes]:
    """The bus topic and encoded payload for one event (encoded once, here).

    Raises:
        ValueError: a price or quantity that is not a finite number (JSON
            has neither infinities nor NaN).
        TypeError: ``event`` is not one of the event structs.
    """
    try:
        make = _BODIES[type(event)]
    except KeyError:
        raise TypeError(f"not a stream event: {event!r:.80}") from None
    topic, body = make(event)
    return topic, _ENCODER.encode(body)
