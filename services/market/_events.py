"""Binance public stream messages as typed structs, and their normalised form.

Decoded with msgspec, several times faster than the stdlib ``json`` on the
path every message takes, in two steps: the combined-stream envelope with
its ``data`` kept raw, then ``data`` into the struct its stream name calls
for. The structs are in ``_events_wire.py``, what is published for them in
``_events_published.py``, and the frames that are not market data
(subscription replies, ``serverShutdown``) in ``_events_control.py``.

Spot and USDⓈ-M futures send some kinds in different shapes; a decoder is
made for one :class:`Market` (:func:`decoder_for`; :func:`market_of` tells
a stream URL's), so a futures message is read whole, as its futures
struct. :func:`decode` is the spot decoder.

What a decoded event holds is what the rest of the service can take as it
is: its symbol is one plain topic token (ASCII letters and digits, at most
:data:`MAX_SYMBOL_LENGTH` of them, as the service's own symbols and the
broadcast's topic names are), its whole numbers fit Binance's 64-bit
fields (a trade id is not negative), and :func:`normalise` refuses a price
or quantity that is not a finite number. Anything else is a
:class:`MalformedMessage`, which the feed counts; it never stops a batch.
"""

from __future__ import annotations

import enum
import urllib.parse
from collections.abc import Callable, Mapping

import msgspec

from ._events_control import SHUTDOWN_STREAM as SHUTDOWN_STREAM
from ._events_control import ControlFrame as ControlFrame
from ._events_control import MalformedMessage as MalformedMessage
from ._events_control import ServerShutdown as ServerShutdown
from ._events_control import SubscriptionReply as SubscriptionReply
from ._events_control import control_from, shutdown_from
from ._events_published import KINDS as KINDS
from ._events_published import Normalised as Normalised
from ._events_published import NormalisedAvgPrice as NormalisedAvgPrice
from ._events_published import NormalisedDepth as NormalisedDepth
from ._events_published import NormalisedKline as NormalisedKline
from ._events_published import NormalisedTicker as NormalisedTicker
from ._events_published import NormalisedTrade as NormalisedTrade
from ._events_published import normalise as normalise
from ._events_wire import AggTrade as AggTrade
from ._events_wire import AvgPrice as AvgPrice
from ._events_wire import BookTicker as BookTicker
from ._events_wire import DepthUpdate as DepthUpdate
from ._events_wire import Event as Event
from ._events_wire import FuturesBookTicker as FuturesBookTicker
from ._events_wire import FuturesDepthUpdate as FuturesDepthUpdate
from ._events_wire import FuturesTrade as FuturesTrade
from ._events_wire import Kline as Kline
from ._events_wire import KlineData as KlineData
from ._events_wire import MiniTicker as MiniTicker
from ._events_wire import Ticker as Ticker
from ._events_wire import Trade as Trade
from ._events_wire import order_key as order_key

# The longest symbol a frame may carry; Binance's are up to about 20 characters.
MAX_SYMBOL_LENGTH = 32


class Market(enum.StrEnum):
    """Which exchange a stream connection is to, which decides its messages' shapes."""

    SPOT = "spot"
    USDM = "usdm"  # USDⓈ-M futures


# Hosts whose streams are USDⓈ-M futures (the second is its testnet); COIN-M's
# (dstream) have shapes of their own, which no decoder here reads.
_USDM_HOSTS = frozenset({"fstream.binance.com", "fstream.binancefuture.com"})
_COINM_HOSTS = frozenset({"dstream.binance.com", "dstream.binancefuture.com"})


def market_of(url: str) -> Market:
    """The market a stream URL serves: USDⓈ-M futures for ``fstream.binance.com``, else spot.

    Spot is Binance's ``stream.binance.com``, ``data-stream.binance.vision``,
    its testnet, and any other host (the simulator's).

    Raises:
        ValueError: a COIN-M futures host (``dstream.binance.com``), whose
            messages neither decoder reads whole.
    """
    host = (urllib.parse.urlsplit(url).hostname or "").lower()
    if host in _COINM_HOSTS:
        raise ValueError(f"COIN-M futures streams are not supported, got {url!r}")
    return Market.USDM if host in _USDM_HOSTS else Market.SPOT


class Envelope(msgspec.Struct, frozen=True, gc=False):
    """The combined-stream wrapper ``{"stream": ..., "data": ...}``."""

    stream: str
    data: msgspec.Raw


