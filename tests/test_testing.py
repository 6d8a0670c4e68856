"""Tests of engine.testing: Stopwatch, Scripted, the leak checks and the pytest plugin."""

from __future__ import annotations

import math
import subprocess
import sys
import threading
from functools import partial
from pathlib import Path

import psutil
import pytest
import trio
import trio.testing

import engine.testing
from engine._watchdog import RunContext, current_run
from engine.testing import (
    CallRecord,
    Fail,
    Finish,
    Hang,
    Scripted,
    Snapshot,
    Stopwatch,
    assert_no_task_leaks,
    find_leaks,
)
from engine.testing._leaks import _is_session_helper

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parent.parent


def test_public_surface() -> None:
    assert engine.testing.__all__ == sorted(engine.testing.__all__)
    assert engine.testing.__all__ == [
        "CallRecord",
        "CallStatus",
        "Fail",
        "Finish",
        "Hang",
        "LeakedProcess",
        "LeakedThread",
        "Leaks",
        "Scripted",
        "Snapshot",
        "Step",
        "Stopwatch",
        "VirtualBridge",
        "assert_no_task_leaks",
        "find_leaks",
    ]
    for name in engine.testing.__all__:
        assert getattr(engine.testing, name) is not None


# --- Stopwatch ----------------------------------------------------------------


async def test_stopwatch_measures_virtual_time_exactly(autojump_clock: trio.abc.Clock) -> None:
    await trio.sleep(5)
    with Stopwatch() as stopwatch:
        await trio.sleep(10)
        assert stopwatch.elapsed == 10
        await trio.sleep(50)
    await trio.sleep(7)
    assert stopwatch.elapsed == 60
    assert (stopwatch.started_at, stopwatch.stopped_at) == (5, 65)


async def test_stopwatch_misuse_is_an_error() -> None:
    with pytest.raises(RuntimeError, match="never started"):
        _ = Stopwatch().elapsed
    with Stopwatch() as stopwatch:
        pass
    with pytest.raises(RuntimeError, match="one block"), stopwatch:
        pass


# --- Scripted -------------------------------------------------------------------


async def test_finish_returns_its_value_after_exactly_its_delay(
    autojump_clock: trio.abc.Clock,
) -> None:
    fake = Scripted(Finish("quote", after=0.25))

    assert await fake("BTCUSDT", depth=5) == "quote"

    assert trio.current_time() == 0.25
    assert fake.records == [
        CallRecord(
            0,
            Finish("quote", after=0.25),
            ("BTCUSDT",),
            {"depth": 5},
            started_at=0,
            ready_at=0,
            ended_at=0.25,
            status="finished",
            value="quote",
        )
    ]


async def test_calls_follow_the_script_and_repeat_the_last_step(
    autojump_clock: trio.abc.Clock,
) -> None:
    fake = Scripted(Finish(1, after=1), Fail(ValueError, "bad", after=2), Finish(3, after=0.5))

    assert await fake() == 1
    with pytest.raises(ValueError, match=r"^bad$"):
        await fake()
    assert await fake() == 3
    assert await fake() == 3

    assert fake.calls == 4
    assert fake.started_at == [0, 1, 3, 3.5]
    assert fake.ended_at == [1, 3, 3.5, 4]
    assert [r.status for r in fake.records] == ["finished", "failed", "finished", "finished"]


async def test_fail_raises_a_fresh_exception_on_every_call() -> None:
    fake = Scripted(Fail(KeyError, "BTC"))
    errors = []
    for _ in range(2):
        with pytest.raises(KeyError) as info:
            await fake()
        errors.append(info.value)

    assert errors[0] is not errors[1]
    assert errors[0].args == errors[1].args == ("BTC",)
    assert [r.error for r in fake.records] == errors


async def test_fail_accepts_any_exception_factory() -> None:
    fake = Scripted(Fail(lambda: OSError(111, "refused")))
    with pytest.raises(ConnectionRefusedError):
        await fake()


async def test_a_call_past_the_script_fails_without_repeat_last() -> None:
    fake = Scripted(Finish(1), repeat_last=False)
    assert await fake() == 1
    with pytest.raises(AssertionError, match="called 2 times, but its script has 1 step"):
        await fake()
    assert fake.calls == 1


