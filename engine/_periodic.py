"""Drift-free periodic cycles with a per-cycle deadline and an overrun policy.

A :class:`Cycle` runs an async function on the grid ``start + k * interval``.
The grid is computed from the tick index, never by adding durations, so
neither the function's run time nor the scheduler's lateness accumulates.
Each run lives inside a cancel scope whose deadline always fires, so a hung
run is cut and the next tick still comes.
"""

from __future__ import annotations

import enum
import inspect
import logging
import math
from collections.abc import Awaitable, Callable
from typing import Literal, NoReturn, TypeVarTuple

import attrs
import trio

from ._counters import Tally, counter_metric, gauge_metric, metric_source
from ._names import callable_name, describe_error
from ._validation import check_choice, check_duration, check_name
from ._watchdog import attach_statistics, heartbeat

logger = logging.getLogger("engine.cycles")

PosArgsT = TypeVarTuple("PosArgsT")


class OverrunPolicy(enum.StrEnum):
    """What a cycle does after a run that ended past its next tick.

    ``SKIP`` drops every tick that passed during the run and waits for the
    next tick still in the future. ``IMMEDIATE`` starts one run at once in
    place of the missed ticks, then returns to the grid.
    """

    SKIP = "skip"
    IMMEDIATE = "immediate"


# The enum's values again as a Literal (a type checker cannot derive one from
# the other; tests/test_quality.py holds the two equal). Every option enum is
# declared with this shape.
OverrunPolicyName = Literal["skip", "immediate"]
"""The values of :class:`OverrunPolicy`, as the strings ``Cycle`` also accepts."""


@metric_source(label="cycle")
@attrs.frozen
class CycleStatistics:
    """A snapshot of one cycle, shaped for JSON and Prometheus.

    Times are ``trio.current_time()`` seconds and stay ``None`` until the
    event first happens. Every field is a number, a string, a bool or ``None``.

    Attributes:
        name: the cycle's name.
        interval: seconds between ticks of the grid.
        cycle_deadline: seconds each run may take; ``math.inf`` for none.
        overrun_policy: ``"skip"`` or ``"immediate"``.
        runs: runs started.
        successes: runs that returned.
        failures: runs that raised or hit the cycle deadline.
        timeouts: the failures that were cut by the cycle deadline.
        overruns: runs whose duration carried them past the next tick.
        skipped_ticks: ticks that passed without a run, after an overrun or
            because the loop fell behind.
        late_starts: runs started off the grid by the ``"immediate"`` policy.
        running: whether a run is in progress now.
        last_started_at: when the latest run started.
        last_success_at: when the latest successful run ended.
        last_failure_at: when the latest failed run ended.
        last_error: ``"ExceptionType: message"`` of the latest failure.
        last_duration: seconds the latest finished run took.
        next_tick_at: when the next run is due; ``None`` while not running.
    """

    name: str
    interval: float = attrs.field(
        metadata=gauge_metric("Seconds between ticks", name="interval_seconds")
    )
    cycle_deadline: float
    overrun_policy: str
    runs: int = attrs.field(default=0, metadata=counter_metric("Runs started"))
    successes: int = attrs.field(default=0, metadata=counter_metric("Runs that returned"))
    failures: int = attrs.field(
        default=0, metadata=counter_metric("Runs that raised or hit the cycle deadline")
    )
    timeouts: int = attrs.field(
        default=0, metadata=counter_metric("Runs cut by the cycle deadline")
    )
    overruns: int = attrs.field(
        default=0, metadata=counter_metric("Runs that carried past the next tick")
    )
    skipped_ticks: int = attrs.field(default=0, metadata=counter_metric("Ticks without a run"))
    late_starts: int = attrs.field(default=0, metadata=counter_metric("Runs started off the grid"))
    running: bool = attrs.field(
        default=False, metadata=gauge_metric("1 while a run is in progress")
    )
    last_started_at: float | None = None
    last_success_at: float | None = None
    last_failure_at: float | None = None
    last_error: str | None = None
    last_duration: float | None = attrs.field(
        default=None,
        metadata=gauge_metric("Seconds the latest finished run took", name="last_duration_seconds"),
    )
    next_tick_at: float | None = None


class _Tally(Tally[CycleStatistics]):
    """The counters behind :meth:`Cycle.statistics`, and what each run adds to them."""

    def begin(self, started: float, next_tick: float) -> None:
        self.runs += 1
        self.running = True
        self.last_started_at = started
        self.next_tick_at = next_tick

    def end(self, started: float) -> None:
        self.running = False
        self.last_duration = trio.current_time() - started

    def succeed(self) -> None:
        self.successes += 1
        self.last_success_at = trio.current_time()

    def fail(self, error: str) -> None:
        self.failures += 1
        self.last_failure_at = trio.current_time()
        self.last_error = error


