"""Scans as a service: start one, follow its progress, read its results.

A scan runs the formula's job over every symbol of the universe through
:func:`engine.map_batch` on the process bridge, with a per-symbol deadline:
every symbol ends with exactly one outcome (a result, an error, a timeout,
a crash), progress counts symbols as they complete, and a scan can be
cancelled. :class:`Scans` is one supervised child that owns the worker pool
and the nursery the scans run in; the HTTP API and the command line both
go through it.
"""

from __future__ import annotations

import collections
import enum
import itertools
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import attrs
import trio

import engine
from engine.lowlevel import check_count, check_duration

from ._formula import Formula, parse_formula
from ._job import ScanJob, SymbolResult
from ._universe import DEFAULT_UNIVERSE, SimulatedKlines, universe

logger = logging.getLogger("market.scans")


class ScanStatus(enum.StrEnum):
    """Where a scan is."""

    RUNNING = "running"
    DONE = "done"
    CANCELLED = "cancelled"


class ScansBusy(Exception):
    """As many scans as allowed are running; try again when one finishes."""


@attrs.frozen
class ScanConfig:
    """How scans run.

    Attributes:
        symbols: the universe's size (generated names; see :func:`universe`).
        workers: worker processes; ``None`` for one per CPU.
        item_deadline: seconds one symbol may take once a worker has it;
            past it the symbol's outcome is a timeout and the scan goes on.
        max_running: scans allowed at once; more are refused (``ScansBusy``).
        keep: finished scans kept for their results (the oldest go first).
        seed: the universe's (and the simulated candles') seed.
        warm: start every worker as soon as :meth:`Scans.run` starts, so the
            first scan does not wait for process starts;
            by default workers start with the first scan, and a service that
            never scans runs none.
    """

    symbols: int = DEFAULT_UNIVERSE
    workers: int | None = None
    item_deadline: float = 60.0
    max_running: int = 1
    keep: int = 20
    seed: int = 0
    warm: bool = False

    def __attrs_post_init__(self) -> None:
        check_count("symbols", self.symbols, minimum=1)
        if self.workers is not None:
            check_count("workers", self.workers, minimum=1)
        check_duration("item_deadline", self.item_deadline)
        check_count("max_running", self.max_running, minimum=1)
        check_count("keep", self.keep, minimum=1)
        check_count("seed", self.seed)


@attrs.frozen
class SymbolError:
    """A symbol whose scan did not produce a result, and why."""

    symbol: str
    status: str  # error, timeout, crashed or cancelled (engine.Status)
    error: str


@attrs.frozen
class ScanSummary:
    """A snapshot of one scan, for the API and the progress display.

    Attributes:
        id: the scan's id.
        formula: the formula as the user wrote it.
        status: running, done or cancelled.
        total: symbols in the scan.
        completed: symbols with an outcome (other than cancelled).
        matched: symbols whose values satisfy the formula.
        failed: symbols that ended with an error, a timeout or a crash.
        started_at: wall-clock start, seconds since the epoch.
        elapsed: seconds it has run (until it finished, once it has).
    """

    id: str
    formula: str
    status: str
    total: int
    completed: int
    matched: int
    failed: int
    started_at: float
    elapsed: float


