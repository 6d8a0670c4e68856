"""What a scan runs per symbol, in a worker process: candles, indicators, the formula."""

from __future__ import annotations

import attrs

from ._formula import Formula
from ._indicators import latest_values
from ._universe import SimulatedKlines


@attrs.frozen
class SymbolResult:
    """One symbol's scan result.

    Attributes:
        symbol: the symbol.
        matched: whether its latest values satisfy the formula.
        close: its latest close.
        values: the formula's indicators at the latest bar, by name (NaN
            where too few bars; JSON shows null).
    """

    symbol: str
    matched: bool
    close: float
    values: dict[str, float]


@attrs.frozen
class ScanJob:
    """The per-symbol function of a scan; pickled once per chunk of symbols.

    Attributes:
        formula: the checked formula.
        klines: where each symbol's candles come from.
    """

    formula: Formula
    klines: SimulatedKlines

    def __call__(self, symbol: str) -> SymbolResult:
        """Scan one symbol (in a worker process)."""
        klines = self.klines.klines(symbol)
        values = latest_values(self.formula.indicators, klines)
        matched = self.formula.evaluate(values)
        return SymbolResult(symbol, matched, float(klines.close[-1]), values)
