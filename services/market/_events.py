"""Binance public stream messages as typed structs, and their normalised form.

Decoded with msgspec, several times faster than the stdlib ``json`` on the
path every message takes, in two steps: the combined-stream envelope with
its ``data`` kept raw, then ``data`` into the struct its stream name calls
for. Field names are Binance's, so the wire format is documented by the
types.

The structs are ``gc=False``: they hold only strings, numbers and lists of
string pairs, so they can never be part of a reference cycle, and leaving
them out of the garbage collector's tracking saves it work at every message
(and the decoder some of its time).

What a decoded event holds is what the rest of the service can take as it
is: its symbol is one plain topic token (ASCII letters and digits, at most
:data:`MAX_SYMBOL_LENGTH` of them, as the service's own symbols and the
broadcast's topic names are), its whole numbers fit Binance's 64-bit
fields (a trade id is not negative), and :func:`normalise` refuses a price
or quantity that is not a finite number. Anything else is a
:class:`MalformedMessage`, which the feed counts; it never stops a batch.
"""

from __future__ import annotations

from typing import Annotated

import msgspec

# Binance's numbers are Java longs; a wider one is not a Binance message.
_Int64 = Annotated[int, msgspec.Meta(ge=-(2**63), le=2**63 - 1)]
# A trade id, from which the feed counts gaps.
_TradeId = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]
# The longest symbol a frame may carry; Binance's are up to about 20 characters.
MAX_SYMBOL_LENGTH = 32


class Trade(msgspec.Struct, frozen=True, gc=False):
    """``<symbol>@trade``."""

    E: _Int64  # event time, ms
    s: str  # symbol
    t: _TradeId  # trade id, consecutive per symbol
    p: str  # price
    q: str  # quantity
    T: _Int64  # trade time, ms
    m: bool  # buyer is the maker


class AggTrade(msgspec.Struct, frozen=True, gc=False):
    """``<symbol>@aggTrade``."""

    E: _Int64
    s: str
    a: _Int64  # aggregate trade id
    p: str
    q: str
    f: _Int64  # first trade id
    l: _Int64  # noqa: E741  # last trade id; Binance's own field name
    T: _Int64
    m: bool


class BookTicker(msgspec.Struct, frozen=True, gc=False):
    """``<symbol>@bookTicker``: the best bid and ask."""

    u: _Int64  # update id
    s: str
    b: str  # best bid price
    B: str  # best bid quantity
    a: str  # best ask price
    A: str  # best ask quantity


class DepthUpdate(msgspec.Struct, frozen=True, gc=False):
    """``<symbol>@depth``: order book changes."""

    E: _Int64
    s: str
    U: _Int64  # first update id
    u: _Int64  # final update id
    b: list[tuple[str, str]]
    a: list[tuple[str, str]]


class KlineData(msgspec.Struct, frozen=True, gc=False):
    """The ``k`` object of a kline event."""

    t: _Int64  # open time
    T: _Int64  # close time
    s: str
    i: str  # interval
    o: str
    c: str
    h: str
    l: str  # noqa: E741  # low; Binance's own field name
    v: str
    n: _Int64  # number of trades
    x: bool  # closed


class Kline(msgspec.Struct, frozen=True, gc=False):
    """``<symbol>@kline_<interval>``."""

    E: _Int64
    s: str
    k: KlineData


Event = Trade | AggTrade | BookTicker | DepthUpdate | Kline


class Envelope(msgspec.Struct, frozen=True, gc=False):
    """The combined-stream wrapper ``{"stream": ..., "data": ...}``."""

    stream: str
    data: msgspec.Raw


_DECODERS: dict[str, msgspec.json.Decoder[Event]] = {
    "trade": msgspec.json.Decoder(Trade),
    "aggTrade": msgspec.json.Decoder(AggTrade),
    "bookTicker": msgspec.json.Decoder(BookTicker),
    "depth": msgspec.json.Decoder(DepthUpdate),
    "kline": msgspec.json.Decoder(Kline),
}
_ENVELOPE = msgspec.json.Decoder(Envelope)
# Stream names seen, with their decoders; Binance allows 1,024 per connection.
_BY_STREAM: dict[str, msgspec.json.Decoder[Event]] = {}
_STREAMS_KEPT = 4096


