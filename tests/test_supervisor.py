"""Supervisor: strategies, restart policies, backoff, intensity, readiness, stalls, trees."""

from __future__ import annotations

import itertools
import logging
import math
import re
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, get_args

import attrs
import pytest
import trio
import trio.testing

import engine
from engine import Restart, RestartName, Strategy, StrategyName
from engine._exceptions import FailureRecord
from engine._restarts import RestartIntensity, restart_group, wants_restart
from engine.lowlevel import attach_statistics

NO_JITTER = engine.Backoff(initial=1.0, maximum=8.0, jitter=0.0)
IMMEDIATE = engine.Backoff(initial=0.0, maximum=0.0, jitter=0.0)


@attrs.define
class Log:
    """Records (time, event) pairs so tests can assert exact virtual times."""

    events: list[tuple[float, str]] = attrs.Factory(list)

    def add(self, event: str) -> None:
        self.events.append((trio.current_time(), event))

    def of(self, prefix: str) -> list[float]:
        return [t for t, e in self.events if e == prefix]


def worker(
    log: Log, name: str, *, fail_after: float | None = None
) -> Callable[[], Awaitable[None]]:
    """A child that logs its start and either runs forever or raises after a delay."""

    async def run() -> None:
        log.add(f"{name} start")
        try:
            if fail_after is None:
                await trio.sleep_forever()
            await trio.sleep(fail_after)
            raise RuntimeError(f"{name} broke")
        finally:
            log.add(f"{name} end")

    return run


async def test_one_for_one_restarts_only_the_failed_child(autojump_clock: trio.abc.Clock) -> None:
    log = Log()
    with trio.move_on_after(10):
        async with engine.open_supervisor(max_restarts=100, period=60) as sup:
            sup.start_soon(worker(log, "a"), name="a", backoff=NO_JITTER)
            sup.start_soon(worker(log, "b", fail_after=2), name="b", backoff=NO_JITTER)
    assert log.of("a start") == [0]
    # b fails at 2, waits 1 -> 3, fails at 5, waits 2 -> 7, fails at 9, waits 4.
    assert log.of("b start") == [0, 3, 7]


async def test_one_for_all_restarts_every_sibling_in_order(autojump_clock: trio.abc.Clock) -> None:
    log = Log()
    with trio.move_on_after(4):
        async with engine.open_supervisor(strategy="one_for_all", max_restarts=100) as sup:
            sup.start_soon(worker(log, "a"), name="a", backoff=NO_JITTER)
            sup.start_soon(worker(log, "b", fail_after=2), name="b", backoff=NO_JITTER)
            sup.start_soon(worker(log, "c"), name="c", backoff=NO_JITTER)
            sup.start_soon(worker(log, "t"), name="t", restart="temporary")
    assert log.of("a start") == [0, 3]
    assert log.of("b start") == [0, 3]
    assert log.of("c start") == [0, 3]
    assert log.of("t start") == [0]  # a temporary sibling is stopped, not restarted
    assert log.of("t end") == [2]
    # Siblings are stopped in reverse start order before the restart.
    stops = [e for t, e in log.events if t == 2 and e.endswith("end")]
    assert stops == ["b end", "t end", "c end", "a end"]
    starts = [e for t, e in log.events if t == 3]
    assert starts == ["a start", "b start", "c start"]


async def test_rest_for_one_restarts_the_failed_and_later_children(
    autojump_clock: trio.abc.Clock,
) -> None:
    log = Log()
    with trio.move_on_after(4):
        async with engine.open_supervisor(strategy="rest_for_one", max_restarts=100) as sup:
            sup.start_soon(worker(log, "a"), name="a", backoff=NO_JITTER)
            sup.start_soon(worker(log, "b", fail_after=2), name="b", backoff=NO_JITTER)
            sup.start_soon(worker(log, "c"), name="c", backoff=NO_JITTER)
    assert log.of("a start") == [0]
    assert log.of("b start") == [0, 3]
    assert log.of("c start") == [0, 3]


