"""map_batch: one true outcome per item, whatever goes wrong, on every bridge."""

from __future__ import annotations

import glob
import json
import math
import os
import pickle
import tempfile
import threading
import time
from collections import Counter
from typing import Any, Literal

import attrs
import psutil
import pytest
import trio
import trio.testing
from hypothesis import example, given, settings
from hypothesis import strategies as st

import engine
import engine.testing
from tests.batch_jobs import jobs
from tests.batch_jobs.jobs import (
    FailsToUnpickle,
    behave,
    fragile,
    indicators,
    kind,
    nap,
    parse_order_line,
    slow_fragile,
    square,
)


def live_children() -> set[int]:
    """Live worker processes (not multiprocessing's resource tracker, not zombies)."""
    found = set()
    for child in psutil.Process().children():
        try:
            if child.status() != psutil.STATUS_ZOMBIE and "spawn_main" in " ".join(child.cmdline()):
                found.add(child.pid)
        except psutil.NoSuchProcess:
            pass
    return found


async def test_every_fault_gets_its_own_true_outcome(pool: engine.ProcessPool) -> None:
    items: list[Any] = [("ok", i) for i in range(40)]
    faults = {
        5: ("raise", 5),
        12: ("sleep", 12),
        19: ("spin", 19),
        23: ("kill", 23),
        30: ("exit", 30),
        34: ("unpicklable_result", 34),
    }
    for index, fault in faults.items():
        items[index] = fault
    items.append(threading.Lock())  # an argument that cannot travel to a process

    with trio.fail_after(30):
        outcomes = await engine.run_batch(behave, items, pool=pool, item_deadline=1.5, chunk_size=8)

    assert len(outcomes) == len(items)
    assert [o.index for o in outcomes] == list(range(len(items)))
    statuses = {o.index: o.status for o in outcomes if o.status != engine.Status.OK}
    assert statuses == {
        5: "error",
        12: "timeout",
        19: "timeout",
        23: "crashed",
        30: "crashed",
        34: "error",
        40: "error",
    }
    for outcome in outcomes:
        if outcome.ok:
            assert outcome.value == outcome.item[1] ** 2
    assert isinstance(outcomes[5].error, ValueError)
    assert isinstance(outcomes[12].error, trio.TooSlowError)
    assert isinstance(outcomes[23].error, engine.WorkerCrashed)
    assert outcomes[23].error.signal == 9
    assert isinstance(outcomes[30].error, engine.WorkerCrashed)
    assert outcomes[30].error.exit_code == 3
    assert isinstance(outcomes[34].error, engine.SerializationError)
    assert outcomes[34].error.direction == "result"
    assert isinstance(outcomes[40].error, engine.SerializationError)
    assert outcomes[40].error.direction == "argument"
    # A raising item is caught in the worker: its chunk-mates never re-ran.
    assert outcomes[4].attempts == 1
    # A hung or crashing item's chunk-mates got their real results: those
    # before it ran again (their results died with the worker), those after
    # it had never started.
    assert (outcomes[11].attempts, outcomes[11].ok) == (2, True)
    assert (outcomes[13].attempts, outcomes[13].ok) == (1, True)


async def test_a_hung_item_is_reported_within_twice_its_deadline(pool: engine.ProcessPool) -> None:
    deadline = 1.5
    items = [("ok", i) for i in range(30)]
    items[17] = ("sleep", 17)
    seen: dict[int, float] = {}
    started = trio.current_time()
    with trio.fail_after(20):
        async with engine.map_batch(
            behave, items, pool=pool, item_deadline=deadline, chunk_size=30
        ) as batch:
            async for outcome in batch:
                seen[outcome.index] = trio.current_time() - started
    outcome = batch.results()[17]
    assert outcome.status == engine.Status.TIMEOUT
    # Dispatched at once (a warm pool); reported no later than twice its deadline.
    assert seen[17] <= 2 * deadline
    assert outcome.ran == deadline
    assert all(o.ok for o in batch.results() if o.index != 17)


async def test_cancelling_a_batch_midway_leaves_one_outcome_each_and_no_worker() -> None:
    items = [("ok", i) for i in range(6)] + [("sleep", i) for i in range(6, 10)]
    async with engine.open_process_pool(2) as pool:
        await pool.warm()
        workers = live_children()
        with trio.move_on_after(1.0):
            async with engine.map_batch(behave, items, pool=pool, chunk_size=1) as batch:
                pass
        outcomes = batch.results()
        assert len(outcomes) == len(items)
        counts = Counter(o.status for o in outcomes)
        assert counts == {"ok": 6, "cancelled": 4}
        # The two workers stuck in sleep(3600) were killed; new ones are not running jobs.
        assert not (workers & live_children())
        assert engine.bridge_statistics().workers_killed == 2
        assert batch.statistics().in_flight == 0
    assert not live_children()


async def test_an_order_log_on_4_workers_never_has_more_calls_than_workers_and_completes() -> None:
    # 25,352 order-log lines, one malformed, on 4 workers.
    lines = [json.dumps({"oid": i, "px": 100 + i % 50, "status": "filled"}) for i in range(25_352)]
    lines[100] = "{truncated"
    most_in_flight = 0
    batch_box: list[engine.Batch[str, Any]] = []

    def progress(done: int, total: int) -> None:
        nonlocal most_in_flight
        most_in_flight = max(most_in_flight, batch_box[0].statistics().in_flight)

    with trio.fail_after(60):
        async with (
            engine.open_process_pool(4) as pool,
            engine.map_batch(
                parse_order_line, lines, workers=4, pool=pool, on_progress=progress
            ) as batch,
        ):
            batch_box.append(batch)
    outcomes = batch.results()
    assert len(outcomes) == 25_352
    assert all(o.ok for o in outcomes)
    assert sum(1 for o in outcomes if o.value is None) == 1  # the malformed line, counted
    assert 1 <= most_in_flight <= 4
    # Chunked: far fewer calls than lines.
    assert batch.statistics().calls < 25_352 / 20


