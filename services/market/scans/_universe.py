"""The simulated symbol universe a scan covers, and the candles of each symbol.

The embedded simulator can quote any symbol: its history is a pure function
of the seed, the symbol and the anchor time. A scan of the simulated market
therefore generates each symbol's candles where the indicators are computed,
in the worker process, exactly as the simulator's ``/api/v3/klines`` would
return them, instead of shipping 2,500 symbols' arrays from the service.
"""

from __future__ import annotations

import attrs

from engine.lowlevel import check_count

from ..simulator import (
    DEFAULT_UNIVERSE,
    INTERVALS_MS,
    MAX_HISTORY,
    History,
    Instrument,
    universe,
)
from ._indicators import Klines

__all__ = ["DEFAULT_UNIVERSE", "SimulatedKlines", "universe"]

MAX_BARS = 1_000  # as Binance's klines limit


def _interval(instance: object, attribute: attrs.Attribute[str], value: str) -> None:
    if value not in INTERVALS_MS:
        raise ValueError(f"interval must be one of {', '.join(INTERVALS_MS)}, got {value!r}")


def _bars(instance: object, attribute: attrs.Attribute[int], value: int) -> None:
    check_count("bars", value, minimum=1)
    if value > MAX_BARS:
        raise ValueError(f"bars must be at most {MAX_BARS}, got {value!r}")


@attrs.frozen
class SimulatedKlines:
    """The simulator's candles, generated where they are used (picklable, small).

    Attributes:
        seed: the simulator's seed.
        anchor_ms: the simulator's anchor (its start, or its ``epoch_ms``):
            the candles end with the one holding it.
        interval: a Binance interval name (``"1d"``).
        bars: candles per symbol (at most 1,000, as Binance's limit).
    """

    anchor_ms: int
    seed: int = 0
    interval: str = attrs.field(default="1d", validator=_interval)
    bars: int = attrs.field(default=250, validator=_bars)

    def __attrs_post_init__(self) -> None:
        check_count("anchor_ms", self.anchor_ms)
        check_count("seed", self.seed)
        if self.bars > MAX_HISTORY:  # pragma: no cover - MAX_BARS is far below
            raise ValueError("bars exceeds the simulator's history")

    def klines(self, symbol: str) -> Klines:
        """The ``bars`` candles of ``symbol`` ending with the one holding the anchor.

        They are the candles the simulator's ``/api/v3/klines`` serves for
        that range.
        """
        interval_ms = INTERVALS_MS[self.interval]
        last_open = self.anchor_ms // interval_ms * interval_ms
        first_open = last_open - (self.bars - 1) * interval_ms
        history = History(self.seed, self.anchor_ms)
        c = history.candles(
            Instrument.create(symbol, self.seed), interval_ms, first_open, self.bars
        )
        return Klines(c.open, c.high, c.low, c.close, c.volume)