@pytest.mark.parametrize(
    ("restart", "fails", "expected_starts"),
    [
        ("permanent", False, [0, 1, 2, 3]),
        ("permanent", True, [0, 1, 2, 3]),
        ("transient", False, [0]),
        ("transient", True, [0, 1, 2, 3]),
        ("temporary", False, [0]),
        ("temporary", True, [0]),
    ],
)
async def test_restart_policies(
    autojump_clock: trio.abc.Clock,
    restart: RestartName,
    fails: bool,
    expected_starts: list[float],
) -> None:
    starts: list[float] = []

    async def child() -> None:
        starts.append(trio.current_time())
        await trio.sleep(1)
        if fails:
            raise ValueError("no")

    with trio.move_on_after(3.5):
        async with engine.open_supervisor(max_restarts=100) as sup:
            sup.start_soon(child, name="c", restart=restart, backoff=IMMEDIATE)
    assert starts == expected_starts


async def test_supervisor_block_ends_when_no_child_is_left(autojump_clock: trio.abc.Clock) -> None:
    async def brief() -> None:
        await trio.sleep(2)

    async with engine.open_supervisor() as sup:
        sup.start_soon(brief, name="t", restart="transient")
        sup.start_soon(brief, name="tmp", restart="temporary")
    assert trio.current_time() == 2
    states = {c.name: c.state for c in sup.statistics().children}
    assert states == {"t": engine.ChildState.STOPPED, "tmp": engine.ChildState.STOPPED}


async def test_backoff_sequence_with_seeded_jitter_is_exact(autojump_clock: trio.abc.Clock) -> None:
    backoff = engine.Backoff(initial=0.5, maximum=40.0, jitter=0.5, seed=1234)
    expected = list(itertools.islice(backoff.delays(), 6))
    starts: list[float] = []

    async def crash() -> None:
        starts.append(trio.current_time())
        raise OSError("connection refused")

    with trio.move_on_after(sum(expected) + 0.001):
        async with engine.open_supervisor(max_restarts=100, period=1) as sup:
            sup.start_soon(crash, name="feed", backoff=backoff)
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    assert gaps == pytest.approx(expected, abs=1e-9)
    assert len(set(expected)) == 6  # the jitter really varies the delays
    assert max(expected) <= 40.0


def test_backoff_is_exponential_and_capped() -> None:
    backoff = engine.Backoff(initial=0.5, maximum=3.0, multiplier=3.0, jitter=0.0)
    assert list(itertools.islice(backoff.delays(), 4)) == [0.5, 1.5, 3.0, 3.0]
    assert backoff.delay(10_000, backoff.new_random()) == 3.0  # no overflow
    jittered = engine.Backoff(initial=1.0, maximum=100.0, jitter=0.2, seed=5)
    for attempt, delay in enumerate(itertools.islice(jittered.delays(), 5)):
        assert 0.8 * 2**attempt <= delay <= 1.2 * 2**attempt


async def test_backoff_resets_after_a_healthy_run(autojump_clock: trio.abc.Clock) -> None:
    backoff = engine.Backoff(initial=1.0, maximum=60.0, jitter=0.0, reset_after=10.0)
    lifetimes = iter([0.0, 0.0, 0.0, 15.0, 0.0])
    starts: list[float] = []

    async def child() -> None:
        starts.append(trio.current_time())
        await trio.sleep(next(lifetimes, math.inf))
        raise ConnectionError("dropped")

    with trio.move_on_after(100):
        async with engine.open_supervisor(max_restarts=100, period=1) as sup:
            sup.start_soon(child, name="feed", backoff=backoff)
    # Delays 1, 2, 4; then a 15 s run counts as healthy, so the sequence starts
    # over: 1 (after the failure at 22), then 2.
    assert starts == [0, 1, 3, 7, 23, 25]


