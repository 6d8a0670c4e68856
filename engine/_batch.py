"""map_batch: a function over many items, with exactly one outcome per item.

- every item ends as exactly one of ok, error, timeout, crashed, cancelled;
- an item's deadline starts when a worker takes it, never while it queues;
- never more calls in flight than ``workers``;
- small items travel in chunks, sized by each worker's measured speed and
  ended by a clock in the worker, so dispatch cost is amortised; a worker
  out of work takes part of a slower call's rest, which goes on without
  a pause (``_schedule``);
- a chunk that times out or whose worker dies is split: the item it was
  running runs again alone, first in line, the others again or for the
  first time, so each still gets its own true outcome, and a hung item is
  reported within twice its deadline (``_batch_failures``);
- with ``at_most_once``, no item runs twice: a hung item is ended at its
  own deadline, and it and the items whose results died with its worker
  end with that failure instead of running again.

This module is the public face: :class:`Batch` is a handle on a
``_batch_run.BatchRun`` (the workers) and an ``_outcome.Recorder`` (the
outcomes); the calls run through a :class:`BatchRunner`
(``_batch_runners`` for the built-in bridges).
"""

from __future__ import annotations

import enum
import math
import os
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, Generic, Literal, TypeVar

import attrs
import trio

from ._asyncwith import async_with_only
from ._batch_run import BatchRun
from ._batch_runners import AsyncRunner, ProcessRunner, ThreadRunner
from ._outcome import Outcome as Outcome  # re-exported: engine imports it from here
from ._outcome import Recorder
from ._outcome import Status as Status  # re-exported: engine imports it from here
from ._processes import ProcessPool, default_pool, pickle_call
from ._runner import BatchRunner
from ._schedule import Limits
from ._validation import check_choice, check_count, check_duration

T = TypeVar("T")
R = TypeVar("R")


@attrs.frozen
class BatchStatistics:
    """A snapshot of a batch.

    Attributes:
        total: items in the batch.
        completed: items with an outcome other than cancelled.
        ok, error, timeout, crashed, cancelled: outcomes so far, by status.
        in_flight: calls running now (never more than ``workers``).
        calls: calls made so far (chunks and single re-runs).
        split_chunks: calls of several items that failed (timed out, or
            their worker died); the item each was running then ran again
            alone, or, with ``at_most_once``, ended with that failure.
    """

    total: int
    completed: int
    ok: int
    error: int
    timeout: int
    crashed: int
    cancelled: int
    in_flight: int
    calls: int
    split_chunks: int


class Batch(Generic[T, R]):
    """What :func:`map_batch` yields: iterate it for outcomes in completion order."""

    def __init__(self, recorder: Recorder[T, R], run: BatchRun[T, R]) -> None:
        self._recorder = recorder
        self._run = run

    def __aiter__(self) -> AsyncIterator[Outcome[T, R]]:
        return self._recorder.receive

    def results(self) -> list[Outcome[T, R]]:
        """Every outcome, in input order; complete once the batch's block has ended.

        Raises:
            RuntimeError: some item has no outcome yet (the batch still runs).
        """
        return self._recorder.results()

    def cancel(self) -> None:
        """Stop the batch: running calls are cancelled, unfinished items end ``cancelled``."""
        self._run.cancel_scope.cancel()

    def statistics(self) -> BatchStatistics:
        """A frozen snapshot of the batch's progress."""
        counts = self._recorder.counts
        return BatchStatistics(
            total=len(self._recorder.items),
            completed=sum(counts.values()) - counts[Status.CANCELLED],
            ok=counts[Status.OK],
            error=counts[Status.ERROR],
            timeout=counts[Status.TIMEOUT],
            crashed=counts[Status.CRASHED],
            cancelled=counts[Status.CANCELLED],
            in_flight=self._run.in_flight,
            calls=self._run.calls,
            split_chunks=self._run.split,
        )


class Bridge(enum.StrEnum):
    """Where the items of a batch run (``map_batch(..., bridge=...)``)."""

    PROCESS = "process"
    """CPU-bound functions, in the worker processes of a pool."""
    THREAD = "thread"
    """Blocking functions, in threads."""
    ASYNC = "async"
    """Async functions, as trio tasks."""


# The enum's values again as a Literal (a type checker cannot derive one from
# the other; tests/test_quality.py holds the two equal). Every option enum is
# declared with this shape.
BridgeName = Literal["process", "thread", "async"]
"""The values of :class:`Bridge`, as the strings ``map_batch`` also accepts."""

# What map_batch looks for in a bridge object (see BatchRunner).
_RUNNER_MEMBERS = ("chunked", "run")


