"""Thread and process bridges: cancellation, abandonment, crashes, pickling, virtual time."""

from __future__ import annotations

import functools
import os
import threading
import time
from collections.abc import Iterator
from contextlib import AbstractAsyncContextManager
from typing import Any

import psutil
import pytest
import trio
import trio.testing

import engine
from tests.batch_jobs.jobs import behave, pid, square

# -- to_thread ---------------------------------------------------------------------


async def test_to_thread_returns_and_raises() -> None:
    assert await engine.to_thread(sum, [1, 2, 3]) == 6
    with pytest.raises(ZeroDivisionError):
        await engine.to_thread(divmod, 1, 0)


async def test_cancelled_thread_is_abandoned_and_counted() -> None:
    release = threading.Event()
    finished = threading.Event()

    def hung() -> None:
        release.wait(30)
        finished.set()

    with trio.fail_after(5):  # a real-time guard: the cancel must not wait for the thread
        with trio.move_on_after(0.05) as scope:
            await engine.to_thread(hung)
    assert scope.cancelled_caught
    stats = engine.bridge_statistics()
    assert (stats.thread_calls, stats.threads_abandoned, stats.threads_abandoned_running) == (
        1,
        1,
        1,
    )
    release.set()
    await trio.to_thread.run_sync(finished.wait, 5)
    await trio.to_thread.run_sync(lambda: time.sleep(0.01))  # let the thread return
    assert engine.bridge_statistics().threads_abandoned_running == 0


async def test_a_call_cancelled_before_its_thread_starts_abandons_nothing() -> None:
    limiter = trio.CapacityLimiter(1)
    release = threading.Event()
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(functools.partial(engine.to_thread, release.wait, limiter=limiter))
            await trio.testing.wait_all_tasks_blocked()
            with trio.CancelScope() as scope:
                scope.cancel()  # cancelled while it waits for the limiter: no thread begins
                await engine.to_thread(release.wait, limiter=limiter)
            release.set()
    stats = engine.bridge_statistics()
    assert (stats.thread_calls, stats.threads_abandoned, stats.threads_abandoned_running) == (
        2,
        0,
        0,
    )


async def test_to_thread_without_abandon_waits_for_the_thread() -> None:
    def short() -> str:
        time.sleep(0.1)
        return "done"

    started = time.perf_counter()
    with trio.move_on_after(0.01):
        result = await engine.to_thread(short, abandon_on_cancel=False)
    assert result == "done"  # the cancel was not honoured until the thread returned
    assert time.perf_counter() - started >= 0.1
    assert engine.bridge_statistics().threads_abandoned == 0


async def test_a_real_thread_call_does_not_let_the_virtual_clock_jump(
    autojump_clock: trio.abc.Clock,
) -> None:
    # trio's own bridge: the clock jumps to the deadline while the thread sleeps.
    with trio.move_on_after(60):
        await trio.to_thread.run_sync(time.sleep, 0.3)
    assert trio.current_time() == 60
    start = trio.current_time()
    with trio.fail_after(60):
        await engine.to_thread(time.sleep, 0.3)
    assert trio.current_time() == start  # virtual time stood still; no TooSlowError


# -- to_process and pools -------------------------------------------------------------


async def test_pool_runs_calls_and_closes_its_workers(pool: engine.ProcessPool) -> None:
    assert await pool.run(square, 7) == 49
    pids = {await pool.run(pid) for _ in range(6)}
    assert len(pids) <= 2
    assert os.getpid() not in pids
    assert pool.statistics().workers == 2


@pytest.mark.parametrize("how", ["sleep", "spin"])
async def test_cancelling_a_hung_process_kills_only_its_worker(
    pool: engine.ProcessPool, how: str
) -> None:
    before = {p.pid for p in psutil.Process().children()}
    started = trio.current_time()
    with trio.move_on_after(0.3) as scope:
        await pool.run(behave, (how, 0))
    assert scope.cancelled_caught
    assert trio.current_time() - started < 1.0  # killed at the deadline, not at the end
    after = {p.pid for p in psutil.Process().children() if p.status() != psutil.STATUS_ZOMBIE}
    assert len(before - after) == 1  # the hung worker is gone, the other untouched
    assert engine.bridge_statistics().workers_killed == 1
    assert await pool.run(square, 3) == 9  # and the pool carries on


