"""The formula service: a formula over one symbol's candles, every bar at once."""

from __future__ import annotations

import math
from typing import Protocol

import attrs
import numpy as np
import numpy.typing as npt

from ._formula import Formula
from ._indicators import KlinesLike, series_values

#: Bars a smoothed indicator reads before a range, per bar it needs for its
#: first value: EMA- and Wilder-smoothed values depend on their seed, whose
#: weight falls with every bar after it. A window (``sma50``) needs its
#: window alone.
WARMUP_FACTOR = 3
#: The indicators whose values depend on every bar before them.
SMOOTHED = frozenset({"ema", "rsi", "atr", "macd", "macd_signal", "macd_hist"})


class TimedKlines(KlinesLike, Protocol):
    """Candles with each bar's opening time (milliseconds), such as ``candles.Candles``."""

    @property
    def open_time(self) -> npt.ArrayLike: ...


@attrs.frozen
class FormulaService:
    """Evaluates formulas over candles; stateless and picklable, so it runs in workers.

    A subclass may change how far back indicators read (:meth:`warmup_bars`)
    or how a formula is evaluated; it must stay picklable.
    """

    def warmup_bars(self, formula: Formula) -> int:
        """How many bars before a range the formula's indicators read.

        Enough for every indicator to be defined at the range's first bar,
        and settled: the bars a window needs (``sma50``: 50), and
        ``WARMUP_FACTOR`` times that for a smoothed indicator (``rsi14``:
        3 x 15); 0 for a formula of prices alone.
        """
        return max(
            (
                indicator.bars_needed * (WARMUP_FACTOR if indicator.name in SMOOTHED else 1)
                for indicator in formula.indicators
                if indicator.bars_needed > 1
            ),
            default=0,
        )

    def evaluate(
        self, formula: Formula, candles: TimedKlines, *, start_ms: int | None = None
    ) -> tuple[tuple[int, ...], dict[str, float]]:
        """Where ``formula`` holds over ``candles``, and its indicators at the last bar.

        Args:
            formula: a formula with its parameters bound.
            candles: the bars, oldest first, warm-up bars included, with
                their ``open_time`` (milliseconds) beside the prices.
            start_ms: report only matches of bars opening at or after this
                time (the range's start; earlier bars are warm-up); ``None``
                for all.

        Returns:
            ``(matches, computed_indicators)``: the open times of the bars
            where the formula holds (unknown, as with a NaN, is no match), and
            each indicator's value at the last bar by its canonical name, NaN
            where not defined or when no bar opens at or after ``start_ms``.

        Raises:
            FormulaError: the formula has unbound parameters.
            ValueError: the candles are malformed.
        """
        values = series_values(formula.indicators, candles)
        times = np.asarray(candles.open_time, dtype=np.int64)
        holds = formula.evaluate_series(values, bars=len(times))
        first = 0 if start_ms is None else int(np.searchsorted(times, start_ms))
        matches = tuple(times[first:][holds[first:]].tolist())
        if first < len(times):
            computed = {key: float(series[-1]) for key, series in values.items()}
        else:
            computed = dict.fromkeys(values, math.nan)
        return matches, computed
