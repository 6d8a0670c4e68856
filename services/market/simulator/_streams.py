"""Binance stream names: ``btcusdt@trade``, ``ethusdt@kline_1m`` and the rest."""

from __future__ import annotations

import enum
from collections.abc import Mapping

import attrs

from ._config import INTERVALS_MS
from ._instruments import Instrument

# Binance caps a connection at 1024 streams; so does the simulator.
MAX_STREAMS = 1024


class Kind(enum.StrEnum):
    """The stream types the simulator sends."""

    TRADE = "trade"
    AGG_TRADE = "aggTrade"
    BOOK_TICKER = "bookTicker"
    DEPTH = "depth"
    KLINE = "kline"
    TICKER = "ticker"
    MINI_TICKER = "miniTicker"
    AVG_PRICE = "avgPrice"


@attrs.frozen
class StreamSpec:
    """One parsed stream name (private).

    Attributes:
        name: the name as the client wrote it, echoed in the combined wrapper.
        instrument: the symbol's parameters.
        kind: the message type.
        interval: the kline interval name (``"1m"``), or ``""``.
        interval_ms: its length in milliseconds, or 0.
    """

    name: str
    instrument: Instrument
    kind: Kind
    interval: str = ""
    interval_ms: int = 0


class UnknownStream(ValueError):
    """A stream name the simulator does not serve (private; a ``ValueError``)."""


# Suffixes after "<symbol>@" that name a stream, and what they mean.
_FIXED = {
    "trade": Kind.TRADE,
    "aggTrade": Kind.AGG_TRADE,
    "bookTicker": Kind.BOOK_TICKER,
    "depth": Kind.DEPTH,
    "depth@100ms": Kind.DEPTH,
    "depth@1000ms": Kind.DEPTH,
    "ticker": Kind.TICKER,
    "miniTicker": Kind.MINI_TICKER,
    "avgPrice": Kind.AVG_PRICE,
}


def parse_stream(name: str, known: Mapping[str, Instrument]) -> StreamSpec:
    """The stream ``name`` names.

    Args:
        name: a stream name such as ``"btcusdt@trade"``.
        known: the simulator's instruments by upper-case symbol.

    Raises:
        UnknownStream: the symbol is not listed or the suffix is not a stream.
    """
    lower, at, suffix = name.partition("@")
    instrument = known.get(lower.upper()) if lower == lower.lower() else None
    if not at or instrument is None:
        raise UnknownStream(f"unknown stream {name!r}: no symbol {lower!r} is listed")
    kind = _FIXED.get(suffix)
    if kind is not None:
        return StreamSpec(name, instrument, kind)
    interval = suffix.removeprefix("kline_")
    if interval != suffix and interval in INTERVALS_MS:
        return StreamSpec(name, instrument, Kind.KLINE, interval, INTERVALS_MS[interval])
    raise UnknownStream(f"unknown stream {name!r}: {suffix!r} is not a stream type")


def parse_streams(names: list[str], known: Mapping[str, Instrument]) -> list[StreamSpec]:
    """Every stream of ``names``, in order, once each.

    Raises:
        UnknownStream: a name is unknown, or there are more than 1024.
    """
    unique = list(dict.fromkeys(name for name in names if name))
    if len(unique) > MAX_STREAMS:
        raise UnknownStream(f"too many streams: {len(unique)}, at most {MAX_STREAMS}")
    return [parse_stream(name, known) for name in unique]
