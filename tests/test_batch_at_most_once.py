"""map_batch(..., at_most_once=True): no item runs twice; a hung one ends at its own deadline."""

from __future__ import annotations

import array
import math
import os
import pickle
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest
import trio

import engine
import engine.testing
from tests.batch_jobs import jobs
from tests.batch_jobs.jobs import behave, fragile, nap, square

# -- virtual time: the exact timing ---------------------------------------------------------

STEP = 2**-5  # sums of these are exact, so times can be asserted exactly


async def test_a_hung_item_ends_at_its_own_deadline_and_runs_once(
    autojump_clock: trio.abc.Clock,
) -> None:
    bridge = engine.testing.VirtualBridge(duration=lambda item: math.inf if item == 3 else STEP)
    reported: dict[int, float] = {}
    async with engine.map_batch(
        square, range(10), bridge=bridge, workers=1, item_deadline=60, at_most_once=True
    ) as batch:
        async for outcome in batch:
            reported[outcome.index] = trio.current_time()
    outcomes = batch.results()
    # Item 3 starts at 3 steps and hangs: it ends at its own deadline, 60 s
    # after its start (without at_most_once: 119.75 s, after a second run).
    assert reported[3] == 3 * STEP + 60
    assert (outcomes[3].status, outcomes[3].ran) == (engine.Status.TIMEOUT, 60)
    assert isinstance(outcomes[3].error, trio.TooSlowError)
    # 0-2 ran, but their results died with the killed worker: they end
    # crashed rather than run again. 4-9 had not started: they run, once.
    assert [o.status for o in outcomes[:3]] == [engine.Status.CRASHED] * 3
    assert all(isinstance(o.error, engine.WorkerCrashed) for o in outcomes[:3])
    assert "its result was lost" in str(outcomes[0].error)
    assert "item 3" in str(outcomes[0].error)
    assert [o.value for o in outcomes[4:]] == [i * i for i in range(4, 10)]
    assert bridge.calls == [list(range(10)), list(range(4, 10))]
    assert Counter(bridge.started) == Counter(range(10))
    assert all(o.attempts == 1 for o in outcomes)
    assert batch.statistics().split_chunks == 1


async def test_a_hung_item_with_a_fixed_chunk_size_ends_at_its_own_deadline(
    autojump_clock: trio.abc.Clock,
) -> None:
    # Without at_most_once a fixed-size chunk may run half the deadline, so
    # a hung item is cut at 30 s and runs again alone, to 90 s.
    bridge = engine.testing.VirtualBridge(duration=lambda item: math.inf if item == 3 else 1.0)
    outcomes = await engine.run_batch(
        square,
        range(10),
        bridge=bridge,
        workers=1,
        chunk_size=10,
        item_deadline=60,
        at_most_once=True,
    )
    assert [o.status for o in outcomes] == ["crashed"] * 3 + ["timeout"] + ["ok"] * 6
    # Reported at 3 + 60 s; the six it never started take 6 s more.
    assert trio.current_time() == 3 + 60 + 6
    assert Counter(bridge.started) == Counter(range(10))


async def test_a_crash_ends_its_item_and_the_results_it_took_with_it(
    autojump_clock: trio.abc.Clock,
) -> None:
    bridge = engine.testing.VirtualBridge(duration=lambda item: 1.0, crashes=lambda item: item == 5)
    outcomes = await engine.run_batch(
        square,
        range(10),
        bridge=bridge,
        workers=1,
        chunk_size=10,
        item_deadline=60,
        at_most_once=True,
    )
    assert [o.status for o in outcomes] == ["crashed"] * 6 + ["ok"] * 4
    assert (
        str(outcomes[5].error) == "worker process killed by SIGKILL while running item 5 (virtual)"
    )
    assert "this item had run" in str(outcomes[4].error)
    assert outcomes[4].error.signal == 9  # type: ignore[union-attr]  # a WorkerCrashed
    assert bridge.calls == [list(range(10)), list(range(6, 10))]
    assert Counter(bridge.started) == Counter(range(10))
    assert all(o.attempts == 1 for o in outcomes)