async def test_intensity_exceeded_on_the_restart_past_the_limit(
    autojump_clock: trio.abc.Clock,
) -> None:
    starts: list[float] = []

    async def crash() -> None:
        starts.append(trio.current_time())
        await trio.sleep(1)
        raise ValueError(f"bad config #{len(starts)}")

    opened: list[engine.Supervisor] = []

    async def supervise() -> None:
        async with engine.open_supervisor(name="root", max_restarts=3, period=10) as sup:
            opened.append(sup)
            sup.start_soon(crash, name="parser", backoff=IMMEDIATE)
            sup.start_soon(trio.sleep_forever, name="bystander")

    with pytest.raises(engine.RestartIntensityExceeded) as info:
        await supervise()
    (sup,) = opened
    # Three restarts are allowed; the fourth failure (at t=4) breaks the limit.
    assert starts == [0, 1, 2, 3]
    assert trio.current_time() == 4
    error = info.value
    assert error.child == "parser"
    assert error.supervisor == "root"
    assert [f.at for f in error.failures] == [1, 2, 3, 4]
    assert "parser" in str(error)
    assert "ValueError: bad config #4" in str(error)
    assert [c.state for c in sup.statistics().children] == [
        engine.ChildState.FAILED,
        engine.ChildState.STOPPED,  # cancelled when the supervisor gave up
    ]
    assert sup.statistics().failed


async def test_intensity_not_exceeded_when_restarts_are_spread_out(
    autojump_clock: trio.abc.Clock,
) -> None:
    starts: list[float] = []

    async def crash() -> None:
        starts.append(trio.current_time())
        await trio.sleep(5)
        raise ValueError("flaky")

    # One failure every 5 s and a window of 10 s: never more than 2 in a window.
    with trio.move_on_after(60):
        async with engine.open_supervisor(max_restarts=2, period=10) as sup:
            sup.start_soon(crash, name="flaky", backoff=IMMEDIATE)
    assert len(starts) == 12
    assert sup.statistics().restarts_in_period == 1  # only the failure at t=55
    # ...but a third failure inside one window is one too many.
    with pytest.raises(engine.RestartIntensityExceeded):
        async with engine.open_supervisor(max_restarts=2, period=10.5) as sup:
            sup.start_soon(crash, name="flaky", backoff=IMMEDIATE)


async def test_max_restarts_zero_gives_up_at_the_first_restart(
    autojump_clock: trio.abc.Clock,
) -> None:
    with pytest.raises(engine.RestartIntensityExceeded):
        async with engine.open_supervisor(max_restarts=0) as sup:
            sup.start_soon(trio.sleep, 1, name="once")
    assert trio.current_time() == 1


async def test_nested_supervisor_failure_is_a_failure_of_the_parent_child(
    autojump_clock: trio.abc.Clock,
) -> None:
    inner_opens: list[float] = []
    snapshots: list[engine.SupervisorStatistics] = []

    async def crash() -> None:
        await trio.sleep(1)
        raise RuntimeError("inner crash")

    async def subtree() -> None:
        inner_opens.append(trio.current_time())
        async with engine.open_supervisor(name="inner", max_restarts=1, period=10) as inner:
            inner.start_soon(crash, name="leaf", backoff=IMMEDIATE)

    async def watch(outer: engine.Supervisor) -> None:
        await trio.sleep(0.5)
        snapshots.append(outer.statistics())

    with trio.move_on_after(5):
        async with engine.open_supervisor(name="outer", max_restarts=10) as outer:
            outer.start_soon(subtree, name="sub", backoff=NO_JITTER)
            outer.start_soon(watch, outer, name="watch", restart="temporary")
    # Inner gives up at t=2 (second leaf failure); outer restarts "sub" after 1 s.
    assert inner_opens == [0, 3]
    sub = next(c for c in outer.statistics().children if c.name == "sub")
    assert sub.failures == 1
    assert sub.last_error is not None
    assert sub.last_error.startswith("RestartIntensityExceeded: supervisor 'inner' gave up")
    # The tree: the inner supervisor is listed under the child that runs it.
    (tree,) = snapshots
    paths = [path for path, _ in tree.walk()]
    assert paths == ["outer/sub", "outer/sub/leaf", "outer/watch"]