# -- a scan of symbols: an acceptance table, row by row --------------------------------------


async def test_scan_2500_symbols_complete_well_within_30_seconds() -> None:
    started = time.perf_counter()
    async with engine.open_process_pool(2) as pool:
        outcomes = await engine.run_batch(indicators, range(2_500), pool=pool, item_deadline=60)
    assert time.perf_counter() - started < 30
    assert [o.status for o in outcomes] == [engine.Status.OK] * 2_500
    assert set(outcomes[0].value) == {"close", "macd", "signal", "rsi14"}  # type: ignore[arg-type]


async def test_scan_a_60s_timeout_is_recorded_and_the_batch_continues(
    autojump_clock: trio.abc.Clock,
) -> None:
    async def fetch(symbol: str) -> str:
        await trio.sleep(3600 if symbol == "HUNG" else 1)
        return symbol.lower()

    symbols = ["AAA", "HUNG", "BBB", "CCC"]
    outcomes = await engine.run_batch(fetch, symbols, bridge="async", workers=2, item_deadline=60)
    assert [o.status for o in outcomes] == ["ok", "timeout", "ok", "ok"]
    assert str(outcomes[1].error) == "item deadline of 60 s expired"
    assert outcomes[1].ran == 60
    # Worker 1: AAA (1 s) then BBB, CCC (1 s each); worker 2: HUNG, cut at exactly 60 s.
    assert trio.current_time() == 60
    assert outcomes[3].queued == 2  # its deadline started when a worker took it, at t=2


@pytest.mark.parametrize("progress", [False, True], ids=["recorded-at-once", "with-progress"])
async def test_scan_an_exception_is_recorded_and_the_batch_continues(
    pool: engine.ProcessPool, progress: bool
) -> None:
    # Outcomes are recorded a call at a time, or one by one for a progress callback.
    seen: list[tuple[int, int]] = []
    on_progress = (lambda *a: seen.append(a)) if progress else None
    items = [("ok", 1), ("raise", 2), ("ok", 3)]
    async with engine.map_batch(behave, items, pool=pool, on_progress=on_progress) as batch:
        streamed = {o.index: o async for o in batch}
    outcomes = batch.results()
    assert [o.status for o in outcomes] == ["ok", "error", "ok"]
    assert [streamed[i] for i in range(3)] == outcomes  # the same outcomes, streamed once each
    assert (batch.statistics().ok, batch.statistics().error) == (2, 1)
    assert seen == ([(1, 3), (2, 3), (3, 3)] if progress else [])
    assert str(outcomes[1].error) == "bad item 2"
    with pytest.raises(ValueError, match="bad item 2"):
        outcomes[1].unwrap()


async def test_scan_the_pool_lives_exactly_as_long_as_its_block() -> None:
    before = live_children()
    async with engine.open_process_pool(2) as pool:
        await pool.warm()
        assert len(live_children() - before) == 2
        await engine.run_batch(square, range(10), pool=pool)
    assert live_children() == before


async def test_scan_progress_fires_once_per_completed_symbol(
    pool: engine.ProcessPool,
) -> None:
    calls: list[tuple[int, int]] = []
    await engine.run_batch(square, range(50), pool=pool, on_progress=lambda *a: calls.append(a))
    assert calls == [(i, 50) for i in range(1, 51)]


async def test_scan_worker_count_is_configurable_and_defaults_to_cpus(
    autojump_clock: trio.abc.Clock,
) -> None:
    running = 0
    most = 0

    async def job(item: int) -> int:
        nonlocal running, most
        running += 1
        most = max(most, running)
        await trio.sleep(1)
        running -= 1
        return item

    await engine.run_batch(job, range(9), bridge="async", workers=3)
    assert most == 3
    assert trio.current_time() == 3  # nine one-second items, three at a time


async def test_the_default_pool_size_is_the_cpu_count() -> None:
    async with engine.open_process_pool() as default_pool:
        assert default_pool.workers == (os.cpu_count() or 1)


# -- the thread bridge ---------------------------------------------------------------------


async def test_thread_bridge_cuts_a_hung_item_and_keeps_its_chunk_mates() -> None:
    release = threading.Event()

    def work(item: int) -> int:
        if item == 3:
            release.wait(30)  # hung
        return item * 10

    try:
        with trio.fail_after(10):
            outcomes = await engine.run_batch(
                work, range(8), bridge="thread", workers=1, chunk_size=8, item_deadline=0.3
            )
    finally:
        release.set()
    assert [o.status for o in outcomes] == ["ok"] * 3 + ["timeout"] + ["ok"] * 4
    assert [o.value for o in outcomes if o.ok] == [0, 10, 20, 40, 50, 60, 70]
    # Exactly the hung item timed out; nothing else ran twice.
    assert all(o.attempts == 1 for o in outcomes)
    assert engine.bridge_statistics().threads_abandoned == 1


async def test_a_process_call_ends_by_the_workers_clock_and_the_rest_run_later(
    pool: engine.ProcessPool,
) -> None:
    async with engine.map_batch(nap, [0.05] * 12, pool=pool, workers=1) as batch:
        pass
    outcomes = batch.results()
    # The first call carries all twelve, but its worker starts none after
    # 200 ms: the rest come back unstarted and go in later calls.
    assert [o.value for o in outcomes] == [0.05] * 12
    assert all(o.attempts == 1 for o in outcomes)
    assert batch.statistics().calls >= 3
    assert outcomes[0].queued < 0.05 < outcomes[-1].queued