async def test_hang_never_returns_and_records_the_cancellation(
    autojump_clock: trio.abc.Clock,
) -> None:
    fake = Scripted(Hang())
    with trio.move_on_after(3600) as scope:
        await fake()
    assert scope.cancelled_caught
    assert trio.current_time() == 3600
    [record] = fake.records
    assert (record.status, record.ended_at, record.error) == ("cancelled", 3600, None)
    assert fake.in_flight == 0


async def _probe_beats(step: Hang, at: list[float]) -> list[float]:
    """Run ``step`` under a fake supervised run and read its last beat at times ``at``."""
    run = RunContext(child="t", clock=trio.lowlevel.current_clock(), last_beat=-1.0)
    token = current_run.set(run)
    try:
        seen = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(Scripted(step))
            for moment in at:
                await trio.sleep_until(moment)
                seen.append(run.last_beat)
            nursery.cancel_scope.cancel()
        return seen
    finally:
        current_run.reset(token)


async def test_hang_with_beat_every_heartbeats_on_a_fixed_grid(
    autojump_clock: trio.abc.Clock,
) -> None:
    assert await _probe_beats(Hang(beat_every=5), [4, 6, 11, 26]) == [-1, 5, 10, 25]


async def test_hang_without_beat_every_never_heartbeats(autojump_clock: trio.abc.Clock) -> None:
    assert await _probe_beats(Hang(), [4, 1000]) == [-1, -1]


async def test_ready_after_reports_started_then_finishes(autojump_clock: trio.abc.Clock) -> None:
    fake = Scripted(Finish("done", after=3, ready_after=1))
    async with trio.open_nursery() as nursery:
        await nursery.start(fake)
        assert trio.current_time() == 1
    assert trio.current_time() == 3
    [record] = fake.records
    assert (record.ready_at, record.ended_at, record.status) == (1, 3, "finished")


async def test_a_step_that_fails_before_ready_fails_nursery_start(
    autojump_clock: trio.abc.Clock, nursery: trio.Nursery
) -> None:
    fake = Scripted(Fail(OSError, "port in use", after=1, ready_after=2))
    with pytest.raises(OSError, match="port in use"):
        await nursery.start(fake)
    assert trio.current_time() == 1
    assert fake.records[0].ready_at is None


async def test_a_step_that_finishes_before_ready_never_starts(
    autojump_clock: trio.abc.Clock, nursery: trio.Nursery
) -> None:
    with pytest.raises(RuntimeError, match=r"without calling task_status\.started"):
        await nursery.start(Scripted(Finish(after=1, ready_after=2)))


async def test_hang_can_hang_during_startup(
    autojump_clock: trio.abc.Clock, nursery: trio.Nursery
) -> None:
    fake = Scripted(Hang(beat_every=1, ready_after=math.inf))
    with trio.move_on_after(30):
        await nursery.start(fake)
    assert trio.current_time() == 30
    assert fake.records[0].ready_at is None


async def test_records_how_many_calls_ran_at_once(autojump_clock: trio.abc.Clock) -> None:
    fake = Scripted(Finish(after=1))
    limiter = trio.CapacityLimiter(4)

    async def limited() -> None:
        async with limiter:
            await fake()

    async with trio.open_nursery() as nursery:
        for _ in range(10):
            nursery.start_soon(limited)
        await trio.testing.wait_all_tasks_blocked()
        assert fake.in_flight == 4

    assert (fake.calls, fake.in_flight, fake.max_in_flight) == (10, 0, 4)
    assert sorted(fake.started_at) == [0] * 4 + [1] * 4 + [2] * 2
    assert trio.current_time() == 3


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (lambda: Finish(after=-1), ValueError, "after must be >= 0"),
        (lambda: Finish(ready_after=math.nan), ValueError, "ready_after must not be NaN"),
        # The type: ignores below: wrong types on purpose, to test the runtime checks.
        (lambda: Fail(ValueError, after="1"), TypeError, "after must be a number"),  # type: ignore[arg-type]
        (lambda: Fail(ValueError("x")), TypeError, r"not an instance .*Fail\(ValueError"),  # type: ignore[arg-type]
        (lambda: Fail("ValueError"), TypeError, "error must be an exception class"),  # type: ignore[arg-type]
        (lambda: Hang(beat_every=0), ValueError, "beat_every must be > 0"),
        (lambda: Scripted(), ValueError, "steps must not be empty"),
        (lambda: Scripted(Finish(), 1), TypeError, "steps must be Finish, Fail or Hang"),  # type: ignore[arg-type]
    ],
)
def test_bad_arguments_fail_early_naming_the_parameter(
    make: object, error: type[Exception], match: str
) -> None:
    assert callable(make)
    with pytest.raises(error, match=match):
        make()