@attrs.define(eq=False)
class ScanRun:
    """One scan: its progress while it runs, then its results."""

    id: str
    formula: Formula
    symbols: tuple[str, ...]
    on_progress: Callable[[int, int], object] | None = None
    status: ScanStatus = ScanStatus.RUNNING
    completed: int = 0
    started_at: float = attrs.field(factory=time.time)
    _started: float = attrs.field(factory=time.perf_counter)
    _elapsed: float | None = None
    _results: list[SymbolResult] = attrs.Factory(list)
    _errors: list[SymbolError] = attrs.Factory(list)
    _cancel: trio.CancelScope = attrs.Factory(trio.CancelScope)
    _done: trio.Event = attrs.Factory(trio.Event)
    _taken: set[int] = attrs.Factory(set)
    _order: dict[str, int] = attrs.field(init=False)

    @_order.default
    def _index_symbols(self) -> dict[str, int]:
        return {symbol: index for index, symbol in enumerate(self.symbols)}

    def summary(self) -> ScanSummary:
        """Where the scan is now."""
        elapsed = (
            self._elapsed if self._elapsed is not None else time.perf_counter() - self._started
        )
        return ScanSummary(
            id=self.id,
            formula=self.formula.text,
            status=str(self.status),
            total=len(self.symbols),
            completed=self.completed,
            matched=sum(1 for r in self._results if r.matched),
            failed=sum(1 for e in self._errors if e.status != engine.Status.CANCELLED),
            started_at=self.started_at,
            elapsed=elapsed,
        )

    def matches(self) -> list[SymbolResult]:
        """The symbols that satisfy the formula so far, in universe order."""
        return sorted((r for r in self._results if r.matched), key=self._position)

    def results(self) -> list[SymbolResult]:
        """Every symbol's values so far, matched or not, in universe order."""
        return sorted(self._results, key=self._position)

    def errors(self) -> list[SymbolError]:
        """The symbols without a result so far, and why."""
        return list(self._errors)

    def cancel(self) -> None:
        """Stop the scan; symbols not yet done end ``cancelled``."""
        self._cancel.cancel()

    async def wait(self) -> None:
        """Wait until the scan has finished (done or cancelled)."""
        await self._done.wait()

    def _position(self, result: SymbolResult) -> int:
        return self._order[result.symbol]

    async def _run(self, job: ScanJob, options: dict[str, Any]) -> None:
        try:
            with self._cancel:
                async with engine.map_batch(job, self.symbols, **options) as batch:
                    async for outcome in batch:
                        self._take(outcome)
            # After a cancel, the outcomes not yet read (cancelled ones, and any
            # that finished meanwhile) are in the batch's results.
            for outcome in batch.results():
                if outcome.index not in self._taken:
                    self._take(outcome)
        finally:
            self.status = ScanStatus.CANCELLED if self._cancel.cancel_called else ScanStatus.DONE
            self._elapsed = time.perf_counter() - self._started
            self._done.set()
            summary = self.summary()
            logger.info(
                "scan %s %s: %d of %d symbols, %d matched, %d failed, %.2f s",
                self.id,
                summary.status,
                summary.completed,
                summary.total,
                summary.matched,
                summary.failed,
                summary.elapsed,
            )

    def _take(self, outcome: engine.Outcome[str, SymbolResult]) -> None:
        self._taken.add(outcome.index)
        if outcome.status is engine.Status.OK:
            assert outcome.value is not None
            self._results.append(outcome.value)
        else:
            error = outcome.error
            text = f"{type(error).__name__}: {error}" if error is not None else "cancelled"
            self._errors.append(SymbolError(outcome.item, str(outcome.status), text))
        if outcome.status is not engine.Status.CANCELLED:
            self.completed += 1
            if self.on_progress is not None:
                self.on_progress(self.completed, len(self.symbols))


@attrs.frozen
class ScansStatistics:
    """The scans' counters, for /status and /metrics."""

    started: int
    running: int
    finished: int
    refused: int