async def test_start_waits_for_ready_and_returns_its_value(autojump_clock: trio.abc.Clock) -> None:
    async def server(port: int, *, task_status: trio.TaskStatus[int]) -> None:
        await trio.sleep(3)  # binding, connecting...
        task_status.started(port)
        await trio.sleep_forever()

    async with engine.open_supervisor() as sup:
        value = await sup.start(server, 8080, name="server")
        assert value == 8080
        assert trio.current_time() == 3
        (child,) = sup.statistics().children
        assert child.state == engine.ChildState.RUNNING
        assert child.ready
        sup.cancel()


async def test_restarts_wait_for_readiness_in_order(autojump_clock: trio.abc.Clock) -> None:
    log = Log()

    def ready_after(
        name: str, delay: float, fail_at: float | None = None
    ) -> Callable[..., Awaitable[None]]:
        async def run(*, task_status: trio.TaskStatus[None]) -> None:
            log.add(f"{name} start")
            await trio.sleep(delay)
            task_status.started()
            log.add(f"{name} ready")
            if fail_at is not None and trio.current_time() < fail_at + 1:
                await trio.sleep_until(fail_at)
                raise RuntimeError("down")
            await trio.sleep_forever()

        return run

    with trio.move_on_after(20):
        async with engine.open_supervisor(strategy="one_for_all") as sup:
            await sup.start(ready_after("db", 2, fail_at=10), name="db", backoff=NO_JITTER)
            await sup.start(ready_after("api", 3), name="api", backoff=NO_JITTER)
    # db fails at 10, restart after 1 s: db ready at 13, and only then api starts.
    assert log.of("db start") == [0, 11]
    assert log.of("api start") == [2, 13]
    assert log.of("api ready") == [5, 16]


async def test_start_raises_when_the_child_fails_before_ready(
    autojump_clock: trio.abc.Clock,
) -> None:
    async def broken(*, task_status: trio.TaskStatus[None]) -> None:
        await trio.sleep(1)
        raise OSError("address in use")

    async def quits(*, task_status: trio.TaskStatus[None]) -> None:
        await trio.sleep(1)

    async with engine.open_supervisor() as sup:
        with pytest.raises(engine.ChildStartError, match="address in use") as info:
            await sup.start(broken, name="server")
        assert isinstance(info.value.__cause__, OSError)
        with pytest.raises(engine.ChildStartError, match=r"before calling task_status\.started"):
            await sup.start(quits, name="quitter")
    assert trio.current_time() == 2  # nothing was restarted
    assert [c.state for c in sup.statistics().children] == [engine.ChildState.FAILED] * 2


async def test_start_abandoned_when_its_caller_is_cancelled(autojump_clock: trio.abc.Clock) -> None:
    cancelled = trio.Event()

    async def slow(*, task_status: trio.TaskStatus[None]) -> None:
        try:
            await trio.sleep_forever()
        finally:
            cancelled.set()

    async with engine.open_supervisor() as sup:
        with trio.move_on_after(5):
            await sup.start(slow, name="slow")
        await cancelled.wait()
        assert sup.children == ()
    assert trio.current_time() == 5