async def test_a_factory_that_returns_no_exception_is_a_type_error() -> None:
    fake = Scripted(Fail(lambda: "oops"))  # type: ignore[arg-type,return-value]  # on purpose
    with pytest.raises(TypeError, match="returned 'oops', not an exception"):
        await fake()


# --- thread, process and task leaks, as plain functions ---------------------------


def test_find_leaks_names_a_new_running_thread_with_its_stack() -> None:
    before = Snapshot.take()
    release = threading.Event()
    thread = threading.Thread(target=release.wait, name="leaky-worker")
    thread.start()
    try:
        leaks = find_leaks(before, grace=0)
    finally:
        release.set()
        thread.join()

    [leaked] = leaks.threads
    assert (leaked.name, leaked.ident, leaked.daemon) == ("leaky-worker", thread.ident, False)
    assert "in wait" in leaked.stack
    assert "thread 'leaky-worker'" in str(leaks)
    assert not find_leaks(before, grace=0)


def test_a_trio_worker_running_an_abandoned_job_leaks_until_it_goes_idle() -> None:
    started, release = threading.Event(), threading.Event()

    def job() -> None:
        started.set()
        release.wait()

    async def abandon_job() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(partial(trio.to_thread.run_sync, job, abandon_on_cancel=True))
            await trio.to_thread.run_sync(started.wait)
            nursery.cancel_scope.cancel()

    before = Snapshot.take()
    trio.run(abandon_job)
    try:
        leaks = find_leaks(before, grace=0)
    finally:
        release.set()
    [leaked] = leaks.threads
    assert leaked.name.startswith("job from ")
    assert "release.wait()" in leaked.stack
    # Back in trio's thread cache, waiting for its next job: not a leak.
    assert not find_leaks(before, grace=5)


def test_find_leaks_names_a_child_process_until_it_is_gone() -> None:
    before = Snapshot.take()
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        leaks = find_leaks(before, grace=0)
    finally:
        child.kill()
        child.wait()

    [leaked] = leaks.processes
    assert leaked.pid == child.pid
    assert leaked.cmdline[1:] == ("-c", "import time; time.sleep(30)")
    assert f"process pid {child.pid}" in str(leaks)
    assert not find_leaks(before, grace=0)


def test_an_exited_child_is_not_a_leak_and_is_not_reaped() -> None:
    before = Snapshot.take()
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        leaks = find_leaks(before, grace=10)  # polls until the child is a zombie
        status = psutil.Process(child.pid).status()
    finally:
        child.wait()
    assert not leaks
    assert status == psutil.STATUS_ZOMBIE
    assert child.returncode == 0


def test_multiprocessing_session_helpers_are_recognised() -> None:
    python = sys.executable
    helper = "from multiprocessing.resource_tracker import main;main(7)"
    assert _is_session_helper([python, "-B", "-c", helper])
    assert _is_session_helper([python, "-c", "from multiprocessing.forkserver import main; main()"])
    worker = "from multiprocessing.spawn import spawn_main; spawn_main(tracker_fd=5)"
    assert not _is_session_helper([python, "-c", worker, "--multiprocessing-fork"])


def test_find_leaks_rejects_a_negative_grace() -> None:
    with pytest.raises(ValueError, match="grace must be >= 0"):
        find_leaks(Snapshot.take(), grace=-1)