class Scans:
    """Runs scans over the simulated universe; one supervised child owns them.

    ``await nursery.start(scans.run)`` (or a supervisor's ``start``) opens the
    worker pool; then :meth:`start` begins scans from anywhere in the run.
    """

    def __init__(
        self, config: ScanConfig, klines: SimulatedKlines, *, bridge: object = None
    ) -> None:
        """Scans of ``klines`` as ``config`` says.

        Args:
            config: the settings.
            klines: where each symbol's candles come from.
            bridge: another bridge for :func:`engine.map_batch` instead of
                a process pool: ``"thread"``, or a test bridge such as
                :class:`engine.testing.VirtualBridge`.
        """
        self.config = config
        self._klines = klines
        self._bridge = bridge
        self._symbols = universe(config.symbols, seed=config.seed)
        self._ids = itertools.count(1)
        self._scans: collections.OrderedDict[str, ScanRun] = collections.OrderedDict()
        self._nursery: trio.Nursery | None = None
        self._pool: engine.ProcessPool | None = None
        self._started = 0
        self._refused = 0

    @property
    def symbols(self) -> tuple[str, ...]:
        """The universe a scan covers."""
        return self._symbols

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Own the pool and the scans' nursery until cancelled; ready at once."""
        if self._bridge is not None:
            async with trio.open_nursery() as nursery:
                await self._serve(nursery, None, task_status)
            return
        async with (
            engine.open_process_pool(self.config.workers) as pool,
            trio.open_nursery() as nursery,
        ):
            await self._serve(nursery, pool, task_status)

    async def _serve(
        self,
        nursery: trio.Nursery,
        pool: engine.ProcessPool | None,
        task_status: trio.TaskStatus[None],
    ) -> None:
        self._nursery, self._pool = nursery, pool
        try:
            task_status.started()
            if pool is not None and self.config.warm:
                await pool.warm()
            await trio.sleep_forever()
        finally:
            self._pool = self._nursery = None
            for scan in self._scans.values():
                scan.cancel()

    def start(
        self,
        formula: str | Formula,
        symbols: Sequence[str] | None = None,
        *,
        on_progress: Callable[[int, int], object] | None = None,
    ) -> ScanRun:
        """Begin a scan of ``formula`` over the universe (or ``symbols``); returns at once.

        ``on_progress(completed, total)`` is called in the trio thread once per
        symbol that completes (with any outcome but cancelled).

        Raises:
            FormulaError: the formula does not parse or names an unknown indicator.
            ValueError: ``symbols`` is empty or names a symbol twice.
            ScansBusy: ``max_running`` scans are running already.
            RuntimeError: :meth:`run` is not running.
        """
        parsed = formula if isinstance(formula, Formula) else parse_formula(formula)
        chosen = self._symbols if symbols is None else tuple(symbols)
        if not chosen:
            raise ValueError("a scan needs at least one symbol")
        if len(set(chosen)) != len(chosen):
            raise ValueError("symbols must not repeat")
        if self._nursery is None:
            raise RuntimeError("scans are not running (start Scans.run first)")
        running = sum(1 for s in self._scans.values() if s.status is ScanStatus.RUNNING)
        if running >= self.config.max_running:
            self._refused += 1
            raise ScansBusy(f"{running} scan(s) running; at most {self.config.max_running} at once")
        scan = ScanRun(
            id=str(next(self._ids)), formula=parsed, symbols=chosen, on_progress=on_progress
        )
        self._scans[scan.id] = scan
        self._forget_old()
        self._started += 1
        options: dict[str, object] = {"item_deadline": self.config.item_deadline}
        if self._bridge is not None:
            options |= {"bridge": self._bridge, "workers": self.config.workers or 1}
        else:
            options["pool"] = self._pool
        job = ScanJob(parsed, self._klines)
        self._nursery.start_soon(scan._run, job, options, name=f"scan {scan.id}")
        return scan

    def get(self, scan_id: str) -> ScanRun | None:
        """The scan with this id, if it is still kept."""
        return self._scans.get(scan_id)

    def list(self) -> list[ScanRun]:
        """The scans kept, newest first."""
        return list(reversed(self._scans.values()))

    def statistics(self) -> ScansStatistics:
        """A snapshot of the counters."""
        running = sum(1 for s in self._scans.values() if s.status is ScanStatus.RUNNING)
        return ScansStatistics(
            started=self._started,
            running=running,
            finished=self._started - running,
            refused=self._refused,
        )

    def _forget_old(self) -> None:
        finished = [k for k, s in self._scans.items() if s.status is not ScanStatus.RUNNING]
        for key in finished[: max(0, len(finished) - self.config.keep)]:
            del self._scans[key]
