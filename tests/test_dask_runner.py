"""map_batch on a real Dask cluster (``DaskRunner``): outcomes, deadlines, crashes, cancellation.

Every test runs on a LocalCluster of two worker processes (see
``tests/fixtures_dask.py``), shared by the file; the scheduler-loss test
starts a cluster of its own. The functions the workers run are defined
here, at module level: the workers import this module to unpickle them.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import distributed
import pytest
import trio

import engine
from engine._dask_runner import KEY_PREFIX, DaskRunner
from tests.fixtures_dask import (
    Cluster,
    connect,
    dask_client,
    dask_cluster,
    dask_session_client,
    executing,
    poll_until,
    start_cluster,
    wait_until_idle,
)

__all__ = ["dask_client", "dask_cluster", "dask_session_client"]  # fixtures, used by name

ROOT = Path(__file__).resolve().parent.parent

# The test's absolute bound, in real seconds.
BOUND = 20


def double(x: int) -> int:
    if x == 13:
        raise ValueError("unlucky 13")
    return 2 * x


def nap(x: int) -> int:
    time.sleep(0.01)
    return x


def hang_on_3(x: int) -> int:
    if x == 3:
        time.sleep(60)  # Dask cannot interrupt this: the worker is killed
    return x


def sleepy(x: int) -> int:
    time.sleep(1.5)
    return x


def exit_on_5(x: int) -> int:
    if x == 5:
        os._exit(3)
    return x


def lock_for_3(x: object) -> object:
    return threading.Lock() if x == 3 else x


def _engine_keys(dask_scheduler: distributed.Scheduler) -> list[str]:
    """The engine's tasks the scheduler still means to run, or has a worker running."""
    live = {"waiting", "queued", "no-worker", "processing"}
    return [
        f"{key}: {task.state}"
        for key, task in dask_scheduler.tasks.items()
        if str(key).startswith(KEY_PREFIX) and task.state in live
    ]


def leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    found: list[BaseException] = []
    for exc in group.exceptions:
        found.extend(leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return found


def statuses(outcomes: Sequence[engine.Outcome[Any, Any]]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for outcome in outcomes:
        counts[outcome.status.value] = counts.get(outcome.status.value, 0) + 1
    return counts


async def test_items_travel_in_chunks_with_one_outcome_each(
    dask_client: distributed.Client,
) -> None:
    runner = DaskRunner(dask_client)
    progress: list[int] = []
    with trio.fail_after(BOUND):
        outcomes = await engine.run_batch(
            double,
            range(300),
            bridge=runner,
            workers=2,
            on_progress=lambda done, total: progress.append(done),
        )
    assert [o.index for o in outcomes] == list(range(300))
    assert statuses(outcomes) == {"ok": 299, "error": 1}
    assert [o.value for o in outcomes if o.index != 13] == [2 * i for i in range(300) if i != 13]
    assert isinstance(outcomes[13].error, ValueError)
    assert progress == list(range(1, 301))
    stats = runner.statistics()
    assert 2 <= stats.tasks < 300  # chunks, not a task per item
    assert stats.in_flight == stats.cancelled == stats.abandoned == 0


async def test_at_most_once_sends_one_item_a_task(dask_client: distributed.Client) -> None:
    runner = DaskRunner(dask_client)
    with trio.fail_after(BOUND):
        outcomes = await engine.run_batch(
            double, range(12, 20), bridge=runner, workers=2, at_most_once=True
        )
    assert statuses(outcomes) == {"ok": 7, "error": 1}
    assert all(o.attempts == 1 for o in outcomes)
    # Each call carried one of its chunk's items, the rest back in line.
    assert runner.statistics().tasks == 8
    assert runner.chunked  # the runner is shared: later batches are chunked again


async def test_a_hung_task_times_out_and_its_worker_is_replaced(
    dask_client: distributed.Client,
) -> None:
    runner = DaskRunner(dask_client)
    with trio.fail_after(BOUND):
        # 3 s, not 1: on Dask a deadline counts from submission, and on a busy
        # 2-CPU machine a chunk of instant items sometimes waited past 1 s.
        outcomes = await engine.run_batch(
            hang_on_3, range(6), bridge=runner, workers=2, item_deadline=3.0
        )
    assert statuses(outcomes) == {"ok": 5, "timeout": 1}
    assert outcomes[3].status is engine.Status.TIMEOUT
    assert isinstance(outcomes[3].error, trio.TooSlowError)
    stats = runner.statistics()
    # Its chunk ran out of time, then it alone: each time the worker was
    # running it, so each time it was abandoned and the worker killed. (On
    # a loaded machine another chunk may also run past its deadline first;
    # its items then run again alone and end ok.)
    assert stats.workers_killed >= 2
    assert stats.abandoned >= stats.workers_killed
    # Nothing of it runs on: the workers the scheduler counts are idle.
    assert not any(executing(dask_client).values())


async def test_a_killed_worker_loses_no_item(
    dask_client: distributed.Client, dask_cluster: object
) -> None:
    runner = DaskRunner(dask_client)
    pids = dask_client.run(os.getpid)
    victim = sorted(pids.values())[0]
    killed = False

    def kill_once(done: int, total: int) -> None:
        nonlocal killed
        if not killed and done >= 20:
            killed = True
            os.kill(victim, signal.SIGKILL)

    with trio.fail_after(BOUND):
        outcomes = await engine.run_batch(
            nap, range(200), bridge=runner, workers=2, on_progress=kill_once
        )
    assert killed
    # Every item has its one outcome; the killed call's items ran again.
    assert [o.index for o in outcomes] == list(range(200))
    assert statuses(outcomes) == {"ok": 200}
    assert [o.value for o in outcomes] == list(range(200))
    assert runner.statistics().killed_worker >= 1
    assert any(o.attempts == 2 for o in outcomes)


async def test_an_item_that_kills_its_worker_ends_crashed(
    dask_client: distributed.Client,
) -> None:
    runner = DaskRunner(dask_client)
    with trio.fail_after(BOUND):
        outcomes = await engine.run_batch(exit_on_5, range(10), bridge=runner, workers=2)
    assert statuses(outcomes) == {"ok": 9, "crashed": 1}
    assert isinstance(outcomes[5].error, engine.WorkerCrashed)
    assert "KilledWorker" in str(outcomes[5].error)


async def test_cancelling_the_batch_cancels_its_tasks(dask_client: distributed.Client) -> None:
    runner = DaskRunner(dask_client)
    with trio.fail_after(BOUND):
        async with engine.map_batch(
            sleepy, range(6), bridge=runner, workers=2, chunk_size=1
        ) as batch:
            # Both calls are on a worker (the scheduler says so) before the cancel.
            def both_running() -> bool:
                busy: dict[str, list[str]] = dask_client.processing()  # type: ignore[no-untyped-call]  # distributed's API is untyped
                return sum(len(keys) for keys in busy.values()) == 2

            assert await trio.to_thread.run_sync(poll_until, both_running, 10.0)
            cancelled_at = trio.current_time()
            batch.cancel()
        assert trio.current_time() - cancelled_at < 1.0  # well before the tasks end
    assert statuses(batch.results()) == {"cancelled": 6}
    stats = runner.statistics()
    assert stats.cancelled == stats.abandoned == 2
    assert stats.in_flight == 0

    # The scheduler holds none of the batch's tasks; the workers run on only
    # what Dask cannot interrupt, and that much was counted.
    def none_left() -> bool:
        return not dask_client.run_on_scheduler(_engine_keys)  # type: ignore[no-untyped-call]  # distributed's API is untyped

    assert await trio.to_thread.run_sync(poll_until, none_left, 1.0)
    assert sum(executing(dask_client).values()) <= stats.abandoned
    wait_until_idle(dask_client)


async def test_what_cannot_be_pickled_is_that_items_error(
    dask_client: distributed.Client,
) -> None:
    runner = DaskRunner(dask_client)
    items: list[object] = [0, 1, threading.Lock(), 3, 4]
    with trio.fail_after(BOUND):
        outcomes = await engine.run_batch(lock_for_3, items, bridge=runner, workers=2)
    assert statuses(outcomes) == {"ok": 3, "error": 2}
    argument, result = outcomes[2].error, outcomes[3].error
    assert isinstance(argument, engine.SerializationError)
    assert argument.direction == "argument"
    assert isinstance(result, engine.SerializationError)
    assert result.direction == "result"
    assert [o.value for o in outcomes if o.status is engine.Status.OK] == [0, 1, 4]


async def test_a_function_that_cannot_be_pickled_fails_the_batch(
    dask_client: distributed.Client,
) -> None:
    lock = threading.Lock()
    runner = DaskRunner(dask_client)
    expected = pytest.RaisesGroup(engine.SerializationError, flatten_subgroups=True)
    with trio.fail_after(BOUND), expected:
        await engine.run_batch(lambda x: (lock, x), range(3), bridge=runner, workers=1)
    assert runner.statistics().tasks == 0


async def test_a_lost_scheduler_fails_the_batch_with_an_outcome_for_every_item(
    dask_session_client: distributed.Client,  # its threads are the session's, not this test's
) -> None:
    cluster = await trio.to_thread.run_sync(start_cluster, 1)
    client: distributed.Client | None = None
    try:
        client = await trio.to_thread.run_sync(lambda: connect(cluster, timeout=1.0))
        runner = DaskRunner(client)
        expected = pytest.RaisesGroup(trio.BrokenResourceError, flatten_subgroups=True)
        with trio.fail_after(BOUND), expected as caught:
            async with engine.map_batch(nap, range(400), bridge=runner, workers=1) as batch:
                async for outcome in batch:
                    if outcome.index == 10:
                        cluster.kill()
        (lost,) = leaves(caught.value)
        assert "lost its scheduler" in str(lost)
        results = batch.results()
        assert [o.index for o in results] == list(range(400))
        counts = statuses(results)
        assert counts["ok"] >= 11
        assert counts["ok"] + counts["cancelled"] == 400
    finally:
        cluster.kill()
        if client is not None:
            await trio.to_thread.run_sync(client.close)


def test_the_runner_wants_a_synchronous_client() -> None:
    with pytest.raises(TypeError, match=r"client must be a synchronous distributed\.Client"):
        DaskRunner("tcp://127.0.0.1:8786")  # type: ignore[arg-type]  # the mistake under test


@pytest.mark.subprocess
def test_the_compute_page_shows_what_its_example_prints(
    dask_client: distributed.Client, dask_cluster: Cluster
) -> None:
    # On the session's cluster: the example starts its own without an address.
    example = ROOT / "docs" / "examples" / "dask_batch.py"
    result = subprocess.run(
        [sys.executable, str(example), dask_cluster.address],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    page = (ROOT / "docs" / "compute.md").read_text()
    shown = page.split("<!-- example output -->\n```\n", 1)[1].split("```", 1)[0]
    assert result.stdout == shown