async def test_stalled_child_is_cancelled_at_exactly_stall_after(
    autojump_clock: trio.abc.Clock, caplog: pytest.LogCaptureFixture
) -> None:
    starts: list[float] = []
    cancelled_at: list[float] = []

    async def wedged_forever() -> None:
        starts.append(trio.current_time())
        engine.heartbeat()
        await trio.sleep(2)
        engine.heartbeat()
        try:
            await trio.sleep_forever()  # the 27-hour hang of seed 001
        finally:
            cancelled_at.append(trio.current_time())

    caplog.set_level(logging.WARNING, logger="engine.supervisor")
    with trio.move_on_after(20):
        async with engine.open_supervisor(max_restarts=10) as sup:
            sup.start_soon(wedged_forever, name="watchlist", stall_after=5, backoff=NO_JITTER)
    # Last beat at 2 -> cancelled at 7, restarted at 8, last beat 10 -> cancelled at 15.
    assert starts == [0, 8, 17]
    assert cancelled_at == [7, 15, 20]
    (child,) = sup.statistics().children
    assert child.stalls == 2
    assert child.restarts == 2
    assert child.last_error == (
        "ChildStalled: child 'watchlist' stalled: no heartbeat for 5.000 s (stall_after=5 s)"
    )
    stall_logs = [r for r in caplog.records if "stalled" in r.getMessage()]
    assert len(stall_logs) == 2
    # The log names the function and the line where the child was stuck.
    assert "wedged_forever" in stall_logs[0].getMessage()
    assert "await trio.sleep_forever()  # the 27-hour hang" in stall_logs[0].getMessage()


async def test_heartbeats_keep_a_slow_child_alive(autojump_clock: trio.abc.Clock) -> None:
    beats = 0

    async def slow_but_alive() -> None:
        nonlocal beats
        while True:
            await trio.sleep(4)
            engine.heartbeat()
            beats += 1

    with trio.move_on_after(98):
        async with engine.open_supervisor() as sup:
            sup.start_soon(slow_but_alive, name="slow", stall_after=5)
    (child,) = sup.statistics().children
    assert child.stalls == 0
    assert beats == 24


async def test_heartbeat_from_a_thread_and_a_subtask_count() -> None:
    stalls_seen: list[int] = []

    def blocking_step() -> None:
        time.sleep(0.05)
        engine.heartbeat()

    async def child() -> None:
        async with trio.open_nursery() as nursery:

            async def helper() -> None:
                engine.heartbeat()

            nursery.start_soon(helper)
        for _ in range(3):
            await trio.to_thread.run_sync(blocking_step)

    with trio.fail_after(10):
        async with engine.open_supervisor() as sup:
            sup.start_soon(child, name="mixed", restart="transient", stall_after=5)
        stalls_seen.append(sup.statistics().children[0].stalls)
    assert stalls_seen == [0]


async def test_stall_during_startup_fails_start(autojump_clock: trio.abc.Clock) -> None:
    async def never_ready(*, task_status: trio.TaskStatus[None]) -> None:
        await trio.sleep_forever()

    async with engine.open_supervisor() as sup:
        with pytest.raises(engine.ChildStartError, match="stalled") as info:
            await sup.start(never_ready, name="feed", stall_after=30)
        assert isinstance(info.value.__cause__, engine.ChildStalled)
        assert info.value.__cause__.stall_after == 30
    assert trio.current_time() == 30


async def test_heartbeat_outside_a_supervisor_is_harmless() -> None:
    engine.heartbeat()


async def test_dynamic_start_and_stop(autojump_clock: trio.abc.Clock) -> None:
    log = Log()

    async def spawner(sup: engine.Supervisor) -> None:
        await trio.sleep(1)
        sup.start_soon(worker(log, "late"), name="late")

    async with engine.open_supervisor() as sup:
        sup.start_soon(spawner, sup, name="spawner", restart="temporary")
        sup.start_soon(worker(log, "early"), name="early")
        await trio.sleep(2)
        assert list(sup.children) == ["spawner", "early", "late"]
        await sup.stop("early")
        assert log.of("early end") == [2]
        assert list(sup.children) == ["spawner", "late"]
        with pytest.raises(KeyError, match="no child named 'early'"):
            await sup.stop("early")
        with pytest.raises(ValueError, match="already has a child named 'late'"):
            sup.start_soon(worker(log, "x"), name="late")
        await sup.stop("late")
    assert trio.current_time() == 2
    assert log.of("late start") == [1]