def map_batch(
    fn: Callable[[T], Any],
    items: Iterable[T],
    *,
    workers: int | None = None,
    bridge: Bridge | BridgeName | BatchRunner = "process",
    item_deadline: float = math.inf,
    on_progress: Callable[[int, int], object] | None = None,
    chunk_size: int | None = None,
    pool: ProcessPool | None = None,
    at_most_once: bool = False,
) -> AbstractAsyncContextManager[Batch[T, Any]]:
    """Run ``fn`` over ``items`` with one outcome per item.

    ::

        async with engine.map_batch(scan, symbols, workers=4, item_deadline=60) as batch:
            async for outcome in batch:          # completion order
                ...
        outcomes = batch.results()               # input order, one per item

    Like a nursery, the block ends when every item has an outcome; wrap it
    in ``trio.fail_after`` / ``move_on_after`` to bound the whole batch, or
    call ``batch.cancel()``. However the block ends, ``batch.results()``
    then holds exactly one outcome per item (``cancelled`` for unfinished
    ones) and no worker is left running.

    Args:
        fn: for ``"process"`` and ``"thread"``, a plain function of one item
            (for processes: picklable, defined at module level); for
            ``"async"``, an async function.
        items: the inputs; read once, up front.
        workers: the most calls in flight at once. Defaults to the pool's
            size (process), the CPU count (thread), or 10 (async).
        bridge: ``"process"`` (CPU-bound work), ``"thread"`` (blocking I/O),
            ``"async"`` (trio code), as a :class:`Bridge` or its string, or
            any :class:`BatchRunner`, such as
            :class:`engine.testing.VirtualBridge`.
        item_deadline: seconds an item may run, counted from when a worker
            takes it; ``math.inf`` (default) for none.
        on_progress: called as ``on_progress(completed, total)`` in the
            trio thread after each item completes.
        chunk_size: items per call; ``None`` (default) sizes calls by time:
            each worker's measured speed, and a clock in the worker that ends
            a call of slower items early. Ignored for ``"async"``.
        pool: the process pool to use; defaults to the run's default pool.
        at_most_once: never run an item twice, for functions with side
            effects. By default a call of several items that times out, or
            whose worker dies, runs its items again (the one it was running
            alone, with its whole deadline), so each gets its own true
            outcome and a hung item is reported within twice its deadline.
            With ``at_most_once``, a process call is ended when the item it
            runs reaches its own deadline, counted from that item's start;
            that item ends ``timeout`` (or ``crashed``, if its worker died),
            the items before it in the call, whose results died with the
            worker, end ``crashed``, and only the items it never started
            run, once. Sending a call's results back has a deadline of its
            own, from when its worker starts no more items. Slow calls are
            not shared between workers. Threads and async functions never
            run an item twice either way.

    Returns:
        An async context manager yielding the :class:`Batch`.

    Raises:
        ValueError: at call time, for a bad number or bridge name (named).
        TypeError: at call time, for an argument of the wrong type (named),
            or a bridge object that lacks what a :class:`BatchRunner` has.
    """
    listed = list(items)
    deadline = check_duration("item_deadline", item_deadline)
    if chunk_size is not None:
        check_count("chunk_size", chunk_size, minimum=1)
    if workers is not None:
        check_count("workers", workers, minimum=1)
    if on_progress is not None and not callable(on_progress):
        raise TypeError(f"on_progress must be callable, got {on_progress!r}")
    if not isinstance(at_most_once, bool):
        raise TypeError(f"at_most_once must be a bool, got {at_most_once!r}")
    runner = _check_bridge(bridge, fn)
    batch = _open_batch(
        fn, listed, runner, workers, deadline, on_progress, chunk_size, pool, at_most_once
    )
    return async_with_only(batch, call="engine.map_batch", target="batch", loop="outcome")


def _check_bridge(bridge: object, fn: Callable[..., Any]) -> Bridge | BatchRunner:
    if isinstance(bridge, str):
        kind = check_choice("bridge", bridge, Bridge)
        if kind is Bridge.PROCESS:
            pickle_call(fn, ())  # a lambda or a local function fails here, not in a worker
        return kind
    missing = [name for name in _RUNNER_MEMBERS if not hasattr(bridge, name)]
    if missing:
        raise TypeError(
            f"bridge must be 'process', 'thread', 'async' or a BatchRunner, got {bridge!r},"
            f" which has no {' and no '.join(missing)}"
        )
    return bridge  # type: ignore[return-value]  # has what a BatchRunner has


@asynccontextmanager
async def _open_batch(
    fn: Any,
    items: list[Any],
    bridge: Bridge | BatchRunner,
    workers: int | None,
    deadline: float,
    on_progress: Callable[[int, int], object] | None,
    chunk_size: int | None,
    pool: ProcessPool | None,
    at_most_once: bool,
) -> AsyncIterator[Batch[Any, Any]]:
    runner: BatchRunner
    if bridge is Bridge.PROCESS:
        pool = pool if pool is not None else await default_pool()
        count = workers or pool.workers
        runner = ProcessRunner(pool)
    elif bridge is Bridge.THREAD:
        count = workers or os.cpu_count() or 1
        runner = ThreadRunner(trio.CapacityLimiter(count))
    elif bridge is Bridge.ASYNC:
        count = workers or 10
        runner = AsyncRunner()
    else:
        assert not isinstance(bridge, Bridge)
        count = workers or 1
        runner = bridge
    recorder: Recorder[Any, Any] = Recorder(items, on_progress)
    limits = Limits(len(items), count, deadline, chunk_size)
    run = BatchRun(fn, recorder, runner, limits, at_most_once=at_most_once)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(run.run)
        yield Batch(recorder, run)


async def run_batch(
    fn: Callable[[T], Any],
    items: Iterable[T],
    **options: Any,
) -> list[Outcome[T, Any]]:
    """``map_batch`` collected: every outcome, in input order.

    Takes the same keyword arguments as :func:`map_batch`. To keep the
    outcomes of a batch that is cancelled from outside, use
    :func:`map_batch` and ``batch.results()`` after its block.
    """
    async with map_batch(fn, items, **options) as batch:
        pass
    return batch.results()