async def test_a_slow_call_is_not_shared(autojump_clock: trio.abc.Clock) -> None:
    # The process board's cut may, rarely, start an item in two calls: with
    # at_most_once no call is cut. Here, shared, the second worker would take
    # 133-199 from the first call at 200 ticks, and the batch would end at
    # 401 (see test_batch). Unshared, the first call goes on until its clock
    # stops it after item 68, and only then do 69-199 go out again.
    tick = 2**-10
    bridge = engine.testing.VirtualBridge(duration=lambda item: 3 * tick if item < 200 else tick)
    outcomes = await engine.run_batch(
        square, range(400), bridge=bridge, workers=2, at_most_once=True
    )
    assert [o.value for o in outcomes] == [i * i for i in range(400)]
    assert bridge.calls[:2] == [list(range(200)), list(range(200, 400))]
    assert bridge.calls[2][0] == 69
    assert trio.current_time() > 401 * tick
    assert Counter(bridge.started) == Counter(range(400))


async def test_a_call_that_starts_nothing_within_the_deadline_ends_every_item(
    autojump_clock: trio.abc.Clock,
) -> None:
    # Calls take 2 s to reach their worker, the deadline is 1 s: which item
    # ran, if any, cannot be told, so each item of the call ends with it.
    bridge = engine.testing.VirtualBridge(duration=lambda item: 0.1, dispatch=2.0)
    outcomes = await engine.run_batch(
        square, range(3), bridge=bridge, workers=1, item_deadline=1.0, at_most_once=True
    )
    assert [o.status for o in outcomes] == ["timeout"] * 3
    assert [o.ran for o in outcomes] == [0.0] * 3
    assert bridge.started == []
    assert trio.current_time() == 1.0


# -- a process call ended as its overdue item finishes ------------------------------------


@attrs.define
class RacingLease:
    """A worker held for ``ProcessRunner._run``, played in virtual time.

    The worker claims ``claimed`` items, the last of them started long
    before its deadline. Ended, it claims ``claimed_before_the_kill`` (it
    finished that item and started the next before the kill landed), or,
    with ``returns``, sends back its results anyway.
    """

    place: engine._board.CallSlot
    claimed: int
    claimed_before_the_kill: int
    returns: bytes | None = None
    replaced: int = 0

    async def ensure_idle_worker(self) -> None:
        await trio.lowlevel.checkpoint()

    async def replace_lost_worker(self) -> None:
        self.replaced += 1
        await trio.lowlevel.checkpoint()

    async def dispatch(self, payload: bytes, fn: object) -> bytes:
        worker = engine._board.Slot(*self.place.address)
        worker.report_time(1)  # the clock's first nanosecond: long before any deadline
        worker.report(self.claimed)
        try:
            await trio.sleep_forever()
        except trio.Cancelled:
            worker.report(self.claimed_before_the_kill)
            if self.returns is None:
                raise
        return self.returns


async def run_racing(lease: RacingLease) -> engine._runner.ChunkReport:
    runner = engine._batch_runners.ProcessRunner(None)  # type: ignore[arg-type]  # never asked for a worker
    call = engine._runner.Call(at_most_once=True)
    chunk = [(index, index) for index in range(10, 15)]
    return await runner._run(square, chunk, 60.0, math.inf, lease, call)


@pytest.fixture
def board() -> Iterator[engine._board.Board]:
    opened = engine._board.Board(1)
    try:
        yield opened
    finally:
        opened.close()


def taken(board: engine._board.Board) -> engine._board.CallSlot:
    return engine._board.CallSlot(board, board.take())