async def test_stop_during_backoff_cancels_the_pending_restart(
    autojump_clock: trio.abc.Clock,
) -> None:
    log = Log()
    async with engine.open_supervisor() as sup:
        sup.start_soon(worker(log, "x", fail_after=1), name="x", backoff=NO_JITTER)
        await trio.sleep(1.5)
        assert sup.statistics().children[0].state == engine.ChildState.BACKING_OFF
        await sup.stop("x")
    assert log.of("x start") == [0]
    assert trio.current_time() == 2  # the restart task ends after its delay without starting


async def test_start_after_close_is_refused() -> None:
    async with engine.open_supervisor() as sup:
        pass
    with pytest.raises(RuntimeError, match="closed"):
        sup.start_soon(trio.sleep_forever, name="late")


async def test_child_body_error_is_a_group_and_children_are_cancelled() -> None:
    cancelled = trio.Event()

    async def child() -> None:
        try:
            await trio.sleep_forever()
        finally:
            cancelled.set()

    with pytest.RaisesGroup(pytest.RaisesExc(KeyError, match="body")):
        async with engine.open_supervisor() as sup:
            sup.start_soon(child, name="c")
            await trio.testing.wait_all_tasks_blocked()
            raise KeyError("body")
    assert cancelled.is_set()


async def test_statistics_snapshot(autojump_clock: trio.abc.Clock) -> None:
    async def beating() -> None:
        engine.heartbeat()
        await trio.sleep_forever()

    async def flaky() -> None:
        await trio.sleep(1)
        raise ValueError("boom")

    async with engine.open_supervisor(name="svc", max_restarts=10, period=30) as sup:
        sup.start_soon(beating, name="beating", stall_after=60)
        sup.start_soon(flaky, name="flaky", backoff=engine.Backoff(initial=5, jitter=0))
        await trio.sleep(3)
        stats = sup.statistics()
        sup.cancel()
    assert stats.name == "svc"
    assert stats.strategy == "one_for_one"
    assert stats.restarts_in_period == 1
    assert stats.taken_at == 3
    beating_stats, flaky_stats = stats.children
    assert beating_stats == engine.ChildStatistics(
        name="beating",
        state=engine.ChildState.RUNNING,
        restart="permanent",
        ready=True,
        restarts=0,
        failures=0,
        stalls=0,
        stall_after=60.0,
        last_error=None,
        last_error_at=None,
        started_at=0.0,
        heartbeat_age=3.0,
    )
    assert flaky_stats.state == engine.ChildState.BACKING_OFF
    assert flaky_stats.failures == 1
    assert flaky_stats.last_error == "ValueError: boom"
    assert flaky_stats.last_error_at == 1
    assert flaky_stats.started_at is None
    assert flaky_stats.heartbeat_age is None
    assert not flaky_stats.ready
    # Shaped for JSON: plain values all the way down.
    as_dict = attrs.asdict(stats)
    assert as_dict["children"][1]["state"] == "backing_off"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"strategy": "one_for_some"}, "strategy must be one of"),
        ({"max_restarts": -1}, "max_restarts must be >= 0"),
        ({"period": -5}, "period must be > 0"),
        ({"period": 0}, "period must be > 0"),
        ({"name": ""}, "name must be a non-empty string"),
    ],
)
def test_open_supervisor_rejects_bad_arguments_at_call_time(
    kwargs: dict[str, object], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        engine.open_supervisor(**kwargs)  # type: ignore[arg-type]  # deliberately wrong values


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"restart": "sometimes"}, "restart must be one of"),
        ({"stall_after": 0}, "stall_after must be > 0"),
        ({"stall_after": -1.0}, "stall_after must be > 0"),
        ({"name": ""}, "name must be a non-empty string"),
    ],
)
async def test_child_arguments_are_checked_at_call_time(
    kwargs: dict[str, object], message: str
) -> None:
    options: dict[str, object] = {"name": "c", **kwargs}
    async with engine.open_supervisor() as sup:
        with pytest.raises(ValueError, match=message):
            sup.start_soon(trio.sleep_forever, **options)  # type: ignore[arg-type]  # deliberately wrong
        with pytest.raises(TypeError, match=r"backoff must be an engine\.Backoff"):
            sup.start_soon(trio.sleep_forever, name="c", backoff=5)  # type: ignore[arg-type]  # as above
        assert sup.children == ()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"initial": -1}, "initial must be >= 0"),
        ({"initial": 5, "maximum": 1}, "maximum must be >= initial"),
        ({"multiplier": 0.5}, "multiplier must be >= 1"),
        ({"jitter": 1.5}, "jitter must be between 0 and 1"),
        ({"reset_after": 0}, "reset_after must be > 0"),
    ],
)
def test_backoff_rejects_bad_arguments(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        engine.Backoff(**kwargs)


async def test_start_soon_reports_ready_retries_failures_before_ready(
    autojump_clock: trio.abc.Clock,
) -> None:
    attempts: list[float] = []

    async def feed(*, task_status: trio.TaskStatus[None]) -> None:
        attempts.append(trio.current_time())
        await trio.sleep(1)  # connecting
        if len(attempts) < 3:
            raise ConnectionError("exchange down")
        task_status.started()
        await trio.sleep_forever()

    async with engine.open_supervisor() as sup:
        sup.start_soon(feed, name="feed", reports_ready=True, backoff=NO_JITTER)
        await trio.sleep(0.5)
        (child,) = sup.statistics().children
        assert (child.state, child.ready) == (engine.ChildState.STARTING, False)
        await trio.sleep(6)
        (child,) = sup.statistics().children
        assert (child.state, child.ready, child.failures) == (engine.ChildState.RUNNING, True, 2)
        sup.cancel()
    # Fails at 1, restarts at 2; fails at 3, restarts at 5; ready at 6.
    assert attempts == [0, 2, 5]


async def test_a_cycle_under_a_supervisor_is_listed_and_keeps_the_watchdog_fed(
    autojump_clock: trio.abc.Clock,
) -> None:
    async def refresh() -> None:
        await trio.sleep(1)

    cycle = engine.Cycle(refresh, interval=10, cycle_deadline=5, name="watchlist")
    async with engine.open_supervisor() as sup:
        await sup.start(cycle.run, name="watchlist", stall_after=16)
        await trio.sleep(95)
        (child,) = sup.statistics().children
        sup.cancel()
    assert child.stalls == 0  # beats at each run's start and end, 10 s apart at most
    (attached,) = child.attached
    assert isinstance(attached, engine.CycleStatistics)
    assert (attached.name, attached.runs, attached.successes) == ("watchlist", 10, 10)


async def test_attach_statistics_lists_a_source_under_the_child_while_the_block_runs(
    autojump_clock: trio.abc.Clock,
) -> None:
    @attrs.frozen
    class Pool:
        name: str = "pool"

        def statistics(self) -> str:
            return "pool statistics"

    async def child(*, task_status: trio.TaskStatus[None]) -> None:
        try:
            with attach_statistics(Pool()):
                task_status.started()
                await trio.sleep(1)
                raise RuntimeError("closed early")
        except RuntimeError:
            await trio.sleep_forever()

    with attach_statistics(Pool()):
        pass  # outside a supervised child: nothing to attach to, and no error
    async with engine.open_supervisor() as sup:
        await sup.start(child, name="c")
        (during,) = sup.statistics().children
        await trio.sleep(2)
        (after,) = sup.statistics().children
        sup.cancel()
    assert during.attached == ("pool statistics",)
    assert after.attached == ()


async def test_options_accept_the_enums_as_well_as_their_strings(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with engine.open_supervisor(strategy=Strategy.REST_FOR_ONE) as sup:
        sup.start_soon(trio.sleep, 1, name="brief", restart=Restart.TRANSIENT)
    assert sup.strategy == "rest_for_one"
    (child,) = sup.statistics().children
    assert (child.restart, child.state) == ("transient", engine.ChildState.STOPPED)


def test_option_names_are_the_enum_values() -> None:
    assert get_args(StrategyName) == tuple(Strategy)
    assert get_args(RestartName) == tuple(Restart)


# -- the restart policy, as plain decisions ----------------------------------


@attrs.frozen
class Member:
    order: int
    live: bool = True
    restart: Restart = Restart.PERMANENT


def test_restart_group_follows_the_strategy() -> None:
    a, b, c, d = Member(1), Member(2, restart=Restart.TEMPORARY), Member(3, live=False), Member(4)
    children = [a, b, c, d]
    assert restart_group(Strategy.ONE_FOR_ONE, b, children) == ([b], [])
    # Ended children stay out; temporary ones are stopped, not restarted.
    assert restart_group(Strategy.ONE_FOR_ALL, d, children) == ([a, d], [b])
    # Only the children started after the one that ended.
    assert restart_group(Strategy.REST_FOR_ONE, b, children) == ([b, d], [])
    assert restart_group(Strategy.REST_FOR_ONE, c, children) == ([c, d], [])


@pytest.mark.parametrize(
    ("restart", "failed", "expected"),
    [
        (Restart.PERMANENT, False, True),
        (Restart.PERMANENT, True, True),
        (Restart.TRANSIENT, False, False),
        (Restart.TRANSIENT, True, True),
        (Restart.TEMPORARY, False, False),
        (Restart.TEMPORARY, True, False),
    ],
)
def test_wants_restart(restart: Restart, failed: bool, expected: bool) -> None:
    assert wants_restart(restart, failed=failed) is expected


def test_restart_intensity_counts_restarts_in_a_sliding_window() -> None:
    window = RestartIntensity(max_restarts=2, period=10.0)
    assert window.admit(0.0)
    assert window.admit(5.0)
    assert not window.admit(9.0)
    assert window.in_period(9.0) == 3
    # At 15 the restarts of 0 and 5 are a full period old, and no longer count.
    assert window.admit(15.0)
    assert window.in_period(15.0) == 2


def test_restart_intensity_reports_the_recent_failures_only() -> None:
    window = RestartIntensity(max_restarts=0, period=10.0)
    for at in range(60):
        window.record_failure(FailureRecord(float(at), "feed", f"OSError: {at}"))
    error = window.exceeded("root", "feed", now=60.0)
    assert [f.at for f in error.failures] == [51.0 + i for i in range(9)]
    assert (error.supervisor, error.child, error.max_restarts, error.period) == (
        "root",
        "feed",
        0,
        10.0,
    )
    old = window.exceeded("root", "feed", now=0.0).failures
    assert len(old) == 50  # the oldest are forgotten
    assert old[0].at == 10.0


_TYPO_CHECK = """\
import engine
from engine import Restart, Strategy


async def child() -> None: ...


async def main() -> None:
    async with engine.open_supervisor(strategy=Strategy.ONE_FOR_ALL):
        pass
    async with engine.open_supervisor(strategy="one_for_some"):  # wrong
        pass
    async with engine.open_supervisor(strategy="rest_for_one") as sup:
        sup.start_soon(child, name="a", restart="transient")
        sup.start_soon(child, name="b", restart=Restart.TEMPORARY)
        sup.start_soon(child, name="c", restart="sometimes")  # wrong
        await sup.start(child, name="d", restart="permanant")  # wrong
"""


@pytest.mark.subprocess
def test_a_misspelt_option_fails_type_checking(tmp_path: Path) -> None:
    snippet = tmp_path / "snippet.py"
    snippet.write_text(_TYPO_CHECK)
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--cache-dir", str(tmp_path / "cache"), str(snippet)],
        cwd=Path(__file__).resolve().parent.parent,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    flagged = {
        int(m[1]) for m in re.finditer(r"snippet\.py:(\d+): error: .*\[arg-type\]", result.stdout)
    }
    wrong = {n for n, line in enumerate(_TYPO_CHECK.splitlines(), 1) if line.endswith("# wrong")}
    assert flagged == wrong, result.stdout + result.stderr
    assert result.stdout.count("error:") == len(wrong), result.stdout