@pytest.mark.parametrize(
    ("how", "message", "exit_code", "signal"),
    [
        ("kill", "killed by SIGKILL", None, 9),
        ("exit", "exited with status 3", 3, None),
        ("segfault", "killed by SIGSEGV", None, 11),
    ],
)
async def test_a_dead_worker_is_a_typed_error(
    pool: engine.ProcessPool, how: str, message: str, exit_code: int | None, signal: int | None
) -> None:
    with pytest.raises(engine.WorkerCrashed, match=message) as info:
        await pool.run(behave, (how, 0))
    assert (info.value.exit_code, info.value.signal) == (exit_code, signal)
    assert "tests.batch_jobs.jobs.behave" in str(info.value)
    assert engine.bridge_statistics().workers_crashed == 1
    assert await pool.run(square, 4) == 16


async def test_unpicklable_argument_and_result_are_named(pool: engine.ProcessPool) -> None:
    with pytest.raises(engine.SerializationError, match="argument 0 of") as info:
        await pool.run(square, threading.Lock())  # type: ignore[arg-type]  # deliberately
    assert info.value.direction == "argument"
    with pytest.raises(engine.SerializationError, match="the function") as info:
        await pool.run(lambda: 1)
    with pytest.raises(engine.SerializationError, match="cannot pickle the result") as info:
        await pool.run(behave, ("unpicklable_result", 0))
    assert info.value.direction == "result"


async def test_errors_raised_in_the_worker_come_back() -> None:
    async with engine.open_process_pool(1) as pool:
        with pytest.raises(ValueError, match="bad item 5"):
            await pool.run(behave, ("raise", 5))


async def test_retire_after_replaces_workers() -> None:
    async with engine.open_process_pool(1, retire_after=2) as pool:
        pids = [await pool.run(pid) for _ in range(4)]
    assert pids[0] == pids[1]
    assert pids[1] != pids[2]
    assert pids[2] == pids[3]