class MalformedMessage(ValueError):
    """A frame that is not a Binance stream message of a known kind."""


def stream_kind(stream: str) -> str:
    """``"btcusdt@kline_1m"`` -> ``"kline"``; ``"btcusdt@depth@100ms"`` -> ``"depth"``."""
    try:
        kind = stream.split("@", 2)[1]
    except IndexError:
        raise MalformedMessage(f"not a stream name: {stream!r}") from None
    return kind.split("_", 1)[0]


def _decoder(stream: str) -> msgspec.json.Decoder[Event]:
    """The decoder for a stream name, remembered: a connection has a few fixed names."""
    decoder = _DECODERS.get(stream_kind(stream))
    if decoder is None:
        raise MalformedMessage(f"unknown stream kind in {stream!r}")
    if len(_BY_STREAM) >= _STREAMS_KEPT:  # a bound, against a stream of made-up names
        _BY_STREAM.clear()
    _BY_STREAM[stream] = decoder
    return decoder


def decode(frame: str | bytes) -> tuple[str, Event]:
    """One combined-stream frame into ``(stream name, typed event)``.

    Raises:
        MalformedMessage: invalid JSON (nested too deep included), a missing
            or mistyped field, a number out of its field's range, an unknown
            stream kind, or a symbol that is not one; the message says which.
    """
    try:
        envelope = _ENVELOPE.decode(frame)
        stream = envelope.stream
        decoder = _BY_STREAM.get(stream) or _decoder(stream)
        event = decoder.decode(envelope.data)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise MalformedMessage(str(exc)) from exc
    except RecursionError:  # msgspec's guard against deep nesting
        raise MalformedMessage("JSON nested too deeply") from None
    symbol = event.s
    # The symbol becomes a topic token (``trades.<symbol>``) and a key of
    # per-symbol state: a dot, a wildcard, a space or an empty name would
    # make the bus refuse the topic, or publish where nobody subscribed.
    if not (symbol.isascii() and symbol.isalnum() and len(symbol) <= MAX_SYMBOL_LENGTH):
        raise MalformedMessage(
            f"symbol must be 1 to {MAX_SYMBOL_LENGTH} ASCII letters or digits, got {symbol[:40]!r}"
        )
    return stream, event


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


KINDS = ("trades", "aggtrades", "book", "depth", "klines")
"""The first tokens of the topics :func:`normalise` publishes on."""


def normalise(event: Event) -> tuple[str, bytes]:
    """The bus topic and encoded payload for one event (encoded once, here).

    Raises:
        ValueError: a price or quantity that is not a finite number (JSON
            has neither infinities nor NaN).
    """
    match event:
        case Trade():
            price, qty = _finite(event.p, event.q)
            body = Normalised(
                "trade", event.s, event.T, price, qty, id=event.t, buyer_maker=event.m
            )
            topic = f"trades.{event.s}"
        case AggTrade():
            price, qty = _finite(event.p, event.q)
            body = Normalised(
                "aggTrade", event.s, event.T, price, qty, id=event.a, buyer_maker=event.m
            )
            topic = f"aggtrades.{event.s}"
        case BookTicker():
            bid, ask = _finite(event.b, event.a)
            body = Normalised("book", event.s, 0, bid=bid, ask=ask, id=event.u)
            topic = f"book.{event.s}"
        case DepthUpdate():
            body = Normalised("depth", event.s, event.E, id=event.u)
            topic = f"depth.{event.s}"
        case Kline():
            close, volume = _finite(event.k.c, event.k.v)
            body = Normalised("kline", event.s, event.k.T, close, volume)
            topic = f"klines.{event.s}"
    return topic, _ENCODER.encode(body)