async def test_a_call_ended_for_an_overdue_item_blames_it_not_the_next(
    autojump_clock: trio.abc.Clock, board: engine._board.Board
) -> None:
    # Item 11 (the second) is found overdue; before the kill lands it ends
    # and item 12 starts. Item 11 timed out; 10 and 12 started, and their
    # results died with the worker; 13 and 14 never started.
    lease = RacingLease(taken(board), claimed=2, claimed_before_the_kill=3)
    report = await run_racing(lease)
    assert (report.unknown, report.lost, report.not_started) == ([11], [10, 12], [13, 14])
    assert isinstance(report.failure, trio.TooSlowError)
    assert trio.current_time() == 60
    assert lease.replaced == 1


async def test_results_that_arrive_as_the_call_is_ended_are_kept(
    autojump_clock: trio.abc.Clock, board: engine._board.Board
) -> None:
    # The call is ended as item 14, overdue, returns: the worker is not
    # killed, and every result counts.
    values = [index * index for index in range(10, 15)]
    results = pickle.dumps((array.array("d", [1.0] * 4 + [60.0]), {}, pickle.dumps(values)))
    lease = RacingLease(taken(board), claimed=5, claimed_before_the_kill=5, returns=results)
    report = await run_racing(lease)
    assert (report.unknown, report.lost, report.not_started, report.failure) == ([], [], [], None)
    assert report.decode is not None
    assert report.decode().values == values
    assert lease.replaced == 0


# -- real processes ------------------------------------------------------------------------


def counted(item: tuple[str, str, int]) -> int:
    """``behave((kind, n))``, first leaving a mark in ``folder`` for each run of item ``n``.

    ``("nap", n)`` takes 0.25 s, then returns ``n * n``.
    """
    folder, kind, n = item
    with open(os.path.join(folder, str(n)), "a") as marks:
        marks.write("x")
    if kind == "nap":
        time.sleep(0.25)
        return n * n
    return behave((kind, n))


def runs(folder: Path, count: int) -> list[int]:
    """How many times each of items ``0..count-1`` ran."""
    return [
        len((folder / str(n)).read_text()) if (folder / str(n)).exists() else 0
        for n in range(count)
    ]


async def test_a_hung_process_item_ends_at_its_deadline_and_ran_once(
    pool: engine.ProcessPool, tmp_path: Path
) -> None:
    # Long enough for the worker that replaces the killed one to start and
    # run an item on a loaded machine (0.6 s was not, once, in a full run).
    deadline = 1.5
    items = [(str(tmp_path), "ok", n) for n in range(10)]
    items[5] = (str(tmp_path), "sleep", 5)  # sleeps for an hour
    killed = engine.bridge_statistics().workers_killed
    seen: dict[int, float] = {}
    started = trio.current_time()
    with trio.fail_after(20):
        async with engine.map_batch(
            counted,
            items,
            pool=pool,
            workers=1,
            chunk_size=10,
            item_deadline=deadline,
            at_most_once=True,
        ) as batch:
            async for outcome in batch:
                seen[outcome.index] = trio.current_time() - started
    outcomes = batch.results()
    assert [o.status for o in outcomes] == ["crashed"] * 5 + ["timeout"] + ["ok"] * 4
    assert (outcomes[5].ran, seen[5] >= deadline) == (deadline, True)
    assert [o.value for o in outcomes[6:]] == [n * n for n in range(6, 10)]
    assert runs(tmp_path, 10) == [1] * 10
    assert all(o.attempts == 1 for o in outcomes)
    assert engine.bridge_statistics().workers_killed - killed == 1


async def test_a_process_call_longer_than_the_deadline_cuts_no_item_in_time(
    pool: engine.ProcessPool, tmp_path: Path
) -> None:
    # Three items of 0.25 s in one call of 0.75 s, each well within its
    # 0.6 s deadline. Without at_most_once the call may run only half the
    # deadline and is cut; here each item has its own deadline, from its start.
    items = [(str(tmp_path), "nap", n) for n in range(3)]
    with trio.fail_after(20):
        async with engine.map_batch(
            counted, items, pool=pool, workers=1, chunk_size=3, item_deadline=0.6, at_most_once=True
        ) as batch:
            pass
    assert [o.value for o in batch.results()] == [0, 1, 4]
    assert runs(tmp_path, 3) == [1, 1, 1]
    assert batch.statistics().calls == 1