async def test_a_thread_call_ends_by_its_clock_and_the_rest_run_later() -> None:
    async with engine.map_batch(nap, [0.05] * 8, bridge="thread", workers=1) as batch:
        pass
    outcomes = batch.results()
    assert [o.value for o in outcomes] == [0.05] * 8
    assert all(o.attempts == 1 for o in outcomes)
    assert batch.statistics().calls >= 2


@pytest.mark.parametrize("bridge", ["process", "thread"])
async def test_a_worker_out_of_work_takes_part_of_the_slower_call_mid_call(
    pool: engine.ProcessPool, bridge: Literal["process", "thread"]
) -> None:
    # Each worker is sent half: the first gets 15 items of 10 ms, the second
    # 15 of 1 ms. When the second is done, the first has most of its items
    # still to start: the second takes the last of them, while the first
    # goes on with the others.
    work = [0.01] * 15 + [0.001] * 15
    async with engine.map_batch(nap, work, bridge=bridge, pool=pool, workers=2) as batch:
        pass
    outcomes = batch.results()
    assert [o.value for o in outcomes] == work
    assert all(o.attempts == 1 for o in outcomes)
    assert batch.statistics().calls >= 3
    # The last slow item went out again, in a later call, never started in the first.
    assert outcomes[14].queued > 0.005


def test_the_board_carries_progress_out_and_a_cut_in() -> None:
    board = engine._board.Board(2)
    no_limit = engine._board.NO_LIMIT
    try:
        slot = board.take()
        worker_side = engine._board.Slot(board.path, slot)
        assert (board.started(slot), worker_side.limit()) == (0, no_limit)
        worker_side.report(3)
        board.cut(slot, 7)
        assert (board.started(slot), worker_side.limit()) == (3, 7)
        board.give_back(slot)
        # A slot taken again starts clear.
        again = board.take()
        assert again == slot
        assert (board.started(again), worker_side.limit()) == (0, no_limit)
    finally:
        board.close()
    assert not os.path.exists(board.path)


