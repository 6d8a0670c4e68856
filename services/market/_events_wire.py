"""Binance stream messages as typed structs: the wire format, spot and USDⓈ-M futures.

Field names are Binance's, so the types document the wire format. Spot
structs hold exactly what spot sends; a futures shape that carries more
(``E``/``T`` on the book ticker, ``pu`` on a depth update, ``X`` on a
trade) is a subclass with those fields required, so a futures message is
never read as its spot half, and code written for the spot struct (the
feed's trade-gap count, :func:`normalise`) takes the futures one too.

The structs are ``gc=False``: they hold only strings, numbers and lists of
string pairs, so they can never be part of a reference cycle, and leaving
them out of the garbage collector's tracking saves it work at every message
(and the decoder some of its time).
"""

from __future__ import annotations

from collections.abc import Callable
from operator import attrgetter
from typing import Annotated, Any

import msgspec

# Binance's numbers are Java longs; a wider one is not a Binance message.
Int64 = Annotated[int, msgspec.Meta(ge=-(2**63), le=2**63 - 1)]
# A trade id, from which the feed counts gaps.
TradeId = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]


class Trade(msgspec.Struct, frozen=True, gc=False):
    """``<symbol>@trade``."""

    E: Int64  # event time, ms
    s: str  # symbol
    t: TradeId  # trade id, consecutive per symbol
    p: str  # price
    q: str  # quantity
    T: Int64  # trade time, ms
    m: bool  # buyer is the maker


class FuturesTrade(Trade, frozen=True, gc=False):
    """``<symbol>@trade`` on USDⓈ-M futures: a spot trade plus its type."""

    X: str  # the trade's type, such as "MARKET"


class AggTrade(msgspec.Struct, frozen=True, gc=False):
    """``<symbol>@aggTrade`` (the same shape on spot and futures)."""

    E: Int64
    s: str
    a: Int64  # aggregate trade id
    p: str
    q: str
    f: Int64  # first trade id
    l: Int64  # noqa: E741  # last trade id; Binance's own field name
    T: Int64
    m: bool


class BookTicker(msgspec.Struct, frozen=True, gc=False):
    """``<symbol>@bookTicker``: the best bid and ask."""

    u: Int64  # update id
    s: str
    b: str  # best bid price
    B: str  # best bid quantity
    a: str  # best ask price
    A: str  # best ask quantity


class FuturesBookTicker(BookTicker, frozen=True, gc=False):
    """``<symbol>@bookTicker`` on USDⓈ-M futures: with its event and transaction times."""

    E: Int64  # event time, ms
    T: Int64  # transaction time, ms


class DepthUpdate(msgspec.Struct, frozen=True, gc=False):
    """``<symbol>@depth``: order book changes."""

    E: Int64
    s: str
    U: Int64  # first update id
    u: Int64  # final update id
    b: list[tuple[str, str]]
    a: list[tuple[str, str]]


class FuturesDepthUpdate(DepthUpdate, frozen=True, gc=False):
    """``<symbol>@depth`` on USDⓈ-M futures: ``pu`` chains it to the previous update."""

    T: Int64  # transaction time, ms
    pu: Int64  # the previous update's final id (``u``): the chain to check


class KlineData(msgspec.Struct, frozen=True, gc=False):
    """The ``k`` object of a kline event."""

    t: Int64  # open time
    T: Int64  # close time
    s: str
    i: str  # interval
    o: str
    c: str
    h: str
    l: str  # noqa: E741  # low; Binance's own field name
    v: str
    n: Int64  # number of trades
    x: bool  # closed


class Kline(msgspec.Struct, frozen=True, gc=False):
    """``<symbol>@kline_<interval>`` (the same shape on spot and futures)."""

    E: Int64
    s: str
    k: KlineData


class Ticker(msgspec.Struct, frozen=True, gc=False):
    """``<symbol>@ticker``: 24-hour rolling window statistics.

    The best bid and ask are spot's; futures' ticker leaves them out.
    """

    E: Int64
    s: str
    p: str  # price change
    P: str  # price change percent
    w: str  # weighted average price
    c: str  # last price
    Q: str  # last quantity
    o: str  # open
    h: str  # high
    l: str  # noqa: E741  # low; Binance's own field name
    v: str  # base asset volume
    q: str  # quote asset volume
    O: Int64  # noqa: E741  # statistics open time; Binance's own field name
    C: Int64  # statistics close time
    F: Int64  # first trade id
    L: Int64  # last trade id
    n: Int64  # number of trades
    b: str | None = None  # best bid price (spot)
    a: str | None = None  # best ask price (spot)


class MiniTicker(msgspec.Struct, frozen=True, gc=False):
    """``<symbol>@miniTicker``: the 24-hour window's prices and volumes."""

    E: Int64
    s: str
    c: str  # close (last) price
    o: str
    h: str
    l: str  # noqa: E741  # low; Binance's own field name
    v: str
    q: str


class AvgPrice(msgspec.Struct, frozen=True, gc=False):
    """``<symbol>@avgPrice`` (spot): the average price over an interval."""

    E: Int64
    s: str
    i: str  # the interval, such as "5m"
    w: str  # the average price
    T: Int64  # last trade time


Event = Trade | AggTrade | BookTicker | DepthUpdate | Kline | Ticker | MiniTicker | AvgPrice
"""Every decoded stream message (the futures shapes are subclasses of the spot ones)."""


def _event_time(event: Kline | Ticker | MiniTicker | AvgPrice) -> int:
    return event.E


_ORDER_KEYS: dict[type[Any], Callable[[Any], int]] = {
    Trade: attrgetter("t"),
    FuturesTrade: attrgetter("t"),
    AggTrade: attrgetter("a"),
    BookTicker: attrgetter("u"),
    FuturesBookTicker: attrgetter("u"),
    DepthUpdate: attrgetter("u"),
    FuturesDepthUpdate: attrgetter("u"),
    Kline: _event_time,
    Ticker: _event_time,
    MiniTicker: _event_time,
    AvgPrice: _event_time,
}


def order_key(event: Event) -> int:
    """The number that grows along one stream: its trade, aggregate or update id, or event time.

    Two connections to the same stream overlap while one replaces the other;
    an event from the new one whose key is not above the last the old one
    delivered on that stream is one already seen.

    Raises:
        TypeError: ``event`` is not one of the event structs.
    """
    try:
        key = _ORDER_KEYS[type(event)]
    except KeyError:
        raise TypeError(f"not a stream event: {event!r:.80}") from None
    return key(event)