_KINDS: dict[Market, dict[str, type[Event]]] = {
    Market.SPOT: {
        "trade": Trade,
        "aggTrade": AggTrade,
        "bookTicker": BookTicker,
        "depth": DepthUpdate,
        "kline": Kline,
        "ticker": Ticker,
        "miniTicker": MiniTicker,
        "avgPrice": AvgPrice,
    },
    Market.USDM: {
        "trade": FuturesTrade,
        "aggTrade": AggTrade,
        "bookTicker": FuturesBookTicker,
        "depth": FuturesDepthUpdate,
        "kline": Kline,
        "ticker": Ticker,
        "miniTicker": MiniTicker,
    },
}
STREAM_KINDS: Mapping[Market, frozenset[str]] = {
    market: frozenset(kinds) for market, kinds in _KINDS.items()
}
"""The stream kinds each market's decoder reads (``kline``: every ``kline_<interval>``)."""

_ENVELOPE = msgspec.json.Decoder(Envelope)
# Stream names remembered with their decoders, per decoder; Binance allows
# 1,024 per connection.
_STREAMS_KEPT = 4096


def stream_kind(stream: str) -> str:
    """The kind a stream name names.

    ``"btcusdt@kline_1m"`` -> ``"kline"``; ``"btcusdt@depth@100ms"`` ->
    ``"depth"``; ``"btcusdt@ticker_1h"`` -> ``"ticker_1h"`` (a rolling window,
    not the 24-hour ``ticker``).

    Raises:
        MalformedMessage: no ``@`` in ``stream``.
    """
    try:
        name = stream.split("@", 2)[1]
    except IndexError:
        raise MalformedMessage(f"not a stream name: {stream!r}") from None
    return "kline" if name.startswith("kline_") else name


DecodeFn = Callable[[str | bytes], tuple[str, Event]]


def decoder_for(market: Market) -> DecodeFn:
    """A ``decode(frame) -> (stream name, event)`` function for ``market``'s streams.

    Each call returns a new function with its own memory of stream names.

    Raises:
        ValueError: ``market`` is not a :class:`Market`.
    """
    if not isinstance(market, Market):
        raise ValueError(f"market must be a Market, got {market!r}")
    decoders = {kind: msgspec.json.Decoder(cls) for kind, cls in _KINDS[market].items()}
    by_stream: dict[str, msgspec.json.Decoder[Event]] = {}
    envelope_decode = _ENVELOPE.decode

    def remember(stream: str, data: msgspec.Raw) -> msgspec.json.Decoder[Event]:
        """The decoder for a stream name, remembered: a connection has a few fixed names."""
        if stream == SHUTDOWN_STREAM:
            raise shutdown_from(data)
        decoder = decoders.get(stream_kind(stream))
        if decoder is None:
            raise MalformedMessage(f"unknown stream kind in {stream!r} for {market} streams")
        if len(by_stream) >= _STREAMS_KEPT:  # a bound, against a stream of made-up names
            by_stream.clear()
        by_stream[stream] = decoder
        return decoder

    def decode(frame: str | bytes) -> tuple[str, Event]:
        """One combined-stream frame into ``(stream name, typed event)``.

        Raises:
            SubscriptionReply: the frame is a reply to a request sent on
                the connection (a :class:`ControlFrame`).
            ServerShutdown: the server announced its shutdown (a
                :class:`ControlFrame`): open a new connection now.
            MalformedMessage: invalid JSON (nested too deep included), a
                missing or mistyped field, a number out of its field's
                range, an unknown stream kind, or a symbol that is not one;
                the message says which.
        """
        try:
            envelope = envelope_decode(frame)
        except msgspec.ValidationError as exc:  # JSON, but not a stream message
            raise control_from(frame, exc) from None
        except msgspec.DecodeError as exc:
            raise MalformedMessage(str(exc)) from exc
        except RecursionError:  # msgspec's guard against deep nesting
            raise MalformedMessage("JSON nested too deeply") from None
        stream = envelope.stream
        try:
            decoder = by_stream.get(stream) or remember(stream, envelope.data)
            event = decoder.decode(envelope.data)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise MalformedMessage(str(exc)) from exc
        except RecursionError:
            raise MalformedMessage("JSON nested too deeply") from None
        symbol = event.s
        # The symbol becomes a topic token (``trades.<symbol>``) and a key of
        # per-symbol state: a dot, a wildcard, a space or an empty name would
        # make the bus refuse the topic, or publish where nobody subscribed.
        if not (symbol.isascii() and symbol.isalnum() and len(symbol) <= MAX_SYMBOL_LENGTH):
            raise MalformedMessage(
                f"symbol must be 1 to {MAX_SYMBOL_LENGTH} ASCII letters or digits,"
                f" got {symbol[:40]!r}"
            )
        return stream, event

    return decode


decode: DecodeFn = decoder_for(Market.SPOT)
"""One spot combined-stream frame into ``(stream name, typed event)``.

Raises:
    SubscriptionReply, ServerShutdown: a control frame (see :func:`decoder_for`).
    MalformedMessage: anything else that is not a spot stream message.
"""
