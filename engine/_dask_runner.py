"""A batch runner on a Dask cluster: :class:`DaskRunner` (private).

Each call of a batch is one Dask task: the chunk's function and items
travel as one pickle, run in the worker by ``run_chunk_in_worker`` (the
process pool's own loop, with its clock), and come back as the process
pool's do: run times, the failed items' errors and one pickle of the
values. The client is dask.distributed's synchronous ``Client``: submitting
a task only queues a message on the client's own event loop, the task's
end is signalled to trio by a done callback, and the calls that do block
(fetching a result, cancelling, ending a worker) go through the
engine's thread bridge.

Dask cannot see where a running task is in its chunk, nor interrupt it:

- a call gets ``chunk_deadline(...)`` for the whole chunk; when that runs
  out its future is cancelled and its items are of unknown fate (each runs
  again alone, as on an unwatched process pool);
- a task cancelled while a worker runs it goes on running there: it is
  counted as abandoned, and, for a deadline, its worker's process is
  ended (``kill_hung_workers``) and its nanny starts a new one, so that a
  hung task does not keep a worker that the scheduler counts as free;
- a task whose worker died more often than the scheduler's
  ``allowed-failures`` ends with ``KilledWorker``: its items are of
  unknown fate, as when a process worker dies;
- a scheduler that goes away fails the batch with
  ``trio.BrokenResourceError``.
"""

from __future__ import annotations

import contextlib
import functools
import os
import pickle
import threading
import uuid
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import attrs
import trio

from ._batch_runners import returned, run_chunk_in_worker
from ._counters import Tally
from ._exceptions import SerializationError, WorkerCrashed
from ._runner import (
    Call,
    Chunk,
    ChunkReport,
    Finished,
    Rows,
    lost_with_the_worker,
    too_slow,
)
from ._schedule import chunk_deadline
from ._threads import to_thread

if TYPE_CHECKING:
    import distributed

# A cancel or a kill that the cluster does not answer within this many
# seconds is given up on: a batch's cancellation must end in bounded time.
CLEANUP_SECONDS = 10.0
# Dask's reason on futures the client cancels when it loses its scheduler.
_SCHEDULER_LOST = "scheduler-connection-lost"
# Task keys start with this, so the cluster's dashboard names the engine's tasks.
KEY_PREFIX = "engine-chunk-"
# A killed worker's process exits this long after it says it will.
_EXIT_AFTER = 0.05
# How often the runner looks whether the scheduler has let a killed worker go.
_POLL_SECONDS = 0.02
# The reason the runner gives Dask when it cancels a task.
_REASON = "engine: item deadline or batch cancelled"


@attrs.frozen
class DaskRunnerStatistics:
    """What a :class:`DaskRunner` has done so far.

    Attributes:
        tasks: Dask tasks submitted (one per call of a batch).
        in_flight: tasks submitted and not yet ended here.
        cancelled: tasks cancelled by the runner (a deadline, a cancelled batch).
        abandoned: of those, tasks a worker was running when they were
            cancelled: Dask cannot interrupt them, so they ran on (unless
            their worker was killed).
        workers_killed: worker processes ended because a task ran past its
            deadline (their nannies start new ones).
        killed_worker: tasks that ended with Dask's ``KilledWorker`` (their
            worker died more often than the scheduler allows).
    """

    tasks: int = 0
    in_flight: int = 0
    cancelled: int = 0
    abandoned: int = 0
    workers_killed: int = 0
    killed_worker: int = 0


class _Tally(Tally[DaskRunnerStatistics]):
    """The counters behind :class:`DaskRunnerStatistics`."""


def run_dask_chunk(
    payload: bytes, stop_after: float
) -> tuple[Any, dict[int, BaseException], bytes] | str:
    """Worker side: a chunk's results as ``run_chunk_in_worker`` gives them.

    Returns, instead, why the payload could not be unpickled here (a class
    this worker cannot import), as text: no item of it ran.
    """
    try:
        fn, items = pickle.loads(payload)
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return run_chunk_in_worker(fn, items, stop_after)


def _portable_chunk(fn: object, chunk: Chunk) -> tuple[bytes | None, Chunk, list[Finished]]:
    """The call's payload, the items it carries, and those that cannot travel.

    Raises:
        SerializationError: ``fn`` itself cannot be pickled.
    """
    # Here, not at the top: the engine imports without Dask (cloudpickle is Dask's).
    import cloudpickle  # type: ignore[import-untyped]  # ships no type information

    try:
        return cloudpickle.dumps((fn, [item for _, item in chunk])), chunk, []
    except Exception:
        pass
    try:
        cloudpickle.dumps(fn)
    except Exception as exc:
        raise SerializationError("argument", f"the function {fn!r:.80} ({exc})") from exc
    travelling: Chunk = []
    failed: list[Finished] = []
    for index, item in chunk:
        try:
            cloudpickle.dumps(item)
        except Exception as exc:
            error = SerializationError("argument", f"item {index}: {item!r:.80} ({exc})")
            error.__cause__ = exc
            failed.append(Finished(index, False, None, error, 0.0))
        else:
            travelling.append((index, item))
    if not travelling:
        return None, travelling, failed
    return cloudpickle.dumps((fn, [item for _, item in travelling])), travelling, failed