async def test_without_a_board_calls_run_unwatched(
    pool: engine.ProcessPool, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def no_room(slots: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(engine._processes, "Board", no_room)
    async with engine.open_process_pool(2) as fresh:
        for _ in range(2):  # said once; every batch runs all the same
            outcomes = await engine.run_batch(square, range(50), pool=fresh)
            assert [o.value for o in outcomes] == [i * i for i in range(50)]
    assert caplog.text.count("no progress board for this process pool") == 1
    # A worker that cannot open the board runs its items all the same.
    ran, errors, blob = engine._batch_runners.run_chunk_in_worker(
        square, [2, 3], board=("/nonexistent/engine-board", 0)
    )
    assert (len(ran), errors) == (2, {})
    assert pickle.loads(blob) == [4, 9]


def board_files() -> set[str]:
    directory = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
    return set(glob.glob(os.path.join(directory, "engine-board-*")))


async def test_a_pool_keeps_one_board_for_all_its_batches_and_leaves_none_behind() -> None:
    before = board_files()
    async with engine.open_process_pool(2) as pool:
        async with engine.map_batch(square, range(100), pool=pool) as batch:
            pass
        assert batch.statistics().calls >= 1
        made = board_files() - before
        assert len(made) == 1
        async with engine.map_batch(nap, [0.05] * 40, pool=pool) as cancelled:
            async for _ in cancelled:
                cancelled.cancel()
        assert cancelled.statistics().cancelled > 0
        # The cancelled calls gave their slots back: both workers' calls find one.
        outcomes = await engine.run_batch(nap, [0.01] * 4, pool=pool, chunk_size=1)
        assert all(o.ok for o in outcomes)
        assert board_files() - before == made
    assert board_files() == before


async def test_a_call_carries_at_most_8_mib_of_items(pool: engine.ProcessPool) -> None:
    blobs = [bytes([i]) * (1 << 20) for i in range(20)]  # distinct: pickle would share one
    async with engine.map_batch(len, blobs, pool=pool, workers=1) as batch:
        pass
    assert [o.value for o in batch.results()] == [1 << 20] * 20
    assert batch.statistics().calls >= 3


async def test_small_items_are_chunked_to_amortise_dispatch(pool: engine.ProcessPool) -> None:
    async with engine.map_batch(square, range(2_000), pool=pool) as batch:
        pass
    assert [o.value for o in batch.results()] == [i * i for i in range(2_000)]
    assert batch.statistics().calls < 100


async def test_a_result_that_cannot_be_loaded_here_fails_only_its_own_item(
    pool: engine.ProcessPool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(jobs, "REFUSE_TO_LOAD", True)
    outcomes = await engine.run_batch(fragile, range(6), pool=pool, chunk_size=6)
    # The chunk's results travel together, so the chunk is re-run item by item
    # and only item 3 ends with the error.
    assert [o.status for o in outcomes] == ["ok", "ok", "ok", "error", "ok", "ok"]
    assert [o.value for o in outcomes if o.ok] == [0, 1, 4, 16, 25]
    error = outcomes[3].error
    assert isinstance(error, engine.SerializationError)
    assert error.direction == "result"
    assert "cannot be rebuilt in the parent" in str(error)
    assert all(o.attempts == 2 for o in outcomes)


async def test_an_argument_that_cannot_be_unpickled_in_the_worker_fails_only_its_item(
    pool: engine.ProcessPool,
) -> None:
    items: list[object] = [1, "a", FailsToUnpickle(), 2.5]
    outcomes = await engine.run_batch(kind, items, pool=pool, chunk_size=4)
    # The chunk travels as one pickle: the worker cannot say which item broke
    # it, so each runs again alone and only the culprit ends with the error.
    assert [o.status for o in outcomes] == ["ok", "ok", "error", "ok"]
    assert [o.value for o in outcomes if o.ok] == ["int", "str", "float"]
    error = outcomes[2].error
    assert isinstance(error, engine.SerializationError)
    assert error.direction == "argument"
    assert "cannot be rebuilt in a worker" in str(error)
    # The chunk's call ran none of them: each ran once, alone.
    assert all(o.attempts == 1 for o in outcomes)


class RunsButSaysNotHow:
    """A bridge object with a ``run`` but no ``chunked``."""

    async def run(self, *args: object) -> None:
        raise AssertionError("never called")


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"workers": 0}, ValueError, "workers must be >= 1"),
        ({"item_deadline": 0}, ValueError, "item_deadline must be > 0"),
        ({"chunk_size": 0}, ValueError, "chunk_size must be >= 1"),
        ({"bridge": "carrier-pigeon"}, ValueError, "bridge must be one of"),
        ({"bridge": object()}, TypeError, "BatchRunner, got .*, which has no chunked and no run"),
        ({"bridge": RunsButSaysNotHow()}, TypeError, "which has no chunked$"),
        ({"on_progress": 5}, TypeError, "on_progress must be callable"),
        ({"at_most_once": 1}, TypeError, "at_most_once must be a bool"),
    ],
)
def test_map_batch_rejects_bad_arguments_at_call_time(
    kwargs: dict[str, Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        engine.map_batch(square, [1], **kwargs)


@attrs.define
class InlineRunner:
    """A runner of its own, as an outside library would write one: items run inline, in order."""

    chunked: bool = True
    calls: list[list[int]] = attrs.Factory(list)

    async def run(
        self,
        fn: Any,
        chunk: list[tuple[int, Any]],
        deadline: float,
        stop_after: float,
        call: engine._runner.Call,
    ) -> engine._runner.ChunkReport:
        self.calls.append([index for index, _ in chunk])
        report = engine._runner.ChunkReport()
        for index, item in chunk:
            await trio.sleep(1)  # each item takes a second of trio time
            try:
                value = fn(item)
            except Exception as exc:
                report.finished.append(engine._runner.Finished(index, False, None, exc, 1.0))
            else:
                report.finished.append(engine._runner.Finished(index, True, value, None, 1.0))
        return report


async def test_a_runner_of_ones_own_needs_only_what_the_protocol_says(
    autojump_clock: trio.abc.Clock,
) -> None:
    runner = InlineRunner()
    outcomes = await engine.run_batch(
        behave, [("ok", n) if n != 3 else ("raise", n) for n in range(8)], bridge=runner, workers=2
    )
    assert [o.status for o in outcomes] == ["ok"] * 3 + ["error"] + ["ok"] * 4
    assert [o.value for o in outcomes if o.ok] == [n * n for n in range(8) if n != 3]
    # Chunked: an even share each, both at once.
    assert runner.calls == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert trio.current_time() == 4
    runner = InlineRunner(chunked=False)
    async with engine.map_batch(square, range(4), bridge=runner, workers=2):  # typed: a BatchRunner
        pass
    assert runner.calls == [[0], [1], [2], [3]]


def test_a_process_batch_of_a_lambda_fails_at_call_time() -> None:
    with pytest.raises(engine.SerializationError, match="the function"):
        engine.map_batch(lambda x: x, [1])


# -- virtual time: the chunk logic with declared durations -----------------------------------


async def test_virtual_bridge_splits_a_hung_chunk_within_twice_the_deadline(
    autojump_clock: trio.abc.Clock,
) -> None:
    bridge = engine.testing.VirtualBridge(duration=lambda item: math.inf if item == 3 else 1.0)
    reported: dict[int, float] = {}
    async with engine.map_batch(
        square, range(10), bridge=bridge, workers=1, chunk_size=10, item_deadline=60
    ) as batch:
        async for outcome in batch:
            reported[outcome.index] = trio.current_time()
    outcomes = batch.results()
    # The chunk is cut at 30 s (half the deadline), four items in: item 3 was
    # running, so it runs again alone, first, and is cut at 30 + 60 = 90 s,
    # within 2 x 60 of its dispatch. Items 0-2 ran, but their results died
    # with the worker: they run again, with 4-9, which never started.
    assert reported[3] == 90
    assert outcomes[3].status == engine.Status.TIMEOUT
    assert [o.value for o in outcomes if o.ok] == [i * i for i in range(10) if i != 3]
    assert [o.attempts for o in outcomes] == [2] * 4 + [1] * 6
    assert trio.current_time() == 99
    assert bridge.calls == [list(range(10)), [3], [0, 1, 2, 4, 5, 6, 7, 8, 9]]


# Items of 2**-10 s: sums of them are exact, so times can be asserted exactly.
TICK = 2**-10


async def test_first_calls_share_the_items_then_calls_are_sized_and_end_together(
    autojump_clock: trio.abc.Clock,
) -> None:
    bridge = engine.testing.VirtualBridge(duration=lambda item: TICK)
    outcomes = await engine.run_batch(square, range(1_000), bridge=bridge, workers=2)
    assert [o.value for o in outcomes] == [i * i for i in range(1_000)]
    # Nothing measured yet: each worker is sent an even share (500), and its
    # clock ends the call after 200 ms (205 items); the other 295 of each
    # come back and go first in line. Then calls of 100 ms of measured work
    # (102 items), and two last calls sized so both workers end together.
    assert [len(call) for call in bridge.calls] == [500, 500] + [102] * 4 + [91, 91]
    assert [o.queued for o in outcomes[:205]] == [0] * 205
    assert outcomes[205].queued == 205 * TICK
    # No item ran twice, and neither worker idled: 1,000 ticks over two.
    assert all(o.attempts == 1 for o in outcomes)
    assert trio.current_time() == 500 * TICK


async def test_a_batch_that_fits_in_one_call_per_worker_makes_one_each(
    autojump_clock: trio.abc.Clock,
) -> None:
    bridge = engine.testing.VirtualBridge(duration=lambda item: TICK)
    await engine.run_batch(square, range(206), bridge=bridge, workers=2)
    assert [len(call) for call in bridge.calls] == [103, 103]
    assert trio.current_time() == 103 * TICK
    # 206 items each: the clock's 200 ms pass after 205, but one item more
    # costs less than sending it back for a call of its own.
    bridge = engine.testing.VirtualBridge(duration=lambda item: TICK)
    started = trio.current_time()
    await engine.run_batch(square, range(412), bridge=bridge, workers=2)
    assert [len(call) for call in bridge.calls] == [206, 206]
    assert trio.current_time() - started == 206 * TICK


async def test_the_last_calls_are_never_smaller_than_a_few_ms_of_work(
    autojump_clock: trio.abc.Clock,
) -> None:
    bridge = engine.testing.VirtualBridge(duration=lambda item: TICK)
    await engine.run_batch(square, range(824), bridge=bridge, workers=2)
    # 409 items each after the first calls and two of 100 ms: 6 are left.
    # Split, each worker would get 3, under 4 ms of work: the one back first
    # takes all 6, ending 3 ticks after an even split, one dispatch cheaper.
    assert [len(call) for call in bridge.calls] == [412, 412] + [102] * 4 + [6]
    assert trio.current_time() == 415 * TICK


async def test_a_worker_out_of_work_takes_part_of_a_slower_call_which_goes_on(
    autojump_clock: trio.abc.Clock,
) -> None:
    # The first worker's share takes three ticks an item, the second's one.
    bridge = engine.testing.VirtualBridge(duration=lambda item: 3 * TICK if item < 200 else TICK)
    outcomes = await engine.run_batch(square, range(400), bridge=bridge, workers=2)
    assert [o.value for o in outcomes] == [i * i for i in range(400)]
    # At 200 ticks the second worker is done; the first has started 67 items
    # and ends the 67th at 201. Of the 133 it has not started, at its pace
    # so far, it keeps 66 and the second takes 133-199 at once: both would
    # end at 399-401. (The first call's clock ends it at 207; the end-game
    # sizing shares what it leaves.)
    assert [len(call) for call in bridge.calls][:2] == [200, 200]
    assert bridge.calls[2] == list(range(133, 200))
    assert all(o.attempts == 1 for o in outcomes)
    # 800 ticks of work over two workers: 400 at best; without sharing, 600.
    assert trio.current_time() == 401 * TICK


def test_a_worker_past_its_time_returns_the_rest_unstarted() -> None:
    # The worker side of a call, without a process: with no time at all,
    # only the first item runs (one always does); the parent counts the rest
    # as never started.
    ran, errors, blob = engine._batch_runners.run_chunk_in_worker(square, [2, 3, 4], stop_after=0.0)
    assert (len(ran), errors) == (1, {})
    assert pickle.loads(blob) == [4]
    ran, errors, blob = engine._batch_runners.run_chunk_in_worker(square, [2, 3, 4])
    assert len(ran) == 3
    assert pickle.loads(blob) == [4, 9, 16]


async def test_a_hung_item_in_a_clock_limited_call_is_cut_within_twice_its_deadline(
    autojump_clock: trio.abc.Clock,
) -> None:
    step = 2**-5
    bridge = engine.testing.VirtualBridge(duration=lambda item: math.inf if item == 3 else step)
    reported: dict[int, float] = {}
    async with engine.map_batch(
        square, range(10), bridge=bridge, workers=1, item_deadline=60
    ) as batch:
        async for outcome in batch:
            reported[outcome.index] = trio.current_time()
    outcomes = batch.results()
    # The first call has all ten; item 3 starts at 3 steps and hangs. Every
    # item of the call starts within 0.25 s, so the call may run 59.75 s.
    # Item 3 was running then: it runs again alone, first in line, and is
    # cut after its full 60 s: 119.75 s from dispatch, inside twice the
    # deadline. 0-2 run again (their results died with the worker); 4-9
    # had never started.
    assert bridge.calls[:2] == [list(range(10)), [3]]
    assert reported[3] == 59.75 + 60 < 120
    assert outcomes[3].status == engine.Status.TIMEOUT
    assert [o.value for o in outcomes if o.ok] == [i * i for i in range(10) if i != 3]
    assert [o.attempts for o in outcomes] == [2] * 4 + [1] * 6


async def test_virtual_bridge_crash_is_isolated_to_its_item(autojump_clock: trio.abc.Clock) -> None:
    bridge = engine.testing.VirtualBridge(duration=lambda item: 1.0, crashes=lambda item: item == 5)
    outcomes = await engine.run_batch(
        square, range(10), bridge=bridge, workers=2, chunk_size=10, item_deadline=60
    )
    assert [o.status for o in outcomes] == ["ok"] * 5 + ["crashed"] + ["ok"] * 4
    assert isinstance(outcomes[5].error, engine.WorkerCrashed)
    # Item 5 was running when its worker died: it alone ran again alone. 0-4
    # ran again (their results died with the worker); 6-9 had never started.
    assert bridge.calls[0] == list(range(10))
    assert [5] in bridge.calls[1:]
    assert [o.attempts for o in outcomes] == [2] * 6 + [1] * 4
    assert bridge.max_in_flight <= 2


async def test_virtual_bridge_60s_deadlines_start_when_a_worker_takes_the_item(
    autojump_clock: trio.abc.Clock,
) -> None:
    durations = {"A": 50.0, "B": 50.0, "C": 50.0, "D": 70.0}
    bridge = engine.testing.VirtualBridge(duration=durations.__getitem__)
    outcomes = await engine.run_batch(
        str.lower, list(durations), bridge=bridge, workers=2, item_deadline=60
    )
    # Each worker is sent two items; A and C run 0-50, and the workers' clocks
    # end both calls there. B and D are taken at 50: B ends at 100, D is cut
    # at 110, 60 s after a worker took it.
    assert [o.status for o in outcomes] == ["ok", "ok", "ok", "timeout"]
    assert [o.queued for o in outcomes] == [0, 50, 0, 50]
    assert [o.attempts for o in outcomes] == [1, 1, 1, 1]
    assert trio.current_time() == 110


def test_outcomes_made_in_bulk_equal_those_made_by_their_constructor() -> None:
    items = ["a", "b", "c"]
    made = engine._outcome.ok_outcomes_in_bulk(
        [2, 0], items, ["C", "A"], [0.5, 0.25], [1.0, 2.0, 3.0], [2, 1, 1]
    )
    assert made == [
        engine.Outcome(2, "c", engine.Status.OK, "C", None, 3.0, 0.5, 1),
        engine.Outcome(0, "a", engine.Status.OK, "A", None, 1.0, 0.25, 2),
    ]
    # Every field was set: a frozen value, hashable and complete.
    assert all(hash(outcome) == hash(attrs.evolve(outcome)) for outcome in made)


async def test_a_call_that_was_shared_and_then_crashed_reports_only_its_own_part(
    autojump_clock: trio.abc.Clock,
) -> None:
    # As above, the second worker takes 133-199 from the first call at 200
    # ticks; item 68, which the first call kept, then kills its worker.
    bridge = engine.testing.VirtualBridge(
        duration=lambda item: 3 * TICK if item < 200 else TICK, crashes=lambda item: item == 68
    )
    outcomes = await engine.run_batch(square, range(400), bridge=bridge, workers=2)
    assert bridge.calls[2] == list(range(133, 200))
    assert [o.status for o in outcomes].count(engine.Status.CRASHED) == 1
    assert outcomes[68].status == engine.Status.CRASHED
    assert [o.value for o in outcomes if o.ok] == [i * i for i in range(400) if i != 68]
    # 0-67 ran again (their results died with the worker), 68 alone; the part
    # taken by the second worker, and what the first never started, ran once.
    assert [o.attempts for o in outcomes] == [2] * 69 + [1] * 331


def test_a_process_call_reports_only_the_items_before_its_cut() -> None:
    chunk = [(index, f"item {index}") for index in range(10, 16)]
    values = pickle.dumps([index * index for index in range(10, 15)])
    # It ran five, the last two past a cut at 3 that it saw too late: those
    # are another call's, whose results count.
    report = engine._batch_runners.returned(
        chunk, 3, [0.5] * 5, {1: ValueError("x"), 4: ValueError("y")}, values
    )
    rows = report.decode() if report.decode is not None else None
    assert rows is not None
    assert (rows.indices, rows.values, list(rows.ran)) == ([10, 11, 12], [100, 121, 144], [0.5] * 3)
    assert list(rows.errors) == [1]
    assert report.not_started == []
    # It stopped at 2 by its clock, before a cut at 5: 12-14 go back in line,
    # 15 is the other call's.
    report = engine._batch_runners.returned(chunk, 5, [0.5] * 2, {}, pickle.dumps([100, 121]))
    assert report.not_started == [12, 13, 14]


def test_a_cut_behind_the_calls_progress_takes_only_what_it_has_not_started() -> None:
    cuts: list[int] = []
    started = 5
    call = engine._runner.Call(started=lambda: started, cut=cuts.append)
    # Asked to stop at 3, it had already started 5: the items taken start at 5.
    assert call.cut_at(3) == 5
    assert (cuts, call.limit) == ([3, 5], 5)
    # Items past the limit were given away: a later cut never takes them back.
    assert call.cut_at(7) == 5
    started = 6  # a claim of item 5, seen before the worker gives it back
    assert call.cut_at(4) == 5
    assert (cuts, call.limit) == ([3, 5, 4, 5], 5)
    # A call the batch cannot watch is never cut.
    assert engine._runner.Call().cut_at(2) == engine._board.NO_LIMIT


def test_a_worker_starts_no_item_at_or_past_its_cut_and_gives_the_claim_back() -> None:
    board = engine._board.Board(1)
    try:
        slot = board.take()
        board.cut(slot, 2)
        ran, errors, blob = engine._batch_runners.run_chunk_in_worker(
            square, [1, 2, 3, 4], board=(board.path, slot)
        )
        assert (len(ran), errors, pickle.loads(blob)) == (2, {}, [1, 4])
        assert board.started(slot) == 2  # claimed the third, saw the cut, gave it back
    finally:
        board.close()


async def test_a_call_cut_to_one_item_before_it_began_still_reruns_that_item_alone(
    autojump_clock: trio.abc.Clock,
) -> None:
    # Calls take 5 ms to reach their worker. Items 2-3 end before 4-5's call
    # starts, so that worker takes item 5, leaving 4 alone in its call. That
    # call was sent with a chunk's time (half the deadline): when item 4
    # hangs, it must run again alone, with its whole deadline.
    durations = {0: 0.01, 1: 0.01, 2: 0.009, 3: 0.009, 4: math.inf, 5: 0.01}
    bridge = engine.testing.VirtualBridge(duration=durations.__getitem__, dispatch=0.005)
    outcomes = await engine.run_batch(
        str, range(6), bridge=bridge, workers=2, chunk_size=2, item_deadline=1.0
    )
    assert bridge.calls == [[0, 1], [2, 3], [4, 5], [5], [4]]
    assert [o.status for o in outcomes] == ["ok"] * 4 + ["timeout", "ok"]
    assert (outcomes[4].attempts, outcomes[4].ran) == (2, 1.0)
    assert trio.current_time() == pytest.approx(0.023 + 0.5 + 1.0)


def test_a_virtual_bridge_dispatch_must_be_finite_and_not_negative() -> None:
    for bad in (-0.001, math.inf):
        with pytest.raises(ValueError, match="dispatch must be a finite number >= 0"):
            engine.testing.VirtualBridge(duration=lambda item: 1.0, dispatch=bad)


async def test_results_that_cannot_be_loaded_rerun_only_the_items_their_call_ran(
    pool: engine.ProcessPool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(jobs, "REFUSE_TO_LOAD", True)
    # One worker, items of 60 ms: the call's clock (200 ms) ends it after
    # about 4 items (fewer on a busy machine), and the call that ran item 3
    # cannot have its results loaded here. The items that call ran run again
    # alone; those it never started, already back in line, run once (before
    # the fix they ended twice, failing the batch).
    outcomes = await engine.run_batch(slow_fragile, range(8), pool=pool, workers=1)
    assert [o.status for o in outcomes] == ["ok"] * 3 + ["error"] + ["ok"] * 4
    assert [o.value for o in outcomes if o.ok] == [i * i for i in range(8) if i != 3]
    attempts = [o.attempts for o in outcomes]
    assert attempts[3] == 2
    assert attempts[-1] == 1  # never started by the call whose results were lost


_KINDS = st.sampled_from(["ok"] * 12 + ["hang", "crash"])
# Times of about 1, 3, 10 and 50 ms, in whole ticks of 2**-10 s: the virtual
# clock adds them up exactly, so times can be asserted exactly. (It moves by
# differences: with decimal seconds, the time it reaches can differ from
# start + deadline in the last bit.)
_TICK = 2**-10


@settings(max_examples=150, deadline=None)
@given(
    kinds=st.lists(
        st.tuples(_KINDS, st.sampled_from([_TICK, 3 * _TICK, 10 * _TICK, 51 * _TICK])),
        max_size=60,
    ),
    workers=st.integers(1, 4),
    dispatch=st.sampled_from([0.0, 2 * _TICK, 6 * _TICK, 20 * _TICK]),
    deadline=st.sampled_from([0.5, 10.0]),
    chunk_size=st.one_of(st.none(), st.integers(1, 8)),
    at_most_once=st.booleans(),
)
# Two calls end together; the first worker free takes 4-5, and the other,
# finding nothing left, takes 5 from that call before it began: 4, left
# alone in a call sent as two, hangs.
@example(
    kinds=[("ok", 0.01)] * 4 + [("hang", 0.01), ("ok", 0.01)],
    workers=2,
    dispatch=0.006,
    deadline=0.5,
    chunk_size=2,
    at_most_once=False,
)
# At most once: a hung item and a crash in one call of five, behind items
# that ran.
@example(
    kinds=[(kind, 10 * _TICK) for kind in ("ok", "hang", "ok", "crash", "ok")] * 2,
    workers=2,
    dispatch=2 * _TICK,
    deadline=0.5,
    chunk_size=5,
    at_most_once=True,
)
def test_any_mix_of_speeds_hangs_and_crashes_gives_each_item_its_own_true_outcome(
    kinds: list[tuple[str, float]],
    workers: int,
    dispatch: float,
    deadline: float,
    chunk_size: int | None,
    at_most_once: bool,
) -> None:
    # Chunks of uneven items, calls reaching their workers late, shared
    # calls, hung and crashing items: whatever happens, one outcome each;
    # with at_most_once, every item also starts exactly once.
    started: dict[int, float] = {}  # when each item last started, in virtual time
    reported: dict[int, float] = {}

    def duration(index: int) -> float:  # asked as the item starts
        started[index] = trio.current_time()
        kind, seconds = kinds[index]
        return math.inf if kind == "hang" else seconds

    bridge = engine.testing.VirtualBridge(
        duration=duration, crashes=lambda index: kinds[index][0] == "crash", dispatch=dispatch
    )

    async def batch() -> list[engine.Outcome[int, Any]]:
        async with engine.map_batch(
            square,
            range(len(kinds)),
            bridge=bridge,
            workers=workers,
            item_deadline=deadline,
            chunk_size=chunk_size,
            at_most_once=at_most_once,
        ) as running:
            async for outcome in running:
                reported[outcome.index] = trio.current_time()
        return running.results()

    outcomes = trio.run(batch, clock=trio.testing.MockClock(autojump_threshold=0))
    expected = {
        "ok": engine.Status.OK,
        "hang": engine.Status.TIMEOUT,
        "crash": engine.Status.CRASHED,
    }
    assert [o.index for o in outcomes] == list(range(len(kinds)))
    assert all(o.value == o.index**2 for o in outcomes if o.ok)
    assert bridge.max_in_flight <= workers
    if not at_most_once:
        assert [o.status for o in outcomes] == [expected[kind] for kind, _ in kinds]
        # An item is called hung or a crasher only after it ran alone.
        alone = {call[0] for call in bridge.calls if len(call) == 1}
        assert all(o.index in alone for o in outcomes if not o.ok)
        return
    # Every call starts an item within the deadline here, so every item
    # starts, and none twice.
    assert Counter(bridge.started) == Counter(range(len(kinds)))
    assert all(o.attempts == 1 for o in outcomes)
    for outcome in outcomes:
        kind = kinds[outcome.index][0]
        if kind != "ok" or outcome.ok:
            assert outcome.status == expected[kind]
            continue
        # An item that returned ends crashed only when its result died with
        # the worker: a later item of its call hung or crashed.
        assert outcome.status == engine.Status.CRASHED
        # (It started in the last call it was sent in: calls send back only
        # items they never started.)
        call = [call for call in bridge.calls if outcome.index in call][-1]
        later = call[call.index(outcome.index) + 1 :]
        assert any(kinds[index][0] != "ok" for index in later)
    # A hung item is reported at its own deadline, from its start.
    for outcome in outcomes:
        if outcome.status == engine.Status.TIMEOUT:
            assert outcome.ran == deadline
            assert reported[outcome.index] == started[outcome.index] + deadline


# -- what becomes of a failed call: plain decisions -------------------------------------------


def settle(
    report: engine._runner.ChunkReport, *, size: int = 5, at_most_once: bool = False
) -> engine._batch_failures.Settlement:
    return engine._batch_failures.settle_failed_call(
        report, size=size, deadline=60.0, at_most_once=at_most_once
    )


def test_a_call_whose_worker_died_runs_its_culprit_alone_and_the_lost_again() -> None:
    crash = engine.WorkerCrashed("running item 12", exit_code=None, signal=9)
    chunk = [(index, None) for index in range(10, 15)]
    report = engine._runner.lost_with_the_worker(chunk, 3, crash)
    assert (report.lost, report.unknown, report.not_started) == ([10, 11], [12], [13, 14])
    settled = settle(report)
    assert (settled.ended, settled.alone, settled.again) == ((), (12,), (10, 11))
    assert (settled.another_attempt, settled.split) == (True, True)
    assert settled.warning is not None
    assert settled.warning.endswith("1 items run again alone, 2 others again")


def test_at_most_once_a_failed_call_ends_its_items_instead() -> None:
    Ending, Status = engine._batch_failures.Ending, engine.Status
    hung = engine._runner.too_slow(60.0)
    settled = settle(
        engine._runner.ChunkReport(unknown=[12], lost=[10, 11], failure=hung), at_most_once=True
    )
    assert (settled.alone, settled.again, settled.split) == ((), (), True)
    assert settled.ended[0] == Ending(12, Status.TIMEOUT, hung, 60.0)
    assert [(e.index, e.status) for e in settled.ended[1:]] == [(10, "crashed"), (11, "crashed")]
    assert "item 12" in str(settled.ended[1].error)
    assert "its result was lost" in str(settled.ended[1].error)
    # Which item hung is unknown: each ends with the call, none had its own deadline.
    settled = settle(engine._runner.ChunkReport(unknown=[1, 2], failure=hung), at_most_once=True)
    assert [(e.index, e.status, e.ran) for e in settled.ended] == [
        (1, "timeout", 0.0),
        (2, "timeout", 0.0),
    ]


@pytest.mark.parametrize("at_most_once", [False, True])
def test_a_call_its_worker_could_not_unpickle_runs_each_item_alone(at_most_once: bool) -> None:
    failure = engine.SerializationError("argument", "could not be unpickled in the worker")
    report = engine._runner.ChunkReport(unknown=[3, 4, 5], failure=failure)
    settled = settle(report, at_most_once=at_most_once)
    assert (settled.ended, settled.alone, settled.again) == ((), (3, 4, 5), ())
    # It ran none of them: running alone is their first attempt.
    assert (settled.another_attempt, settled.split) == (False, True)


def test_an_item_sent_alone_ends_with_its_calls_failure() -> None:
    Ending, Status = engine._batch_failures.Ending, engine.Status
    hung, crash = engine._runner.too_slow(60.0), engine.WorkerCrashed("x", exit_code=3, signal=None)
    lost = engine.SerializationError("argument", "item 7")
    assert settle(engine._runner.ChunkReport(unknown=[7], failure=hung), size=1).ended == (
        Ending(7, Status.TIMEOUT, hung, 60.0),
    )
    assert settle(engine._runner.ChunkReport(unknown=[7], failure=crash), size=1).ended == (
        Ending(7, Status.CRASHED, crash),
    )
    alone = settle(engine._runner.ChunkReport(unknown=[7], failure=lost), size=1)
    assert alone == engine._batch_failures.Settlement((Ending(7, Status.ERROR, lost),))


def test_items_abandoned_at_their_deadline_just_end() -> None:
    hung = engine._runner.too_slow(0.3)
    settled = settle(engine._runner.ChunkReport(timed_out=[(4, 0.3)], failure=hung))
    assert settled == engine._batch_failures.Settlement(
        (engine._batch_failures.Ending(4, engine.Status.TIMEOUT, hung, 0.3),)
    )


def test_results_that_cannot_be_loaded_run_again_alone_or_end_as_errors() -> None:
    settle_lost_results = engine._batch_failures.settle_lost_results
    failure = engine._runner.ResultsLost("result", "could not be unpickled here")
    again = settle_lost_results([4, 5], [0.5, 0.25], failure, at_most_once=False)
    assert (again.ended, again.alone, again.another_attempt) == ((), (4, 5), True)
    ended = settle_lost_results([4, 5], [0.5, 0.25], failure, at_most_once=True)
    assert [(e.index, e.status, e.ran) for e in ended.ended] == [
        (4, "error", 0.5),
        (5, "error", 0.25),
    ]
    assert (ended.alone, ended.split) == ((), False)