@attrs.frozen
class _Grid:
    """The ticks ``origin + index * interval``, computed without accumulation."""

    origin: float
    interval: float

    def at(self, index: int) -> float:
        return self.origin + index * self.interval

    def first_at_or_after(self, when: float, minimum: int) -> int:
        """The smallest index >= ``minimum`` whose tick is not before ``when``."""
        index = max(minimum, math.ceil((when - self.origin) / self.interval))
        # Float rounding can leave the estimate one step off either way.
        while index > minimum and self.at(index - 1) >= when:
            index -= 1
        while self.at(index) < when:
            index += 1
        return index


@attrs.define(eq=False, init=False, on_setattr=attrs.setters.frozen)
class Cycle:
    """An async function run once per tick of a drift-free grid.

    Tick ``k`` is due at ``start + k * interval``, where ``start`` is when
    :meth:`run` began; tick 0 runs at once. Each run is wrapped in a cancel
    scope with the deadline ``cycle_deadline`` seconds after it started, so
    a hung run is cut and the next tick still comes.

    A run that raises an :class:`Exception` or hits its deadline counts as a
    failure: it is logged on the ``engine.cycles`` logger and the cycle goes
    on. A run whose duration carries it from its due time past the next tick
    is an *overrun*, handled by the ``overrun`` policy; a tick that falls
    exactly on the end of a run is not missed. A run cut by its deadline
    counts as lasting exactly ``cycle_deadline``, so with the default
    ``cycle_deadline == interval`` a hung run never overruns. If the loop
    itself wakes up after later ticks have passed (a stalled event loop), it
    runs at once for the latest of them and counts the others as skipped.

    :meth:`run` calls :func:`engine.heartbeat` at the start and the end of
    every run, so a supervised child running a cycle with
    ``stall_after > interval + cycle_deadline`` is cancelled only when the
    loop itself is stuck (a run blocked in code that ignores cancellation).

    Args:
        fn: the async function to run once per tick.
        *args: positional arguments for ``fn``.
        interval: seconds between ticks; finite and > 0.
        cycle_deadline: seconds each run may take, > 0; ``None`` means
            ``interval``, ``math.inf`` means no deadline.
        overrun: ``"skip"`` (default) or ``"immediate"``, see
            :class:`OverrunPolicy`.
        name: the name used in logs and statistics; defaults to
            ``fn.__qualname__``.

    Raises:
        TypeError: if ``fn`` is not callable, or a setting is not a number.
        ValueError: for a non-positive or non-finite ``interval``, a
            non-positive ``cycle_deadline``, an unknown ``overrun`` policy
            or an empty ``name``. The message names the parameter.
    """

    fn: Callable[..., Awaitable[object]]
    args: tuple[object, ...]
    interval: float
    cycle_deadline: float
    overrun: OverrunPolicy
    name: str
    _tally: _Tally = attrs.field(factory=_Tally, init=False, repr=False)

    def __init__(
        self,
        fn: Callable[[*PosArgsT], Awaitable[object]],
        *args: *PosArgsT,
        interval: float,
        cycle_deadline: float | None = None,
        overrun: OverrunPolicy | OverrunPolicyName = "skip",
        name: str | None = None,
    ) -> None:
        if not callable(fn):
            raise TypeError(f"fn must be an async callable, got {fn!r}")
        interval = check_duration("interval", interval)
        if not math.isfinite(interval):
            raise ValueError(f"interval must be finite, got {interval!r}")
        deadline = interval if cycle_deadline is None else cycle_deadline
        self.__attrs_init__(
            fn=fn,
            args=args,
            interval=interval,
            cycle_deadline=check_duration("cycle_deadline", deadline),
            overrun=check_choice("overrun", overrun, OverrunPolicy),
            name=check_name("name", callable_name(fn) if name is None else name),
        )

    def statistics(self) -> CycleStatistics:
        """A snapshot of the cycle's counters and times.

        Returns:
            A frozen :class:`CycleStatistics`.
        """
        return self._tally.snapshot(
            name=self.name,
            interval=self.interval,
            cycle_deadline=self.cycle_deadline,
            overrun_policy=str(self.overrun),
        )

    async def run(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> NoReturn:
        """Run the cycle until cancelled.

        Start it with ``await nursery.start(cycle.run)``: it reports ready
        before the first run, which follows at once. While it runs, the cycle
        is listed under the supervised child running it. Counters survive a
        restart (calling :meth:`run` again after it ended); the grid starts
        afresh.

        Cancellation:
            Cancelling the caller stops the cycle, cutting a run in progress;
            that run counts as neither success nor failure. ``trio.Cancelled``
            and other :class:`BaseException` s propagate.

        Args:
            task_status: reports the cycle as started, for ``nursery.start``.

        Raises:
            trio.BusyResourceError: if this cycle is already running.
            TypeError: if ``fn(*args)`` returns something that is not
                awaitable (``fn`` is not an async function).
        """
        tally = self._tally
        if tally.next_tick_at is not None:  # set for exactly as long as run() runs
            raise trio.BusyResourceError(f"cycle {self.name!r} is already running")
        grid = _Grid(origin=trio.current_time(), interval=self.interval)
        index, due = 0, grid.origin
        tally.next_tick_at = due
        try:
            with attach_statistics(self):
                task_status.started()
                while True:
                    tally.next_tick_at = due
                    await trio.sleep_until(due)
                    index, due = self._catch_up(grid, index, due)
                    ended = await self._run_once(due, next_tick=grid.at(index + 1))
                    index, due = self._reschedule(grid, index, ended)
        finally:
            tally.running = False
            tally.next_tick_at = None

    async def _run_once(self, due: float, *, next_tick: float) -> float:
        """One run; returns ``due`` plus its duration, for the overrun check.

        Measuring from ``due`` leaves out how late the run started, and a run
        cut by its deadline counts as lasting exactly ``cycle_deadline``, so
        the scheduler's lateness in starting or cancelling a run is never
        taken for an overrun.
        """
        awaitable = self.fn(*self.args)
        if not inspect.isawaitable(awaitable):
            raise TypeError(
                f"fn must be an async function: {self.name} returned {awaitable!r}, "
                "not an awaitable"
            )
        started = trio.current_time()
        tally = self._tally
        tally.begin(started, next_tick)
        heartbeat()
        try:
            with trio.move_on_at(started + self.cycle_deadline) as scope:
                await awaitable
        except Exception as exc:
            tally.fail(describe_error(exc))
            logger.error("cycle %r failed: %s", self.name, tally.last_error, exc_info=exc)
            return due + (trio.current_time() - started)
        finally:
            tally.end(started)
            heartbeat()
        if scope.cancelled_caught:
            self._record_timeout(started)
            return due + self.cycle_deadline
        tally.succeed()
        return due + (trio.current_time() - started)

    def _record_timeout(self, started: float) -> None:
        self._tally.timeouts += 1
        message = f"cycle deadline of {self.cycle_deadline:g} s expired"
        self._tally.fail(f"{trio.TooSlowError.__name__}: {message}")
        logger.warning(
            "cycle %r: %s; the run was cut after %.3f s",
            self.name,
            message,
            trio.current_time() - started,
        )

    def _catch_up(self, grid: _Grid, index: int, due: float) -> tuple[int, float]:
        """Skip to the latest tick already passed, if the loop woke up late.

        That happens when the loop was stalled, or a cut run took long to
        unwind. The run starts at once, for the latest passed tick; the
        earlier ones are skipped. No run overran, so no overrun is counted.
        """
        now = trio.current_time()
        latest = grid.first_at_or_after(now, minimum=index + 1)
        if grid.at(latest) > now:
            latest -= 1
        if latest == index:
            return index, due
        self._tally.skipped_ticks += latest - index
        logger.warning(
            "cycle %r fell behind: it started %.3f s late; %d tick(s) skipped",
            self.name,
            now - due,
            latest - index,
        )
        return latest, grid.at(latest)

    def _reschedule(self, grid: _Grid, index: int, ended: float) -> tuple[int, float]:
        """The grid index the next run stands for, and when it is due."""
        first = grid.first_at_or_after(ended, minimum=index + 1)
        missed = first - (index + 1)
        if missed == 0:
            return first, grid.at(first)
        tally = self._tally
        tally.overruns += 1
        logger.warning(
            "cycle %r overran: its run ended %.3f s after the next tick; %d tick(s) "
            "passed (overrun=%s)",
            self.name,
            ended - grid.at(index + 1),
            missed,
            self.overrun,
        )
        if self.overrun is OverrunPolicy.SKIP:
            tally.skipped_ticks += missed
            return first, grid.at(first)
        # IMMEDIATE: one run now stands for the latest missed tick.
        tally.skipped_ticks += missed - 1
        tally.late_starts += 1
        return first - 1, ended


async def every(
    interval: float,
    fn: Callable[[*PosArgsT], Awaitable[object]],
    *args: *PosArgsT,
    cycle_deadline: float | None = None,
    overrun: OverrunPolicy | OverrunPolicyName = "skip",
    name: str | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> NoReturn:
    """Run ``fn(*args)`` every ``interval`` seconds until cancelled.

    Shorthand for ``await Cycle(fn, *args, interval=interval, ...).run()``;
    build the :class:`Cycle` yourself to read its :meth:`Cycle.statistics`
    or to have the arguments checked before anything is started.

    Args:
        interval: seconds between ticks; finite and > 0.
        fn: the async function to run once per tick.
        *args: positional arguments for ``fn``.
        cycle_deadline: seconds each run may take; ``None`` means
            ``interval``, ``math.inf`` means no deadline.
        overrun: ``"skip"`` or ``"immediate"``.
        name: the name used in logs and statistics.
        task_status: reports the cycle as started, for ``nursery.start``.

    Raises:
        TypeError: as for :class:`Cycle`.
        ValueError: as for :class:`Cycle`, naming the parameter.
    """
    cycle = Cycle(
        fn, *args, interval=interval, cycle_deadline=cycle_deadline, overrun=overrun, name=name
    )
    await cycle.run(task_status=task_status)
