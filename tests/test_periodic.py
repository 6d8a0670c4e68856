"""Periodic cycles: the drift-free grid, cycle deadlines, overruns, statistics."""

from __future__ import annotations

import functools
import logging
import math
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
import trio.testing

from engine import Cycle, CycleStatistics, every
from engine._periodic import OverrunPolicy
from engine._watchdog import RunContext, current_run

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "docs" / "examples" / "cycles_watchlist.py"
PAGE = ROOT / "docs" / "cycles.md"


class Boom(Exception):
    pass


class Halt(BaseException):
    """A BaseException that is not trio.Cancelled, like KeyboardInterrupt."""


@attrs.define
class ScriptedJob:
    """A fake cycle body: run number ``n`` takes ``durations[n]`` seconds.

    Runs past the script take ``rest`` seconds. ``math.inf`` hangs until
    cancelled; an exception instance in the script is raised instead.
    """

    durations: Sequence[float | BaseException] = ()
    rest: float = 0.0
    starts: list[float] = attrs.Factory(list)
    ends: list[float] = attrs.Factory(list)
    cut_at: list[float] = attrs.Factory(list)

    async def __call__(self) -> None:
        number = len(self.starts)
        self.starts.append(trio.current_time())
        step = self.durations[number] if number < len(self.durations) else self.rest
        if isinstance(step, BaseException):
            raise step
        try:
            await trio.sleep(step)
        except trio.Cancelled:
            self.cut_at.append(trio.current_time())
            raise
        self.ends.append(trio.current_time())


async def run_until(cycle: Cycle, when: float) -> None:
    """Run ``cycle`` until the virtual time ``when``, then stop it."""
    with trio.move_on_at(when) as scope:
        await cycle.run()
    assert scope.cancelled_caught
    assert trio.current_time() == when


# --- the grid ---------------------------------------------------------------


async def test_first_tick_runs_at_once_and_the_grid_ignores_run_time(
    autojump_clock: trio.testing.MockClock,
) -> None:
    job = ScriptedJob(rest=0.3)
    cycle = Cycle(job, interval=10)
    await run_until(cycle, 45)
    assert job.starts == [0, 10, 20, 30, 40]
    assert job.ends == [0.3, 10.3, 20.3, 30.3, 40.3]