def _add_finished(report: ChunkReport, finished: list[Finished]) -> None:
    """Add ``finished`` to ``report``, whether it holds its results decoded or not."""
    decode = report.decode
    if decode is None:
        report.finished.extend(finished)
        return

    def decode_all() -> Rows:
        rows = decode()
        extra = Rows.of(finished)
        errors = dict(rows.errors)
        errors.update({len(rows.indices) + at: error for at, error in extra.errors.items()})
        return Rows(
            rows.indices + extra.indices,
            rows.values + extra.values,
            [*rows.ran, *extra.ran],
            errors,
        )

    report.decode = decode_all


def _outcome(future: distributed.Future[Any]) -> tuple[bool, Any]:
    """In a thread: ``(True, result)``, or ``(False, what the task raised)``."""
    try:
        return True, future.result()
    except BaseException as exc:  # the task's error, or the future's cancellation
        return False, exc


def _workers_running(client: distributed.Client, keys: set[str]) -> list[str]:
    """In a thread: the workers the scheduler has given any of ``keys`` to."""
    processing: dict[str, Iterable[str]] = client.processing()  # type: ignore[no-untyped-call]  # untyped in distributed
    return [worker for worker, held in processing.items() if keys.intersection(held)]


@attrs.define(eq=False)
class DaskRunner:
    """Run a batch's calls as Dask tasks: ``map_batch(..., bridge=DaskRunner(client))``.

    ::

        with distributed.Client(address) as client:
            runner = engine.DaskRunner(client)
            async with engine.map_batch(
                scan, symbols, bridge=runner, workers=sum(client.nthreads().values())
            ) as batch:
                ...

    Items travel in chunks sized by measured time, as on the process
    bridge (a task costs milliseconds of round trip). ``fn`` and the items
    are pickled with cloudpickle; an item that cannot be pickled ends as
    an ``error`` (:class:`engine.SerializationError`), as does one whose
    result cannot. Pass ``workers=`` to ``map_batch``: the calls it keeps in
    flight should match the cluster's threads, since an item's deadline
    counts from when its task is submitted.

    Args:
        client: a synchronous ``distributed.Client``, owned by the caller.
        kill_hung_workers: end the process of a worker whose task ran past
            its deadline (its nanny starts a new one), so that a task Dask cannot
            interrupt does not keep the worker busy while the scheduler
            counts it free. ``False`` (for a cluster shared with others, or
            workers without nannies) leaves it running and counted.

    Cancellation:
        A cancelled batch cancels each of its tasks (``Client.cancel``)
        before its block ends, waiting at most ``CLEANUP_SECONDS`` for the
        cluster's answer. Tasks a worker was running then run on to their
        end (Dask cannot interrupt Python code) and are counted in
        :meth:`statistics` as ``abandoned``.

    Raises:
        trio.BrokenResourceError: from the batch, when the client has lost
            its scheduler (the items without an outcome end ``cancelled``).
    """

    client: distributed.Client
    kill_hung_workers: bool = attrs.field(default=True, kw_only=True)
    chunked: bool = attrs.field(default=True, init=False)
    _tally: _Tally = attrs.field(factory=_Tally, init=False)

    def __attrs_post_init__(self) -> None:
        import distributed

        if not isinstance(self.client, distributed.Client) or self.client.asynchronous:
            raise TypeError(f"client must be a synchronous distributed.Client, got {self.client!r}")
        if not isinstance(self.kill_hung_workers, bool):
            raise TypeError(f"kill_hung_workers must be a bool, got {self.kill_hung_workers!r}")

    def statistics(self) -> DaskRunnerStatistics:
        """A frozen snapshot of the runner's counters."""
        return self._tally.snapshot()

    async def run(
        self, fn: Any, chunk: Chunk, deadline: float, stop_after: float, call: Call
    ) -> ChunkReport:
        """Run the call as one Dask task: see :class:`engine.BatchRunner`."""
        if call.at_most_once and len(chunk) > 1:
            # A failed task cannot say which of its items ran: one item a
            # call, the rest back in line. Only for this batch's calls: the
            # runner is the caller's, and other batches may share it.
            report = await self.run(fn, chunk[:1], deadline, stop_after, call)
            report.not_started.extend(index for index, _ in chunk[1:])
            return report
        payload, travelling, failed = _portable_chunk(fn, chunk)
        if payload is None:
            await trio.lowlevel.checkpoint()
            return ChunkReport(finished=failed)
        report = await self._run(payload, travelling, deadline, stop_after, call)
        if failed:
            _add_finished(report, failed)
        return report

    async def _run(
        self, payload: bytes, chunk: Chunk, deadline: float, stop_after: float, call: Call
    ) -> ChunkReport:
        self._check_connected()
        key = f"{KEY_PREFIX}{uuid.uuid4().hex}"
        future = self.client.submit(run_dask_chunk, payload, stop_after, key=key, pure=False)
        tally = self._tally
        tally.tasks += 1
        tally.in_flight += 1
        try:
            done = _done_event(future)
            with trio.move_on_after(chunk_deadline(deadline, len(chunk), stop_after)) as scope:
                await done.wait()
            if scope.cancelled_caught:
                await self._end([future], hung=True)
                return ChunkReport(unknown=[i for i, _ in chunk], failure=too_slow(deadline))
            ok, value = await to_thread(_outcome, future)
        except trio.Cancelled:
            await self._end([future], hung=False)
            raise
        finally:
            tally.in_flight -= 1
        if not ok:
            return self._failed(future, chunk, value)
        if isinstance(value, str):
            return ChunkReport(
                unknown=[index for index, _ in chunk],
                failure=SerializationError(
                    "argument", f"could not be unpickled in the worker ({value})"
                ),
            )
        ran, errors, blob = value
        return returned(chunk, call.limit, ran, errors, blob)

    def _check_connected(self) -> None:
        status = self.client.status
        if status != "running":
            raise trio.BrokenResourceError(
                f"the Dask client is {status!r}, not connected to its scheduler"
                f" ({self.client.scheduler.address if self.client.scheduler else 'no address'})"
            )

    def _failed(
        self, future: distributed.Future[Any], chunk: Chunk, error: BaseException
    ) -> ChunkReport:
        """The report of a task that did not return, or raises what ends the batch."""
        from distributed.client import FutureCancelledError
        from distributed.scheduler import KilledWorker

        if isinstance(error, KilledWorker):
            self._tally.killed_worker += 1
            crash = WorkerCrashed(
                f"Dask task {future.key} (KilledWorker: the workers running it died)",
                exit_code=None,
                signal=None,
            )
            crash.__cause__ = error
            return lost_with_the_worker(chunk, 0, crash)
        if isinstance(error, FutureCancelledError) and error.reason == _SCHEDULER_LOST:
            raise trio.BrokenResourceError(
                "the Dask client lost its scheduler while the batch ran"
            ) from error
        # Not an item's error (run_chunk_in_worker catches those): the task
        # itself failed or was cancelled by someone else. Its items' fate is
        # unknown, as when a worker dies.
        failure = WorkerCrashed(f"Dask task {future.key} ({error!r})", exit_code=None, signal=None)
        failure.__cause__ = error
        return lost_with_the_worker(chunk, 0, failure)

    async def _end(self, futures: list[distributed.Future[Any]], *, hung: bool) -> None:
        """Cancel ``futures``, count those a worker runs, and end its process if ``hung``."""
        client = self.client
        if client.status != "running":
            return  # it lost its scheduler, which has forgotten the tasks
        keys = {str(future.key) for future in futures}
        tally = self._tally
        with trio.CancelScope(shield=True) as scope:
            scope.relative_deadline = CLEANUP_SECONDS
            workers: list[str] = []
            with contextlib.suppress(Exception):
                workers = await to_thread(_workers_running, client, keys)
            with contextlib.suppress(Exception):
                await to_thread(functools.partial(client.cancel, futures, reason=_REASON))
                tally.cancelled += len(futures)  # only once the cluster took the cancel
            tally.abandoned += len(workers)
            if hung and workers and self.kill_hung_workers:
                with contextlib.suppress(Exception):
                    with trio.move_on_after(CLEANUP_SECONDS / 2):
                        await _kill(client, workers)
                    tally.workers_killed += len(workers)