async def test_assert_no_task_leaks_reports_the_outermost_leaked_task(
    nursery: trio.Nursery,
) -> None:
    async def parent() -> None:
        async with trio.open_nursery() as inner:
            inner.start_soon(trio.sleep_forever, name="grandchild")
            await trio.sleep_forever()

    async def leave_parent_behind() -> None:
        with assert_no_task_leaks():
            async with trio.open_nursery() as finished:
                finished.start_soon(trio.sleep, 0)
            nursery.start_soon(parent, name="parent")
            await trio.testing.wait_all_tasks_blocked()

    with pytest.raises(AssertionError) as info:
        await leave_parent_behind()

    message = str(info.value)
    assert message.startswith("1 task(s) spawned by the block still alive:\ntask 'parent':\n")
    assert "\n  task 'grandchild':\n" in message


async def test_assert_no_task_leaks_catches_system_tasks() -> None:
    with pytest.raises(AssertionError, match="task 'leftover'"), assert_no_task_leaks():
        trio.lowlevel.spawn_system_task(trio.sleep_forever, name="leftover")


async def test_assert_no_task_leaks_passes_when_everything_ended(
    autojump_clock: trio.abc.Clock, nursery: trio.Nursery
) -> None:
    with assert_no_task_leaks():
        async with trio.open_nursery() as inner:
            inner.start_soon(trio.sleep, 1)
        await nursery.start(Scripted(Finish()))
        await trio.testing.wait_all_tasks_blocked()
    nursery.start_soon(trio.sleep_forever)  # spawned after the block: not tracked


async def test_assert_no_task_leaks_lets_the_blocks_error_through(nursery: trio.Nursery) -> None:
    async def leave_a_task_and_fail() -> None:
        with assert_no_task_leaks():
            nursery.start_soon(trio.sleep_forever)
            raise KeyError("from the block")

    with pytest.raises(KeyError):
        await leave_a_task_and_fail()


# --- the pytest plugin, run in inner sessions ------------------------------------


def _ini(pytester: pytest.Pytester, *, leak_check: bool) -> None:
    pytester.makeini(
        f"""
        [pytest]
        trio_mode = true
        engine_leak_check = {"true" if leak_check else "false"}
        engine_leak_grace = 0.2
        filterwarnings = error
        """
    )


# The leaked thread is released by a module-scoped fixture: it is torn down
# after the leak check, and before the inner session ends, so nothing leaks
# into this (outer) session, whose own leak check is on.
THREAD_LEAKS = """
    import threading
    import pytest

    RELEASE = threading.Event()
    THREADS = []

    @pytest.fixture(scope="module", autouse=True)
    def release_threads():
        yield
        RELEASE.set()
        for thread in THREADS:
            thread.join()

    def leak(name):
        thread = threading.Thread(target=RELEASE.wait, name=name, daemon=True)
        thread.start()
        THREADS.append(thread)

    def test_unchecked():
        leak("leaky-unchecked")

    @pytest.mark.usefixtures("leak_check")
    def test_checked():
        leak("leaky-checked")
"""


def test_plugin_fails_a_test_that_leaks_a_thread(pytester: pytest.Pytester) -> None:
    _ini(pytester, leak_check=True)
    pytester.makepyfile(THREAD_LEAKS)
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(passed=2, errors=2)
    result.stdout.fnmatch_lines(
        [
            "*ERROR at teardown of test_unchecked*",
            "*left behind 1 thread(s) and 0 process(es) leaked:",
            "daemon thread 'leaky-unchecked' (ident *) at:",
            "*in wait*",
        ]
    )


def test_plugin_checks_nothing_unless_enabled_or_requested(pytester: pytest.Pytester) -> None:
    _ini(pytester, leak_check=False)
    pytester.makepyfile(THREAD_LEAKS)
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(passed=2, errors=1)
    result.stdout.fnmatch_lines(["*ERROR at teardown of test_checked*", "*'leaky-checked'*"])
    result.stdout.no_fnmatch_line("*'leaky-unchecked'*")