async def test_to_process_uses_a_pool_that_ends_with_the_run() -> None:
    assert await engine.to_process(square, 5) == 25


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"workers": 0}, "workers must be >= 1"),
        ({"retire_after": 0}, "retire_after must be >= 1"),
        ({"start_method": "teleport"}, "start_method must be one of"),
        ({"idle_timeout": -1}, "idle_timeout must be > 0"),
    ],
)
def test_open_process_pool_rejects_bad_arguments(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        engine.open_process_pool(**kwargs)  # type: ignore[arg-type]  # deliberately wrong


# -- iterate_in_thread ---------------------------------------------------------------


async def test_iterate_a_blocking_iterator_in_batches() -> None:
    def slow_source() -> Iterator[int]:
        for i in range(100):
            if i % 25 == 0:
                time.sleep(0.01)  # blocking, like pubsub.listen()
            yield i

    got: list[int] = []
    with trio.fail_after(10):
        async with engine.iterate_in_thread(slow_source, max_batch=10) as items:
            while True:
                try:
                    batch = await items.receive_batch()
                except trio.EndOfChannel:
                    break
                assert 1 <= len(batch) <= 10
                got.extend(batch)
    assert got == list(range(100))


async def test_poll_source_stops_within_the_poll_interval_and_closes_in_its_thread() -> None:
    closed_in: list[str] = []
    calls: list[float] = []

    def get_message(timeout: float) -> dict[str, int] | None:
        calls.append(timeout)
        time.sleep(timeout)  # nothing arrives
        return None

    def close() -> None:
        closed_in.append(threading.current_thread().name)

    with trio.fail_after(5):
        started = time.perf_counter()
        with trio.move_on_after(0.2):
            async with engine.iterate_in_thread(
                poll=get_message, poll_interval=0.05, close=close
            ) as messages:
                async for _ in messages:
                    pass
        stopped_after = time.perf_counter() - started
    assert stopped_after < 0.2 + 0.05 + 0.2  # cancelled at 0.2 s, stopped within one poll
    assert closed_in == ["engine iterator"]
    assert set(calls) == {0.05}


async def test_poll_source_delivers_items_and_errors_end_iteration() -> None:
    queue = list(range(5))

    def get_message(timeout: float) -> int | None:
        if queue:
            return queue.pop(0)
        raise ConnectionError("redis went away")

    got: list[int] = []

    async def consume() -> None:
        async with engine.iterate_in_thread(poll=get_message) as messages:
            async for message in messages:
                got.append(message)

    with trio.fail_after(5), pytest.raises(ConnectionError, match="redis went away"):
        await consume()
    assert got == [0, 1, 2, 3, 4]


async def test_a_slow_consumer_applies_backpressure_to_the_thread() -> None:
    produced: list[int] = []

    def source() -> Iterator[int]:
        for i in range(50):
            produced.append(i)
            yield i

    with trio.fail_after(5):
        async with engine.iterate_in_thread(source, buffer=5, max_batch=5) as items:
            first = await items.receive_batch()
            await trio.to_thread.run_sync(time.sleep, 0.1)  # the thread runs ahead meanwhile
            assert len(produced) <= len(first) + 5 + 1  # bounded by the buffer
            rest = [i async for i in items]
    assert first + rest == list(range(50))


async def test_iterate_in_thread_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="exactly one of source"):
        engine.iterate_in_thread()
    with pytest.raises(ValueError, match="exactly one of source"):
        engine.iterate_in_thread([1], poll=lambda t: None)
    with pytest.raises(ValueError, match="poll_interval must be > 0"):
        engine.iterate_in_thread(poll=lambda t: None, poll_interval=0)
    with pytest.raises(ValueError, match="max_batch must be >= 1"):
        engine.iterate_in_thread([1], max_batch=0)
    with pytest.raises(TypeError, match="poll must be a get"):
        engine.iterate_in_thread(poll=5)  # type: ignore[arg-type]  # deliberately wrong
    with pytest.raises(TypeError, match="close must be callable"):
        engine.iterate_in_thread([1], close=5)  # type: ignore[arg-type]  # deliberately wrong
    with pytest.raises(TypeError, match="source must be an iterable or a zero-argument callable"):
        engine.iterate_in_thread(5)  # type: ignore[arg-type]  # deliberately wrong


async def test_a_get_timeout_function_passed_as_source_is_told_to_use_poll() -> None:
    def get_message(timeout: float) -> int | None:
        return None

    with pytest.raises(TypeError, match=r"requires timeout: .* belongs in poll="):
        engine.iterate_in_thread(get_message)  # type: ignore[arg-type]  # the mistake


async def test_a_source_factory_returning_a_non_iterable_is_told_to_use_poll() -> None:
    def get() -> Any:  # a get() with no timeout: called with no arguments, it returns an item
        return 7

    async def consume() -> None:
        async with engine.iterate_in_thread(get) as items:
            async for _ in items:
                pass

    with trio.fail_after(5), pytest.raises(TypeError, match=r"returned 7, .* belongs in poll="):
        await consume()


async def test_stopping_the_thread_does_not_let_the_virtual_clock_jump(
    autojump_clock: trio.abc.Clock,
) -> None:
    def get(timeout: float) -> int | None:
        time.sleep(0.2)  # the block ends while the thread is in here
        return None

    with trio.move_on_after(60):
        async with engine.iterate_in_thread(poll=get):
            pass
    assert trio.current_time() == 0


class _Gate:
    """A blocking source: each poll, or each next(), waits until the test lets it through."""

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._entered = 0  # calls that reached the gate
        self._passes = 0  # calls let through but not yet taken
        self._open = False

    def poll(self, timeout: float) -> int | None:
        self._wait()
        return None  # a quiet channel: nothing arrived

    def items(self) -> Iterator[int]:
        for item in range(1_000_000):
            self._wait()
            yield item

    def _wait(self) -> None:  # in the bridge's thread
        with self._condition:
            self._entered += 1
            self._condition.notify_all()
            self._condition.wait_for(lambda: self._open or self._passes > 0)
            if not self._open:
                self._passes -= 1

    async def entered(self, count: int) -> None:
        """Wait until ``count`` calls have reached the gate; virtual time stands still meanwhile."""

        def wait() -> None:
            with self._condition:
                if not self._condition.wait_for(lambda: self._entered >= count, timeout=10):
                    raise AssertionError(
                        f"the source was called {self._entered} times, not {count}"
                    )

        await engine.to_thread(wait)

    async def let_through(self) -> None:
        """Let the waiting call return, and wait until the source is called again."""
        with self._condition:
            self._passes += 1
            count = self._entered + 1
            self._condition.notify_all()
        await self.entered(count)

    def open(self) -> None:
        with self._condition:
            self._open = True
            self._condition.notify_all()