async def test_a_slower_process_call_is_not_shared(pool: engine.ProcessPool) -> None:
    # Each worker is sent half: 15 items of 3 ms, 15 of 0.5 ms. Without
    # at_most_once the second worker, done first, takes the last of the
    # first call's items (see test_batch); with it, no call is cut, and each
    # worker runs its half in one call (fixed chunks: no clock in the worker
    # ends a call early, however loaded the machine).
    work = [0.003] * 15 + [0.0005] * 15
    async with engine.map_batch(
        nap, work, pool=pool, workers=2, chunk_size=15, at_most_once=True
    ) as batch:
        pass
    outcomes = batch.results()
    assert [o.value for o in outcomes] == work
    assert batch.statistics().calls == 2
    assert outcomes[14].queued == outcomes[0].queued


@pytest.mark.parametrize("how", ["kill", "exit"])
async def test_a_process_worker_that_dies_mid_item_ran_it_once(
    pool: engine.ProcessPool, tmp_path: Path, how: str
) -> None:
    items = [(str(tmp_path), "ok", n) for n in range(10)]
    items[4] = (str(tmp_path), how, 4)  # SIGKILL itself, or os._exit(3)
    with trio.fail_after(20):
        outcomes = await engine.run_batch(
            counted, items, pool=pool, workers=1, chunk_size=10, at_most_once=True
        )
    assert [o.status for o in outcomes] == ["crashed"] * 5 + ["ok"] * 5
    error = outcomes[4].error
    assert isinstance(error, engine.WorkerCrashed)
    assert (error.signal, error.exit_code) == ((9, None) if how == "kill" else (None, 3))
    lost = outcomes[0].error
    assert isinstance(lost, engine.WorkerCrashed)
    assert (lost.signal, lost.exit_code) == (error.signal, error.exit_code)
    assert "this item had run" in str(lost)
    assert runs(tmp_path, 10) == [1] * 10


