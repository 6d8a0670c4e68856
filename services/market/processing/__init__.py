"""The processing engine: a formula over many symbols' stored candles, in worker processes.

The spec's ``ProcessingEngine`` (seed 002) on the engine: each symbol's
candles are read from a :class:`CandleRepository` inside a worker, the
formula is evaluated at every bar of the job's date range, and each symbol
ends as exactly one :class:`ProcessingResult` (matches, or why not), through
:func:`engine.map_batch` on an :func:`engine.open_process_pool`.

See ``docs/processing.md``.
"""

from __future__ import annotations

from ..candles import CandleRepository
from ..scans import WARMUP_FACTOR as WARMUP_FACTOR
from ..scans import FormulaService as FormulaService
from ._engine import TIMEOUT_ERROR as TIMEOUT_ERROR
from ._engine import ProcessingEngine as ProcessingEngine
from ._job import Parameters as Parameters
from ._job import ProcessingJob as ProcessingJob
from ._job import ProcessingResult as ProcessingResult

ICandleRepository = CandleRepository
"""The spec's name for :class:`services.market.candles.CandleRepository`."""

__all__ = [
    "TIMEOUT_ERROR",
    "WARMUP_FACTOR",
    "FormulaService",
    "ICandleRepository",
    "Parameters",
    "ProcessingEngine",
    "ProcessingJob",
    "ProcessingResult",
]