def _drained(gate: _Gate, kind: str) -> AbstractAsyncContextManager[engine.ThreadIterator[int]]:
    if kind == "poll":
        return engine.iterate_in_thread(poll=gate.poll)
    return engine.iterate_in_thread(gate.items)


@pytest.mark.parametrize("kind", ["poll", "source"])
async def test_a_quiet_source_keeps_stall_after_fed(
    autojump_clock: trio.abc.Clock, kind: str
) -> None:
    gate = _Gate()
    received: list[int] = []

    async def listener() -> None:
        async with _drained(gate, kind) as items:
            async for item in items:
                received.append(item)

    async with engine.open_supervisor() as sup:
        sup.start_soon(listener, name="listener", stall_after=5)
        await gate.entered(1)
        for _ in range(10):  # a poll or an item every 4 s: 40 s, eight times stall_after
            await trio.sleep(4)
            await gate.let_through()
        await trio.testing.wait_all_tasks_blocked()  # the listener has taken what arrived
        (child,) = sup.statistics().children
        got = list(received)
        gate.open()
        sup.cancel()
    assert trio.current_time() == 40
    assert (child.stalls, child.heartbeat_age) == (0, 0)
    assert got == ([] if kind == "poll" else list(range(10)))


@pytest.mark.parametrize("kind", ["poll", "source"])
async def test_a_wedged_source_stalls_its_child(autojump_clock: trio.abc.Clock, kind: str) -> None:
    gate = _Gate()
    cancelled_at: list[float] = []

    async def listener() -> None:
        async with _drained(gate, kind) as items:
            try:
                async for _ in items:
                    pass
            finally:
                cancelled_at.append(trio.current_time())
                gate.open()  # so that the block's end finds the thread free to stop

    async with engine.open_supervisor() as sup:
        sup.start_soon(listener, name="listener", restart="temporary", stall_after=5)
        await gate.entered(1)
        await trio.sleep(2)
        await gate.let_through()  # one answer at 2 s, then the source hangs
        await trio.sleep(10)
        (child,) = sup.statistics().children
        sup.cancel()
    assert cancelled_at == [7]  # the last beat at 2, plus stall_after
    assert child.stalls == 1
    assert engine.bridge_statistics().iterator_threads_abandoned == 0


@pytest.mark.parametrize("cancelled", [False, True])
async def test_workers_killed_by_a_stop_signal_do_not_fail_the_pools_close(
    cancelled: bool, caplog: pytest.LogCaptureFixture
) -> None:
    # Ctrl-C or a SIGTERM to the process group reaches the workers too; the
    # pool's close then finds them dead. That is no error of the block's.
    with trio.move_on_after(30) as guard:
        async with engine.open_process_pool(2) as pool:
            await pool.warm()
            workers = _spawned_workers()
            assert len(workers) == 2
            for worker in workers:
                worker.terminate()
            psutil.wait_procs(workers, timeout=10)
            if cancelled:
                guard.cancel()
                await trio.sleep_forever()
    assert guard.cancelled_caught == cancelled
    assert "process pool closed with dead workers" in caplog.text
    assert _spawned_workers() == []


def _spawned_workers() -> list[psutil.Process]:
    found = []
    for child in psutil.Process().children():
        try:
            if "spawn_main" in " ".join(child.cmdline()) and child.is_running():
                found.append(child)
        except psutil.NoSuchProcess:
            pass
    return [p for p in found if p.status() != psutil.STATUS_ZOMBIE]


async def test_a_broken_worker_error_from_the_block_itself_still_propagates() -> None:
    with pytest.raises(engine.WorkerCrashed):
        async with engine.open_process_pool(1) as pool:
            await pool.run(behave, ("kill", 0))