def _exit_worker() -> None:
    """On a worker (not in the thread a hung task holds): end its process.

    Shortly after, from a timer thread, so that the answer that it will
    leaves first.
    """
    timer = threading.Timer(_EXIT_AFTER, os._exit, args=(1,))
    timer.daemon = True
    timer.start()


async def _kill(client: distributed.Client, workers: list[str]) -> None:
    """End the processes of ``workers``, and wait for new ones.

    Returns once the scheduler has let them go and has as many workers as
    before (their nannies start new ones): the next task then goes to a
    worker that runs it, and its deadline does not pay for a process start.
    The caller bounds the wait with a cancel scope.
    """
    before = set(await to_thread(_scheduler_workers, client))
    run = functools.partial(client.run, _exit_worker, workers=workers, on_error="ignore")
    await to_thread(run)
    while True:
        now = set(await to_thread(_scheduler_workers, client))
        if not now.intersection(workers) and len(now) >= len(before):
            return
        await trio.sleep(_POLL_SECONDS)


def _scheduler_workers(client: distributed.Client) -> dict[str, Any]:
    info: dict[str, Any] = client.scheduler_info(n_workers=-1)
    workers: dict[str, Any] = info.get("workers", {})
    return workers


def _done_event(future: distributed.Future[Any]) -> trio.Event:
    """An event set, in this trio run, when ``future`` ends (returns, fails or is cancelled)."""
    done = trio.Event()
    token = trio.lowlevel.current_trio_token()

    def wake(_: object) -> None:
        # Called in Dask's callback thread, maybe after this run has ended.
        with contextlib.suppress(trio.RunFinishedError):
            token.run_sync_soon(done.set)

    future.add_done_callback(wake)  # type: ignore[no-untyped-call]  # untyped in distributed
    return done
