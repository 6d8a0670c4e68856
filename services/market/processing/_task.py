"""What a worker process runs for each symbol of a batch."""

from __future__ import annotations

import time

import attrs

from ..candles import CandleRepository, DateRange
from ..scans import Formula, FormulaService
from ._job import ProcessingResult


@attrs.frozen
class SymbolTask:
    """One batch's per-symbol function; pickled once per call of several symbols.

    Attributes:
        repository: where candles come from (opened lazily in each worker).
        service: evaluates the formula.
        timeframe: the job's timeframe.
        reading: the bars to read: the job's range and the warm-up before it.
        start_ms: the job's range's first millisecond; matches start there.
        formula: the bound formula, or ``None`` to read candles only.
    """

    repository: CandleRepository
    service: FormulaService
    timeframe: str
    reading: DateRange
    start_ms: int
    formula: Formula | None

    def __call__(self, symbol: str) -> ProcessingResult:
        """Read ``symbol``'s candles and evaluate the formula over them (in a worker)."""
        started = time.perf_counter()
        candles = self.repository.candles(symbol, self.timeframe, self.reading)
        if self.formula is None:
            matches: tuple[int, ...] = ()
            computed: dict[str, float] = {}
        else:
            matches, computed = self.service.evaluate(self.formula, candles, start_ms=self.start_ms)
        elapsed_ms = (time.perf_counter() - started) * 1000.0
        return ProcessingResult(symbol, matches, computed, elapsed_ms)