async def test_grid_does_not_accumulate_float_error(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # Adding 0.1 a hundred times drifts (sum gives 9.99999999999998);
    # the grid multiplies the tick index instead.
    job = ScriptedJob(rest=0.03)
    cycle = Cycle(job, interval=0.1)
    await run_until(cycle, 10.05)
    assert job.starts == [k * 0.1 for k in range(101)]
    assert cycle.statistics().overruns == 0


async def test_grid_starts_when_run_starts(autojump_clock: trio.testing.MockClock) -> None:
    await trio.sleep(7)
    job = ScriptedJob()
    await run_until(Cycle(job, interval=10), 30)
    assert job.starts == [7, 17, 27]


# --- failures and deadlines -------------------------------------------------


async def test_failing_run_is_recorded_and_next_tick_still_runs(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    job = ScriptedJob(durations=[1, Boom("exchange said no"), 1])
    cycle = Cycle(job, interval=10, name="watchlist")
    await run_until(cycle, 25)
    assert job.starts == [0, 10, 20]
    stats = cycle.statistics()
    assert (stats.runs, stats.successes, stats.failures, stats.timeouts) == (3, 2, 1, 0)
    assert stats.last_failure_at == 10
    assert stats.last_error == "Boom: exchange said no"
    assert stats.last_success_at == 21
    [record] = [r for r in caplog.records if r.name == "engine.cycles"]
    assert record.levelno == logging.ERROR
    assert "'watchlist' failed: Boom: exchange said no" in record.getMessage()
    assert record.exc_info is not None
    assert isinstance(record.exc_info[1], Boom)


async def test_exception_group_from_run_is_recorded_as_a_group(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def two_failures() -> None:
        async def fail() -> None:
            raise Boom("one of two")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(fail)
            nursery.start_soon(fail)

    cycle = Cycle(two_failures, interval=10)
    await run_until(cycle, 15)
    stats = cycle.statistics()
    assert stats.failures == 2
    assert stats.last_error is not None
    assert stats.last_error.startswith("ExceptionGroup: ")


async def test_hanging_run_is_cut_exactly_at_its_deadline(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    job = ScriptedJob(durations=[math.inf], rest=1)
    cycle = Cycle(job, interval=10, cycle_deadline=4, name="whales")
    await run_until(cycle, 25)
    assert job.cut_at == [4]
    assert job.starts == [0, 10, 20]
    stats = cycle.statistics()
    assert (stats.failures, stats.timeouts, stats.overruns) == (1, 1, 0)
    assert stats.last_failure_at == 4
    assert stats.last_error == "TooSlowError: cycle deadline of 4 s expired"
    assert stats.last_success_at == 21
    [record] = [r for r in caplog.records if r.name == "engine.cycles"]
    assert record.levelno == logging.WARNING
    assert record.getMessage() == (
        "cycle 'whales': cycle deadline of 4 s expired; the run was cut after 4.000 s"
    )


async def test_default_deadline_is_the_interval_and_a_cut_run_does_not_overrun(
    autojump_clock: trio.testing.MockClock,
) -> None:
    job = ScriptedJob(durations=[math.inf, math.inf])
    cycle = Cycle(job, interval=10)
    assert cycle.cycle_deadline == 10
    await run_until(cycle, 25)
    assert job.cut_at == [10, 20]
    assert job.starts == [0, 10, 20]
    stats = cycle.statistics()
    assert (stats.timeouts, stats.overruns, stats.skipped_ticks) == (2, 0, 0)


async def test_late_start_gets_its_full_cycle_deadline(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # Run 1 starts late, at 25, under "immediate"; its deadline is 25 + 30.
    job = ScriptedJob(durations=[25, math.inf])
    cycle = Cycle(job, interval=10, cycle_deadline=30, overrun="immediate")
    await run_until(cycle, 60)
    assert job.starts == [0, 25, 55]
    assert job.cut_at == [55]


@attrs.define
class SlowUnwinder:
    """A fake body whose hung runs take ``unwind`` seconds to clean up once cut."""

    durations: Sequence[float]
    unwind: float
    starts: list[float] = attrs.Factory(list)
    cut_at: list[float] = attrs.Factory(list)

    async def __call__(self) -> None:
        number = len(self.starts)
        self.starts.append(trio.current_time())
        try:
            await trio.sleep(self.durations[number] if number < len(self.durations) else 0)
        except trio.Cancelled:
            self.cut_at.append(trio.current_time())
            with trio.CancelScope(shield=True):
                await trio.sleep(self.unwind)
            raise


async def test_scheduler_lateness_is_not_an_overrun(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # Runs 0 and 1 hang, are cut after 10 s and take 1 s to unwind, so runs 1
    # and 2 start 1 s late; each run still gets its full deadline. Run 2 ends
    # at 31.5, past tick 30, yet does not overrun: it lasted 9.5 s, and a run
    # is judged by its own duration, counted from when it was due (20).
    job = SlowUnwinder(durations=[math.inf, math.inf, 9.5], unwind=1)
    cycle = Cycle(job, interval=10)
    await run_until(cycle, 45)
    assert job.cut_at == [10, 21]
    assert job.starts == [0, 11, 22, 31.5, 40]
    stats = cycle.statistics()
    assert (stats.timeouts, stats.overruns, stats.skipped_ticks) == (2, 0, 0)


async def test_loop_that_falls_behind_runs_once_for_the_latest_tick(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    # Run 0 is cut at 10 and takes until 25 to unwind: tick 10 is skipped and
    # tick 20 runs at once, at 25, then the grid resumes.
    job = SlowUnwinder(durations=[math.inf], unwind=15)
    cycle = Cycle(job, interval=10, name="slow")
    await run_until(cycle, 45)
    assert job.starts == [0, 25, 30, 40]
    stats = cycle.statistics()
    assert (stats.timeouts, stats.overruns, stats.skipped_ticks) == (1, 0, 1)
    messages = [r.getMessage() for r in caplog.records if r.name == "engine.cycles"]
    assert messages[-1] == "cycle 'slow' fell behind: it started 15.000 s late; 1 tick(s) skipped"


def test_settings_cannot_change_after_construction() -> None:
    cycle = Cycle(ScriptedJob(), interval=10)
    with pytest.raises(attrs.exceptions.FrozenAttributeError):
        cycle.interval = 1


# --- overruns ---------------------------------------------------------------


async def test_overrun_skip_skips_every_missed_tick(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    job = ScriptedJob(durations=[25], rest=1)
    cycle = Cycle(job, interval=10, cycle_deadline=math.inf)
    await run_until(cycle, 45)
    # Run 0 took 0..25, so the ticks at 10 and 20 passed during it.
    assert job.starts == [0, 30, 40]
    stats = cycle.statistics()
    assert (stats.overruns, stats.skipped_ticks, stats.late_starts) == (1, 2, 0)
    [record] = [r for r in caplog.records if r.name == "engine.cycles"]
    assert record.getMessage() == (
        "cycle 'ScriptedJob' overran: its run ended 15.000 s after the next tick; "
        "2 tick(s) passed (overrun=skip)"
    )


async def test_tick_at_the_exact_end_of_a_run_is_not_missed(
    autojump_clock: trio.testing.MockClock,
) -> None:
    job = ScriptedJob(durations=[10, 20], rest=1)
    cycle = Cycle(job, interval=10, cycle_deadline=math.inf)
    await run_until(cycle, 45)
    # 0..10 ends on tick 10 (no overrun); 10..30 misses tick 20 only.
    assert job.starts == [0, 10, 30, 40]
    stats = cycle.statistics()
    assert (stats.overruns, stats.skipped_ticks) == (1, 1)


async def test_cut_run_with_deadline_beyond_interval_overruns(
    autojump_clock: trio.testing.MockClock,
) -> None:
    job = ScriptedJob(durations=[math.inf], rest=1)
    cycle = Cycle(job, interval=10, cycle_deadline=15)
    await run_until(cycle, 35)
    assert job.cut_at == [15]
    assert job.starts == [0, 20, 30]
    stats = cycle.statistics()
    assert (stats.timeouts, stats.overruns, stats.skipped_ticks) == (1, 1, 1)


async def test_overrun_immediate_runs_once_at_once_then_returns_to_the_grid(
    autojump_clock: trio.testing.MockClock,
) -> None:
    job = ScriptedJob(durations=[25], rest=1)
    cycle = Cycle(job, interval=10, cycle_deadline=math.inf, overrun="immediate")
    await run_until(cycle, 45)
    # The run at 25 stands for tick 20; tick 10 is skipped.
    assert job.starts == [0, 25, 30, 40]
    stats = cycle.statistics()
    assert (stats.overruns, stats.skipped_ticks, stats.late_starts) == (1, 1, 1)


async def test_overrun_immediate_late_run_that_overruns_again(
    autojump_clock: trio.testing.MockClock,
) -> None:
    job = ScriptedJob(durations=[25, 12], rest=1)
    cycle = Cycle(job, interval=10, cycle_deadline=math.inf, overrun=OverrunPolicy.IMMEDIATE)
    await run_until(cycle, 45)
    # 25..37 stands for tick 20 and passes tick 30: one more late start.
    assert job.starts == [0, 25, 37, 40]
    stats = cycle.statistics()
    assert (stats.overruns, stats.skipped_ticks, stats.late_starts) == (2, 1, 2)


async def test_overrun_immediate_late_run_is_timed_from_its_late_start(
    autojump_clock: trio.testing.MockClock,
) -> None:
    job = ScriptedJob(durations=[25, 6], rest=1)
    cycle = Cycle(job, interval=10, cycle_deadline=math.inf, overrun="immediate")
    await run_until(cycle, 45)
    # The late run 25..31 was due at 25, not at its tick 20: it passes tick 30.
    assert job.starts == [0, 25, 31, 40]
    stats = cycle.statistics()
    assert (stats.overruns, stats.skipped_ticks, stats.late_starts) == (2, 1, 2)


async def test_failed_run_is_judged_by_its_own_duration(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # Run 1 starts 1 s late (run 0 unwinds slowly) and fails after 9.5 s, at
    # 20.5: past tick 20 by the clock, but it lasted less than an interval.
    starts: list[float] = []

    async def hang_then_fail_late() -> None:
        starts.append(trio.current_time())
        if len(starts) == 1:
            try:
                await trio.sleep_forever()
            finally:
                with trio.CancelScope(shield=True):
                    await trio.sleep(1)
        elif len(starts) == 2:
            await trio.sleep(9.5)
            raise Boom("late but not overrun")

    cycle = Cycle(hang_then_fail_late, interval=10)
    await run_until(cycle, 35)
    assert starts == [0, 11, 20.5, 30]
    stats = cycle.statistics()
    assert (stats.failures, stats.overruns, stats.skipped_ticks) == (2, 0, 0)


# --- statistics -------------------------------------------------------------


async def test_statistics_snapshot_while_running_and_after(
    autojump_clock: trio.testing.MockClock,
) -> None:
    job = ScriptedJob(durations=[2, Boom("bad"), 6])
    cycle = Cycle(job, interval=10, cycle_deadline=8, name="flows")
    before = cycle.statistics()
    assert before.runs == 0
    assert before.running is False
    assert before.last_started_at is None
    assert before.next_tick_at is None
    async with trio.open_nursery() as nursery:
        await nursery.start(cycle.run)
        await trio.sleep_until(23)
        assert cycle.statistics() == CycleStatistics(
            name="flows",
            interval=10,
            cycle_deadline=8,
            overrun_policy="skip",
            runs=3,
            successes=1,
            failures=1,
            timeouts=0,
            overruns=0,
            skipped_ticks=0,
            late_starts=0,
            running=True,
            last_started_at=20,
            last_success_at=2,
            last_failure_at=10,
            last_error="Boom: bad",
            last_duration=0,
            next_tick_at=30,
        )
        await trio.sleep_until(27)
        stats = cycle.statistics()
        assert (stats.running, stats.successes, stats.next_tick_at) == (False, 2, 30)
        assert (stats.last_success_at, stats.last_duration) == (26, 6)
        nursery.cancel_scope.cancel()
    after = cycle.statistics()
    assert after.next_tick_at is None
    assert after.running is False
    assert after.runs == 3


async def test_last_success_at_advances(autojump_clock: trio.testing.MockClock) -> None:
    job = ScriptedJob(rest=1)
    cycle = Cycle(job, interval=10)
    seen = []
    async with trio.open_nursery() as nursery:
        await nursery.start(cycle.run)
        for when in (5, 15, 25):
            await trio.sleep_until(when)
            seen.append(cycle.statistics().last_success_at)
        nursery.cancel_scope.cancel()
    assert seen == [1, 11, 21]


def test_statistics_fields_are_plain_values() -> None:
    stats = Cycle(ScriptedJob(), interval=1).statistics()
    for value in attrs.asdict(stats).values():
        assert value is None or type(value) in (str, int, float, bool)


# --- cancellation and propagation -------------------------------------------


async def test_cancellation_from_outside_stops_cleanly_and_run_can_restart(
    autojump_clock: trio.testing.MockClock,
) -> None:
    job = ScriptedJob(durations=[1, math.inf], rest=1)
    cycle = Cycle(job, interval=10, cycle_deadline=math.inf)
    async with trio.open_nursery() as nursery:
        await nursery.start(cycle.run)
        await trio.sleep_until(13)
        nursery.cancel_scope.cancel()
    assert trio.current_time() == 13
    assert job.cut_at == [13]
    stats = cycle.statistics()
    assert (stats.runs, stats.successes, stats.failures) == (2, 1, 0)
    assert (stats.running, stats.next_tick_at) == (False, None)

    await run_until(cycle, 35)
    assert job.starts == [0, 10, 13, 23, 33]
    assert cycle.statistics().runs == 5


async def test_base_exception_from_run_propagates(
    autojump_clock: trio.testing.MockClock,
) -> None:
    job = ScriptedJob(durations=[1, Halt()])
    cycle = Cycle(job, interval=10)
    with pytest.raises(Halt):
        await cycle.run()
    assert trio.current_time() == 10
    stats = cycle.statistics()
    assert (stats.runs, stats.failures, stats.running) == (2, 0, False)


async def test_running_twice_at_once_is_refused(autojump_clock: trio.testing.MockClock) -> None:
    cycle = Cycle(ScriptedJob(), interval=10)
    async with trio.open_nursery() as nursery:
        await nursery.start(cycle.run)
        with pytest.raises(trio.BusyResourceError, match="already running"):
            # Bounded, so that a missing guard fails the test instead of hanging it.
            with trio.move_on_after(1):
                await cycle.run()
        nursery.cancel_scope.cancel()


async def test_sync_function_is_refused_when_first_called() -> None:
    def not_async() -> None:
        pass

    cycle = Cycle(not_async, interval=10)  # type: ignore[arg-type]  # the mistake under test
    with pytest.raises(
        TypeError, match=r"^fn must be an async function: .*not_async returned None"
    ):
        await cycle.run()
    assert cycle.statistics().runs == 0


# --- heartbeats and the tree ------------------------------------------------


async def test_heartbeat_at_start_and_end_and_attached_while_running(
    autojump_clock: trio.testing.MockClock,
) -> None:
    run = RunContext(child="t", clock=trio.lowlevel.current_clock(), last_beat=-1.0)
    job = ScriptedJob(rest=3)
    cycle = Cycle(job, interval=10)
    token = current_run.set(run)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(cycle.run)
            assert run.attached == [cycle]
            await trio.sleep_until(1)
            assert run.last_beat == 0  # start of run 0
            await trio.sleep_until(5)
            assert run.last_beat == 3  # end of run 0
            await trio.sleep_until(12)
            assert run.last_beat == 10  # start of run 1
            nursery.cancel_scope.cancel()
    finally:
        current_run.reset(token)
    assert run.attached == []
    assert run.last_beat == 12  # the cut run still beats on its way out


# --- every() ----------------------------------------------------------------


async def test_every_runs_fn_with_args_on_the_grid(
    autojump_clock: trio.testing.MockClock,
) -> None:
    calls: list[tuple[float, str, int]] = []

    async def record(label: str, number: int) -> None:
        calls.append((trio.current_time(), label, number))

    async with trio.open_nursery() as nursery:
        await nursery.start(every, 5, record, "quote", 7)
        await trio.sleep_until(12)
        nursery.cancel_scope.cancel()
    assert calls == [(0, "quote", 7), (5, "quote", 7), (10, "quote", 7)]


async def test_every_rejects_bad_arguments_before_running() -> None:
    job = ScriptedJob()
    with pytest.raises(ValueError, match=r"^interval must be > 0, got -1$"):
        await every(-1, job)
    assert job.starts == []


# --- argument checks --------------------------------------------------------


async def _noop() -> None:
    pass


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"interval": -1}, ValueError, "^interval must be > 0, got -1$"),
        ({"interval": 0}, ValueError, "^interval must be > 0, got 0$"),
        ({"interval": math.inf}, ValueError, "^interval must be finite, got inf$"),
        ({"interval": math.nan}, ValueError, "^interval must not be NaN$"),
        ({"interval": "10"}, TypeError, "^interval must be a number of seconds"),
        ({"interval": True}, TypeError, "^interval must be a number of seconds"),
        ({"interval": 1, "cycle_deadline": 0}, ValueError, "^cycle_deadline must be > 0"),
        ({"interval": 1, "cycle_deadline": -5}, ValueError, "^cycle_deadline must be > 0"),
        ({"interval": 1, "overrun": "drop"}, ValueError, "^overrun must be one of 'skip', "),
        ({"interval": 1, "name": ""}, ValueError, "^name must be a non-empty string"),
    ],
)
def test_invalid_arguments_fail_at_construction_naming_the_parameter(
    kwargs: dict[str, Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        Cycle(_noop, **kwargs)


def test_fn_must_be_callable() -> None:
    with pytest.raises(TypeError, match=r"^fn must be an async callable, got 42$"):
        Cycle(42, interval=1)  # type: ignore[arg-type]  # the mistake under test


def test_defaults_and_accepted_values() -> None:
    cycle = Cycle(_noop, interval=2)
    assert (cycle.name, cycle.cycle_deadline, cycle.overrun) == ("_noop", 2.0, "skip")
    assert cycle.overrun is OverrunPolicy.SKIP
    unbounded = Cycle(_noop, interval=2, cycle_deadline=math.inf, overrun="immediate", name="x")
    assert (unbounded.name, unbounded.cycle_deadline) == ("x", math.inf)
    assert unbounded.overrun is OverrunPolicy.IMMEDIATE
    assert Cycle(ScriptedJob(), interval=1).name == "ScriptedJob"
    assert Cycle(functools.partial(_noop), interval=1).name == "_noop"


# --- the documentation ------------------------------------------------------


def test_docs_example_runs_and_survives_the_hang() -> None:
    done = subprocess.run(
        [sys.executable, str(EXAMPLE)],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "refresh 1: updated 3 symbols",
        "refresh 2: updated 3 symbols",
        "refresh 3: cut by the cycle deadline",
        "refresh 4: updated 3 symbols",
        "refresh 5: updated 3 symbols",
        "runs=5 successes=4 failures=1 timeouts=1 overruns=0 skipped_ticks=0",
        "last_error: TooSlowError: cycle deadline of 0.08 s expired",
        "succeeded after the hang: True",
        "watchlist refreshed 4 times",
    ]
    assert "WARNING engine.cycles: cycle 'watchlist': cycle deadline of 0.08 s" in done.stderr


def test_docs_page_quotes_the_example_verbatim() -> None:
    assert EXAMPLE.read_text(encoding="utf-8") in PAGE.read_text(encoding="utf-8")
