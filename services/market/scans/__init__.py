"""Scans: indicators over the symbol universe, filtered by user formulas.

Formulas such as ``rsi14 < 30 and macd_hist > 0 and close > sma50`` are parsed
by a small whitelisted grammar into a checked expression tree and evaluated
over each symbol's latest indicator values (or at every bar, with
`series_values` and ``Formula.evaluate_series``); they are never ``eval``-ed.
Indicator parameters may be names (``rsi(period) < 30``), bound later with
``Formula.bind``.

See ``docs/formulas.md``.
"""

from __future__ import annotations

from ._evaluate import WARMUP_FACTOR as WARMUP_FACTOR
from ._evaluate import FormulaService as FormulaService
from ._evaluate import TimedKlines as TimedKlines
from ._formula import MAX_FORMULA_DEPTH as MAX_FORMULA_DEPTH
from ._formula import MAX_FORMULA_LENGTH as MAX_FORMULA_LENGTH
from ._formula import And as And
from ._formula import Arithmetic as Arithmetic
from ._formula import Compare as Compare
from ._formula import Condition as Condition
from ._formula import Expr as Expr
from ._formula import Formula as Formula
from ._formula import FormulaError as FormulaError
from ._formula import Negate as Negate
from ._formula import Not as Not
from ._formula import Number as Number
from ._formula import NumberExpr as NumberExpr
from ._formula import Or as Or
from ._formula import UnboundIndicator as UnboundIndicator
from ._formula import canonical as canonical
from ._formula import parse_formula as parse_formula
from ._indicators import INDICATORS as INDICATORS
from ._indicators import MAX_PERIOD as MAX_PERIOD
from ._indicators import Indicator as Indicator
from ._indicators import IndicatorSpec as IndicatorSpec
from ._indicators import Klines as Klines
from ._indicators import KlinesLike as KlinesLike
from ._indicators import Parameter as Parameter
from ._indicators import atr as atr
from ._indicators import bollinger as bollinger
from ._indicators import change_pct as change_pct
from ._indicators import ema as ema
from ._indicators import latest_values as latest_values
from ._indicators import macd as macd
from ._indicators import rsi as rsi
from ._indicators import series_values as series_values
from ._indicators import sma as sma
from ._indicators import true_range as true_range
from ._job import ScanJob as ScanJob
from ._job import SymbolResult as SymbolResult
from ._scan import Fill as Fill
from ._scan import ScanConfig as ScanConfig
from ._scan import ScanRun as ScanRun
from ._scan import Scans as Scans
from ._scan import ScansBusy as ScansBusy
from ._scan import ScansStatistics as ScansStatistics
from ._scan import ScanStatus as ScanStatus
from ._scan import ScanSummary as ScanSummary
from ._scan import SymbolError as SymbolError
from ._universe import DEFAULT_UNIVERSE as DEFAULT_UNIVERSE
from ._universe import SimulatedCandles as SimulatedCandles
from ._universe import universe as universe

__all__ = [
    "DEFAULT_UNIVERSE",
    "INDICATORS",
    "MAX_FORMULA_DEPTH",
    "MAX_FORMULA_LENGTH",
    "MAX_PERIOD",
    "WARMUP_FACTOR",
    "And",
    "Arithmetic",
    "Compare",
    "Condition",
    "Expr",
    "Fill",
    "Formula",
    "FormulaError",
    "FormulaService",
    "Indicator",
    "IndicatorSpec",
    "Klines",
    "KlinesLike",
    "Negate",
    "Not",
    "Number",
    "NumberExpr",
    "Or",
    "Parameter",
    "ScanConfig",
    "ScanJob",
    "ScanRun",
    "ScanStatus",
    "ScanSummary",
    "Scans",
    "ScansBusy",
    "ScansStatistics",
    "SimulatedCandles",
    "SymbolError",
    "SymbolResult",
    "TimedKlines",
    "UnboundIndicator",
    "atr",
    "bollinger",
    "canonical",
    "change_pct",
    "ema",
    "latest_values",
    "macd",
    "parse_formula",
    "rsi",
    "series_values",
    "sma",
    "true_range",
    "universe",
]
