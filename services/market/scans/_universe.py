"""The simulated symbol universe a scan covers, and its candles generated where read.

The embedded simulator can quote any symbol: its history is a pure function
of the seed, the symbol and the anchor time. :class:`SimulatedCandles` serves
that history as a candle repository without a store, for tests and
benchmarks; the service fills a store from the simulator's REST klines.
"""

from __future__ import annotations

import attrs

from engine.lowlevel import check_count

from ..candles import TIMEFRAME_MS, TIMEFRAMES, Candles, DateRange
from ..simulator import DEFAULT_UNIVERSE, History, Instrument, universe

__all__ = ["DEFAULT_UNIVERSE", "SimulatedCandles", "universe"]


def check_timeframe(timeframe: object) -> str:
    """``timeframe`` if it is one of ``candles.TIMEFRAMES``.

    Raises:
        ValueError: naming the timeframes there are.
    """
    if timeframe not in TIMEFRAMES:
        raise ValueError(f"timeframe must be one of {', '.join(TIMEFRAMES)}, got {timeframe!r}")
    assert isinstance(timeframe, str)
    return timeframe


@attrs.frozen
class SimulatedCandles:
    """The simulator's candles, generated where they are read: a picklable repository.

    A :class:`services.market.candles.CandleRepository` for tests and
    benchmarks that want the simulated market without a store: each call
    generates the bars the simulator's ``/api/v3/klines`` would serve (closed
    bars only, as the fetcher stores them, but with unrounded prices). The
    service and the ``scan`` command read a store filled by the fetcher.

    Attributes:
        anchor_ms: the simulator's anchor (its start, or its ``epoch_ms``):
            "now" for the candles; the bar holding it is still open.
        seed: the simulator's seed.
    """

    anchor_ms: int
    seed: int = 0

    def __attrs_post_init__(self) -> None:
        check_count("anchor_ms", self.anchor_ms)
        check_count("seed", self.seed)

    def candles(self, symbol: str, timeframe: str, date_range: DateRange) -> Candles:
        """``symbol``'s closed bars of ``timeframe`` opening within ``date_range``.

        Raises:
            ValueError: an unknown timeframe.
        """
        if timeframe not in TIMEFRAME_MS:
            raise ValueError(
                f"timeframe must be one of {', '.join(TIMEFRAME_MS)}, got {timeframe!r}"
            )
        length = TIMEFRAME_MS[timeframe]
        history = History(self.seed, self.anchor_ms)
        first = max(-(-date_range.start_ms() // length) * length, history.earliest_open(length))
        end = min(date_range.end_ms(), self.anchor_ms // length * length)
        count = max(0, -(-(end - first) // length))
        if count == 0:
            return Candles.empty()
        c = history.candles(Instrument.create(symbol, self.seed), length, first, count)
        return Candles(c.open_time, c.open, c.high, c.low, c.close, c.volume)