def test_plugin_fails_a_test_that_leaks_a_child_process(pytester: pytest.Pytester) -> None:
    _ini(pytester, leak_check=True)
    pytester.makepyfile(
        """
        import subprocess
        import sys
        from pathlib import Path
        import pytest

        CHILDREN = []

        @pytest.fixture(scope="module", autouse=True)
        def kill_children():
            yield
            for child in CHILDREN:
                child.kill()
                child.wait()

        def test_leaks_a_child():
            child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
            CHILDREN.append(child)
            Path("pid").write_text(str(child.pid))

        def test_waits_for_its_child():
            subprocess.run([sys.executable, "-c", "pass"], check=True)
        """
    )
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(passed=2, errors=1)
    pid = int((pytester.path / "pid").read_text())
    result.stdout.fnmatch_lines(
        [
            "*ERROR at teardown of test_leaks_a_child*",
            "*left behind 0 thread(s) and 1 process(es) leaked:",
            f"process pid {pid} (*): * -c 'import time; time.sleep(30)'",
        ]
    )


def test_plugin_tells_idle_trio_workers_from_busy_ones(pytester: pytest.Pytester) -> None:
    # In a fresh process (runpytest_subprocess), so the worker threads are new.
    _ini(pytester, leak_check=True)
    pytester.makepyfile(
        """
        import threading
        from functools import partial
        import pytest
        import trio

        STARTED, RELEASE = threading.Event(), threading.Event()

        @pytest.fixture(scope="module", autouse=True)
        def release():
            yield
            RELEASE.set()

        def trio_workers():
            return [t for t in threading.enumerate() if t.name.startswith("Trio thread")]

        async def test_idle_worker_is_fine():
            assert not trio_workers()
            await trio.to_thread.run_sync(lambda: None)
            assert trio_workers()

        def job():
            STARTED.set()
            RELEASE.wait()

        async def test_abandoned_worker_leaks():
            async with trio.open_nursery() as nursery:
                run = partial(trio.to_thread.run_sync, job, abandon_on_cancel=True)
                nursery.start_soon(run)
                await trio.to_thread.run_sync(STARTED.wait)
                nursery.cancel_scope.cancel()
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", timeout=60)
    result.assert_outcomes(passed=2, errors=1)
    result.stdout.fnmatch_lines(
        ["*ERROR at teardown of test_abandoned_worker_leaks*", "daemon thread 'job from *"]
    )


def test_no_task_leaks_fixture_fails_a_test_that_leaves_a_task(
    pytester: pytest.Pytester,
) -> None:
    _ini(pytester, leak_check=True)
    pytester.makepyfile(
        """
        import pytest
        import trio

        @pytest.fixture
        async def service_nursery():
            async with trio.open_nursery() as nursery:
                yield nursery
                nursery.cancel_scope.cancel()

        async def test_forgets_a_task(service_nursery, no_task_leaks):
            service_nursery.start_soon(trio.sleep_forever, name="forgotten")

        async def test_waits_for_its_task(service_nursery, no_task_leaks):
            done = trio.Event()
            async def job():
                done.set()
            service_nursery.start_soon(job)
            await done.wait()

        async def test_leaves_a_task_in_pytest_trios_nursery(nursery, no_task_leaks):
            nursery.start_soon(trio.sleep_forever)
        """
    )
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(passed=2, failed=1)
    result.stdout.fnmatch_lines(
        [
            "*1 task(s) spawned by the test still alive:",
            "*task 'forgotten':",
            "FAILED *test_forgets_a_task*",
        ]
    )


def test_plugin_rejects_a_bad_grace(pytester: pytest.Pytester) -> None:
    pytester.makeini("[pytest]\nengine_leak_grace = soon\n")
    result = pytester.runpytest("-p", "no:cacheprovider")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*engine_leak_grace must be seconds >= 0, got 'soon'*"])


def test_importing_the_package_does_not_import_pytest() -> None:
    code = "import sys, engine.testing; print('pytest' in sys.modules)"
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout == "False\n"


def test_docs_example_passes() -> None:
    example = ROOT / "docs" / "examples" / "testing_example.py"
    done = subprocess.run(
        [sys.executable, "-m", "pytest", str(example), "-q", "-p", "no:cacheprovider"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "3 passed" in done.stdout
