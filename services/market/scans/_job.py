"""What a scan runs per symbol, in a worker process: candles, indicators, the formula."""

from __future__ import annotations

import math

import attrs

from ..candles import TIMEFRAME_MS, CandleRepository, DateRange
from ._evaluate import FormulaService
from ._formula import Formula


@attrs.frozen
class SymbolResult:
    """One symbol's scan result.

    Attributes:
        symbol: the symbol.
        matched: whether the formula holds at the range's last bar (the
            latest-bar view).
        close: the close of the range's last bar (NaN with no bar in range).
        values: the formula's indicators at the range's last bar, by name
            (NaN where too few bars; JSON shows null).
        matches: the opening times (ms since the epoch, UTC) of every bar in
            the range where the formula holds, oldest first.
    """

    symbol: str
    matched: bool
    close: float
    values: dict[str, float]
    matches: tuple[int, ...] = ()


@attrs.frozen
class ScanJob:
    """The per-symbol function of a scan; pickled once per chunk of symbols.

    Reads the symbol's bars of the range from the repository, with the
    warm-up bars before it that the formula's indicators need, and evaluates
    the formula at every bar.

    Attributes:
        formula: the checked formula, its parameters bound.
        candles: where each symbol's candles come from (opened lazily in
            each worker).
        timeframe: the bars' length, such as ``"1d"``.
        date_range: the bars a scan reports on.
        service: evaluates the formula.
    """

    formula: Formula
    candles: CandleRepository
    timeframe: str
    date_range: DateRange
    service: FormulaService = attrs.Factory(FormulaService)

    def reading(self) -> DateRange:
        """The bars read per symbol: the range, and the warm-up bars before it."""
        warmup = self.service.warmup_bars(self.formula) * TIMEFRAME_MS[self.timeframe]
        return DateRange.from_ms(self.date_range.start_ms() - warmup, self.date_range.end_ms())

    def __call__(self, symbol: str) -> SymbolResult:
        """Scan one symbol (in a worker process)."""
        start = self.date_range.start_ms()
        candles = self.candles.candles(symbol, self.timeframe, self.reading())
        matches, values = self.service.evaluate(self.formula, candles, start_ms=start)
        if not len(candles) or candles.open_time[-1] < start:
            return SymbolResult(symbol, False, math.nan, values, matches)
        last = int(candles.open_time[-1])
        matched = bool(matches) and matches[-1] == last
        return SymbolResult(symbol, matched, float(candles.close[-1]), values, matches)
