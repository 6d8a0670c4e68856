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
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Protocol

import attrs
import trio

import engine
from engine.lowlevel import check_count, check_duration

from ..candles import TIMEFRAME_MS, CandleRepository, DateRange
from ._formula import Formula, parse_formula
from ._job import ScanJob, SymbolResult
from ._universe import DEFAULT_UNIVERSE, check_timeframe, universe


class Fill(Protocol):
    """What fills the store before a scan reads it, such as ``CandleFetcher.fill_each``."""

    def __call__(
        self, symbols: Sequence[str], timeframe: str, date_range: DateRange, /
    ) -> Awaitable[Mapping[str, BaseException]]:
        """Fill ``symbols``' bars of ``date_range``; the symbols it could not fill, with why."""
        ...


#: The most bars a scan's default window holds (Binance's klines limit).
MAX_BARS = 1_000

logger = logging.getLogger("market.scans")


def _wall_clock_ms() -> int:
    return int(time.time() * 1000)


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
        seed: the universe's seed (its generated names).
        timeframe: the bars' length when a scan does not say
            (one of ``candles.TIMEFRAMES``).
        bars: a scan without a date range covers this many closed bars,
            up to the current bar's open; its latest bar is the last of them.
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
    timeframe: str = "1d"
    bars: int = 250
    warm: bool = False

    def __attrs_post_init__(self) -> None:
        check_count("symbols", self.symbols, minimum=1)
        if self.workers is not None:
            check_count("workers", self.workers, minimum=1)
        check_duration("item_deadline", self.item_deadline)
        check_count("max_running", self.max_running, minimum=1)
        check_count("keep", self.keep, minimum=1)
        check_count("seed", self.seed)
        check_timeframe(self.timeframe)
        check_count("bars", self.bars, minimum=1)
        if self.bars > MAX_BARS:
            raise ValueError(f"bars must be at most {MAX_BARS:,}, got {self.bars!r}")


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
        formula: the formula as the user wrote it, parameters written in.
        status: running, done or cancelled.
        timeframe: the bars' length, such as ``"1d"``.
        start_ms: the first millisecond of the range scanned (UTC).
        end_ms: the millisecond after it (exclusive).
        total: symbols in the scan.
        completed: symbols with an outcome (other than cancelled).
        matched: symbols where the formula holds at the range's last bar.
        matched_in_range: symbols where it holds at one bar of the range or more.
        bars_matched: bars where it holds, all symbols together.
        failed: symbols that ended with an error, a timeout or a crash.
        started_at: wall-clock start, seconds since the epoch.
        elapsed: seconds it has run (until it finished, once it has).
    """

    id: str
    formula: str
    status: str
    timeframe: str
    start_ms: int
    end_ms: int
    total: int
    completed: int
    matched: int
    matched_in_range: int
    bars_matched: int
    failed: int
    started_at: float
    elapsed: float


@attrs.define(eq=False)
class ScanRun:
    """One scan: its progress while it runs, then its results."""

    id: str
    formula: Formula
    symbols: tuple[str, ...]
    timeframe: str
    date_range: DateRange
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
            timeframe=self.timeframe,
            start_ms=self.date_range.start_ms(),
            end_ms=self.date_range.end_ms(),
            total=len(self.symbols),
            completed=self.completed,
            matched=sum(1 for r in self._results if r.matched),
            matched_in_range=sum(1 for r in self._results if r.matches),
            bars_matched=sum(len(r.matches) for r in self._results),
            failed=sum(1 for e in self._errors if e.status != engine.Status.CANCELLED),
            started_at=self.started_at,
            elapsed=elapsed,
        )

    def matches(self) -> list[SymbolResult]:
        """The symbols where the formula holds at the last bar, so far, in universe order."""
        return sorted((r for r in self._results if r.matched), key=self._position)

    def matches_in_range(self) -> list[SymbolResult]:
        """The symbols where it holds at one bar of the range or more, so far, in universe order."""
        return sorted((r for r in self._results if r.matches), key=self._position)

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

    async def _run(self, job: ScanJob, options: dict[str, Any], fill: Fill | None) -> None:
        try:
            symbols = self.symbols
            batch: engine.Batch[str, SymbolResult] | None = None
            with self._cancel:
                if fill is not None:
                    unfilled = await fill(symbols, self.timeframe, job.reading())
                    for symbol, error in unfilled.items():
                        self._fail(symbol, "error", f"{type(error).__name__}: {error}")
                    symbols = tuple(s for s in symbols if s not in unfilled)
                async with engine.map_batch(job, symbols, **options) as batch:
                    async for outcome in batch:
                        self._take(outcome)
            if batch is None:
                # Cancelled while the store was being filled: nothing ran.
                cancelled = str(engine.Status.CANCELLED)
                self._errors.extend(SymbolError(s, cancelled, "cancelled") for s in symbols)
                return
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
            self._completed_one()

    def _fail(self, symbol: str, status: str, text: str) -> None:
        self._errors.append(SymbolError(symbol, status, text))
        self._completed_one()

    def _completed_one(self) -> None:
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
    """Runs scans over a symbol universe's stored candles; one supervised child owns them.

    ``await nursery.start(scans.run)`` (or a supervisor's ``start``) opens the
    worker pool; then :meth:`start` begins scans from anywhere in the run.
    """

    def __init__(
        self,
        config: ScanConfig,
        candles: CandleRepository,
        *,
        fill: Fill | None = None,
        clock: Callable[[], int] | None = None,
        bridge: object = None,
    ) -> None:
        """Scans of the candles in ``candles`` as ``config`` says.

        Args:
            config: the settings.
            candles: where each symbol's candles come from; read in the
                workers, so it must pickle (a file path or a DSN, as the
                stores in ``services.market.candles`` do).
            fill: fills ``candles`` with what a scan is about to read
                (``CandleFetcher.fill_many``-shaped, see :data:`Fill`);
                ``None`` reads the store as it is.
            clock: "now" in milliseconds since the epoch, which a scan
                without a date range ends at; the wall clock by default.
            bridge: another bridge for :func:`engine.map_batch` instead of
                a process pool: ``"thread"``, or a test bridge such as
                :class:`engine.testing.VirtualBridge`.
        """
        self.config = config
        self._candles = candles
        self._fill = fill
        self._clock = clock if clock is not None else _wall_clock_ms
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

    def now_ms(self) -> int:
        """ "Now" on the scans' clock, in milliseconds since the epoch."""
        return self._clock()

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
        timeframe: str | None = None,
        date_range: DateRange | None = None,
        parameters: Mapping[str, object] | None = None,
        on_progress: Callable[[int, int], object] | None = None,
    ) -> ScanRun:
        """Begin a scan of ``formula`` over the universe (or ``symbols``); returns at once.

        The scan covers ``date_range`` in bars of ``timeframe``; without a
        range, the last ``config.bars`` closed bars before now. Its results
        hold every bar where the formula holds, and whether it holds at the
        last one. ``on_progress(completed, total)`` is called in the trio
        thread once per symbol that completes (with any outcome but
        cancelled).

        Raises:
            FormulaError: the formula does not parse, names an unknown
                indicator, or its parameters are missing, unused or invalid.
            ValueError: ``symbols`` is empty or names a symbol twice, or the
                timeframe is unknown.
            ScansBusy: ``max_running`` scans are running already.
            RuntimeError: :meth:`run` is not running.
        """
        parsed = formula if isinstance(formula, Formula) else parse_formula(formula)
        bound = parsed.bind(parameters if parameters is not None else {})
        chosen = self._symbols if symbols is None else tuple(symbols)
        if not chosen:
            raise ValueError("a scan needs at least one symbol")
        if len(set(chosen)) != len(chosen):
            raise ValueError("symbols must not repeat")
        frame = check_timeframe(timeframe if timeframe is not None else self.config.timeframe)
        if date_range is None:
            length = TIMEFRAME_MS[frame]
            current = self._clock() // length * length
            date_range = DateRange.from_ms(current - self.config.bars * length, current)
        if self._nursery is None:
            raise RuntimeError("scans are not running (start Scans.run first)")
        running = sum(1 for s in self._scans.values() if s.status is ScanStatus.RUNNING)
        if running >= self.config.max_running:
            self._refused += 1
            raise ScansBusy(f"{running} scan(s) running; at most {self.config.max_running} at once")
        scan = ScanRun(
            id=str(next(self._ids)),
            formula=bound,
            symbols=chosen,
            timeframe=frame,
            date_range=date_range,
            on_progress=on_progress,
        )
        self._scans[scan.id] = scan
        self._forget_old()
        self._started += 1
        options: dict[str, object] = {"item_deadline": self.config.item_deadline}
        if self._bridge is not None:
            options |= {"bridge": self._bridge, "workers": self.config.workers or 1}
        else:
            options["pool"] = self._pool
        job = ScanJob(bound, self._candles, frame, date_range)
        self._nursery.start_soon(scan._run, job, options, self._fill, name=f"scan {scan.id}")
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