async def test_without_a_board_process_items_go_one_at_a_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_room(slots: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(engine._processes, "Board", no_room)
    items = [(str(tmp_path), "ok", n) for n in range(6)]
    items[0] = (str(tmp_path), "exit", 0)  # in the first call, sent six
    with trio.fail_after(30):
        async with (
            engine.open_process_pool(1) as fresh,
            engine.map_batch(counted, items, pool=fresh, chunk_size=6, at_most_once=True) as batch,
        ):
            pass
    outcomes = batch.results()
    # Unwatched, a failed call could not say which item ran: so each call
    # carries one, and only the one that killed its worker fails.
    assert [o.status for o in outcomes] == ["crashed", "ok", "ok", "ok", "ok", "ok"]
    assert runs(tmp_path, 6) == [1] * 6
    assert batch.statistics().calls == 6
    assert batch.statistics().split_chunks == 0  # each failed call carried one item


async def test_results_that_cannot_be_loaded_end_as_errors_without_running_again(
    pool: engine.ProcessPool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(jobs, "REFUSE_TO_LOAD", True)
    outcomes = await engine.run_batch(fragile, range(6), pool=pool, chunk_size=6, at_most_once=True)
    # Item 3's result cannot be loaded here, and the chunk's results travel
    # together: all six ran, none may run again, so all six end with the error.
    assert [o.status for o in outcomes] == ["error"] * 6
    assert all(isinstance(o.error, engine.SerializationError) for o in outcomes)
    assert all(o.attempts == 1 for o in outcomes)


async def test_an_argument_that_cannot_be_unpickled_still_runs_the_others_alone(
    pool: engine.ProcessPool,
) -> None:
    # The worker could not unpickle the chunk, so no item ran: each may run
    # alone, once, to find the culprit.
    items: list[object] = [1, "a", jobs.FailsToUnpickle(), 2.5]
    outcomes = await engine.run_batch(jobs.kind, items, pool=pool, chunk_size=4, at_most_once=True)
    assert [o.status for o in outcomes] == ["ok", "ok", "error", "ok"]
    assert all(o.attempts == 1 for o in outcomes)  # the first call ran none of them


class SlowToSend:
    """A result that takes ``seconds`` to pickle; it loads as ``n``."""

    def __init__(self, n: int, seconds: float) -> None:
        self.n, self.seconds = n, seconds

    def __reduce__(self) -> tuple[object, tuple[int]]:
        time.sleep(self.seconds)
        return (int, (self.n,))


def slow_to_send(item: tuple[float, float, int]) -> SlowToSend:
    """Runs ``item[0]`` s; its result takes ``item[1]`` s to pickle."""
    runs_for, pickles_for, n = item
    time.sleep(runs_for)
    return SlowToSend(n, pickles_for)


async def test_sending_the_results_back_is_not_the_last_items_time(
    pool: engine.ProcessPool,
) -> None:
    # Each item runs 0.4 s of its 0.7 s deadline, but the call's results
    # take 0.4 s more to pickle: the last item is not overdue for that.
    items = [(0.4, 0.2, n) for n in range(2)]
    with trio.fail_after(20):
        outcomes = await engine.run_batch(
            slow_to_send,
            items,
            pool=pool,
            workers=1,
            chunk_size=2,
            item_deadline=0.7,
            at_most_once=True,
        )
    assert [(o.status, o.value) for o in outcomes] == [("ok", 0), ("ok", 1)]


async def test_results_that_never_finish_sending_end_the_call_at_a_deadline_of_their_own(
    pool: engine.ProcessPool,
) -> None:
    # Both items return at once; their results would take an hour to pickle.
    items = [(0.0, 3600.0, n) for n in range(2)]
    started = trio.current_time()
    with trio.fail_after(20):
        outcomes = await engine.run_batch(
            slow_to_send,
            items,
            pool=pool,
            workers=1,
            chunk_size=2,
            item_deadline=0.3,
            at_most_once=True,
        )
    # Both ran, and neither is to blame: their results died with the worker.
    assert [o.status for o in outcomes] == ["crashed", "crashed"]
    assert all("sending back the results of its call" in str(o.error) for o in outcomes)
    assert all("its result was lost" in str(o.error) for o in outcomes)
    assert all(o.attempts == 1 for o in outcomes)
    assert trio.current_time() - started < 10


# -- threads --------------------------------------------------------------------------------


async def test_a_hung_thread_item_ends_at_its_deadline_and_ran_once() -> None:
    release = threading.Event()
    started: Counter[int] = Counter()

    def work(item: int) -> int:
        started[item] += 1
        if item == 3:
            release.wait(30)  # hung
        return item * 10

    try:
        with trio.fail_after(10):
            outcomes = await engine.run_batch(
                work,
                range(8),
                bridge="thread",
                workers=1,
                chunk_size=8,
                item_deadline=0.3,
                at_most_once=True,
            )
    finally:
        release.set()
    # The thread bridge sees each item start: the items before the hung one
    # keep their results, and those after it run on another thread.
    assert [o.status for o in outcomes] == ["ok"] * 3 + ["timeout"] + ["ok"] * 4
    assert outcomes[3].ran == 0.3
    assert started == Counter(range(8))


def test_at_most_once_must_be_a_bool() -> None:
    with pytest.raises(TypeError, match="at_most_once must be a bool, got 'yes'"):
        engine.map_batch(square, [1], at_most_once="yes")  # type: ignore[arg-type]
