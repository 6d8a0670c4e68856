"""The ProcessingEngine: a job's symbols through ``engine.map_batch`` on a process pool."""

from __future__ import annotations

import enum
import pickle
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from types import TracebackType
from typing import Any

import engine
from engine.lowlevel import check_choice, check_duration

from ..candles import CandleRepository
from ..scans import FormulaService, ScanJob
from ._job import ProcessingJob, ProcessingResult
from ._limits import SystemLimits, resolve_max_workers
from ._task import SymbolTask

#: The error of a symbol past its deadline, as the spec words it.
TIMEOUT_ERROR = "Processing timeout"

ProgressCallback = Callable[[int, int], object]


class _Mode(enum.Enum):
    NONE = "none"
    ASYNC = "async with"
    SYNC = "with"


class ProcessingEngine:
    """Runs a job's formula over its symbols in worker processes, one result per symbol.

    ::

        async with ProcessingEngine(repository, FormulaService(), max_workers=4) as processing:
            results = await processing.process_batch(job, progress)   # completion order

    The pool's lifetime is the block's: ``async with`` opens it (its worker
    processes start with the first batch) and every batch in the block
    shares it; leaving the block shuts the workers down and reaps them. A
    plain ``with`` block, or no block, is accepted too, for code written
    against the synchronous spec: then each ``process_batch`` opens a pool
    for itself and closes it before returning (workers start for every
    batch; see docs/processing.md).

    Args:
        candle_repo: where workers read candles; picklable (a path, a DSN).
        formula_service: evaluates the formula in workers; picklable.
        max_workers: worker processes; ``None`` for ``os.cpu_count()`` (4 if
            unknown). Refused past what the system can hold.
        symbol_deadline: seconds one symbol may run once a worker has it;
            past it the symbol's result carries ``error="Processing timeout"``
            and the batch goes on. ``math.inf`` for none.
        start_method: how workers start, as for :func:`engine.open_process_pool`:
            ``"spawn"`` (default, safest), ``"forkserver"`` or ``"fork"``.

    Raises:
        TypeError: ``max_workers`` or ``symbol_deadline`` is not a number, or
            ``formula_service`` has no ``evaluate``.
        ValueError: ``max_workers`` below 1 or past a system limit (named),
            ``symbol_deadline`` not positive, or an unknown ``start_method``.
    """

    def __init__(
        self,
        candle_repo: CandleRepository,
        formula_service: FormulaService,
        max_workers: int | None = None,
        *,
        symbol_deadline: float = 60.0,
        start_method: engine.WorkerStart | engine.WorkerStartName = "spawn",
    ) -> None:
        if not callable(getattr(formula_service, "evaluate", None)):
            raise TypeError(
                f"formula_service must have an evaluate method, got {formula_service!r}"
            )
        if not callable(getattr(candle_repo, "candles", None)):
            raise TypeError(f"candle_repo must have a candles method, got {candle_repo!r}")
        self._candle_repo = candle_repo
        self._formula_service = formula_service
        self._max_workers = resolve_max_workers(max_workers, SystemLimits.current())
        self._symbol_deadline = check_duration("symbol_deadline", symbol_deadline)
        self._start_method = check_choice("start_method", start_method, engine.WorkerStart)
        self._mode = _Mode.NONE
        self._stack: AsyncExitStack | None = None
        self._shared: engine.ProcessPool | None = None
        self._own: list[engine.ProcessPool] = []

    @property
    def max_workers(self) -> int:
        """The most symbols processed at once: the pool's worker processes."""
        return self._max_workers

    @property
    def symbol_deadline(self) -> float:
        """Seconds one symbol may run once a worker has it."""
        return self._symbol_deadline

    @property
    def pool(self) -> engine.ProcessPool | None:
        """The open process pool: the block's, or a running batch's own; ``None`` if none."""
        if self._shared is not None:
            return self._shared
        return self._own[0] if self._own else None

    def _open_pool(self) -> AbstractAsyncContextManager[engine.ProcessPool]:
        return engine.open_process_pool(self._max_workers, start_method=self._start_method)

    async def __aenter__(self) -> ProcessingEngine:
        """Open the pool that every batch in the block shares (workers start on first use).

        Raises:
            RuntimeError: the engine is in a ``with`` or ``async with`` block already.
        """
        self._enter(_Mode.ASYNC)
        stack = AsyncExitStack()
        try:
            self._shared = await stack.enter_async_context(self._open_pool())
        except BaseException:
            self._mode = _Mode.NONE
            raise
        self._stack = stack
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        """Shut the pool down: its workers exit (or are killed) and are reaped."""
        stack, self._stack = self._stack, None
        try:
            if stack is not None:
                return bool(await stack.__aexit__(exc_type, exc, tb))
            return False
        finally:
            self._shared = None
            self._mode = _Mode.NONE

    def __enter__(self) -> ProcessingEngine:
        """Enter a synchronous block: each batch in it opens and closes its own pool.

        A synchronous ``with`` cannot hold a trio pool open across awaits, so
        this keeps the spec's shape (``with engine:`` around ``await
        process_batch``) with per-batch pools: no worker outlives a batch.

        Raises:
            RuntimeError: the engine is in a ``with`` or ``async with`` block already.
        """
        self._enter(_Mode.SYNC)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Leave the synchronous block; no pool is open here (each batch closed its own)."""
        self._mode = _Mode.NONE

    def _enter(self, mode: _Mode) -> None:
        if self._mode is not _Mode.NONE:
            raise RuntimeError(
                f"this ProcessingEngine is already in a '{self._mode.value}' block;"
                " enter it once at a time"
            )
        self._mode = mode

    async def process_batch(
        self, job: ProcessingJob, progress_callback: ProgressCallback | None = None
    ) -> list[ProcessingResult]:
        """Process every symbol of ``job`` in the worker processes; one result per symbol.

        Results come in completion order (not the job's symbol order). A
        symbol that fails does not stop the others: its result's ``error``
        holds the exception's message, ``"Processing timeout"`` past
        ``symbol_deadline``, or how its worker died (the worker is replaced).

        Args:
            job: the job.
            progress_callback: called as ``progress_callback(completed, total)``
                in the trio thread after each symbol's result is added.

        Returns:
            The results, ``len(job.symbols)`` of them.

        Raises:
            TypeError: ``job`` is not a :class:`ProcessingJob`, the callback is
                not callable, or the job, the repository or the formula
                service cannot be pickled (named); nothing has run then.
            BaseExceptionGroup: holding whatever ``progress_callback`` raised,
                after the batch's workers are stopped (the batch's nursery
                raised it).

        Cancellation:
            Cancelling the caller kills the workers running its symbols and
            ends the batch at once; no worker is left running its symbols.
        """
        if not isinstance(job, ProcessingJob):
            raise TypeError(f"job must be a ProcessingJob, got {job!r}")
        if progress_callback is not None and not callable(progress_callback):
            raise TypeError(f"progress_callback must be callable, got {progress_callback!r}")
        _check_picklable(
            job=job, candle_repo=self._candle_repo, formula_service=self._formula_service
        )
        task = self._task(job)
        async with self._pool_for_batch() as pool:
            return await self._run(task, job, pool, progress_callback)

    def _task(self, job: ProcessingJob) -> SymbolTask:
        reading = job.date_range
        if job.formula is not None:
            # The bars a scan of the same job reads: the range and its warm-up.
            scan = ScanJob(
                job.formula, self._candle_repo, job.timeframe, job.date_range, self._formula_service
            )
            reading = scan.reading()
        return SymbolTask(
            self._candle_repo,
            self._formula_service,
            job.timeframe,
            reading,
            job.date_range.start_ms(),
            job.formula,
        )

    @asynccontextmanager
    async def _pool_for_batch(self) -> AsyncIterator[engine.ProcessPool]:
        if self._shared is not None:
            yield self._shared
            return
        async with self._open_pool() as pool:
            self._own.append(pool)
            try:
                yield pool
            finally:
                self._own.remove(pool)

    async def _run(
        self,
        task: SymbolTask,
        job: ProcessingJob,
        pool: engine.ProcessPool,
        progress: ProgressCallback | None,
    ) -> list[ProcessingResult]:
        results: list[ProcessingResult] = []
        total = len(job.symbols)
        async with engine.map_batch(
            task, job.symbols, pool=pool, item_deadline=self._symbol_deadline
        ) as batch:
            async for outcome in batch:
                results.append(_result(outcome))
                if progress is not None:
                    progress(len(results), total)
        return results


def _result(outcome: engine.Outcome[str, Any]) -> ProcessingResult:
    """The symbol's result: the worker's own, or one that says why there is none."""
    if outcome.status is engine.Status.OK:
        value = outcome.value
        assert isinstance(value, ProcessingResult)
        return value
    if outcome.status is engine.Status.TIMEOUT:
        error = TIMEOUT_ERROR
    elif outcome.status is engine.Status.CANCELLED or outcome.error is None:
        error = "Processing cancelled"
    elif isinstance(outcome.error, engine.WorkerCrashed):
        # Named by the symbol, not by the task's long repr.
        crash = outcome.error
        how = engine.WorkerCrashed(
            f"processing {outcome.item}", exit_code=crash.exit_code, signal=crash.signal
        )
        error = str(how)
    else:
        error = str(outcome.error) or type(outcome.error).__name__
    return ProcessingResult(outcome.item, processing_time_ms=outcome.ran * 1000.0, error=error)


def _check_picklable(**parts: object) -> None:
    """Raise TypeError naming the first part that cannot be pickled for the workers."""
    for name, part in parts.items():
        try:
            pickle.dumps(part, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as exc:
            raise TypeError(
                f"{name} must be picklable to reach the worker processes:"
                f" {part!r} is not ({type(exc).__name__}: {exc})"
            ) from exc
