"""The engine's own batch runners: processes, threads, async functions (private).

Each is a :class:`engine._runner.BatchRunner`: it runs one call of a
batch and reports what became of each item. The process runner holds one
of its pool's workers for the call through the narrow :class:`Lease`
(``_processes.lease_worker``), and watches the call on the pool's
progress board (``_board``): how many items it has started, and, for the
batch, where to cut it so that a worker out of work can take the rest.

A call marked ``at_most_once`` is never cut, and a process call so marked
is killed when the item it runs reaches its own deadline (the board says
when that item started), so that the batch can end that item, and those
whose results died with it, without running any of them again. Sending
the results back then has a deadline of its own: it is no item's time.
"""

from __future__ import annotations

import array
import contextlib
import functools
import logging
import math
import pickle
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol

import attrs
import trio

from ._board import NO_LIMIT, CallSlot, Slot
from ._exceptions import SerializationError, WorkerCrashed
from ._processes import ProcessPool, lease_worker, pickle_call
from ._runner import (
    Call,
    Chunk,
    ChunkReport,
    Finished,
    ResultsLost,
    Rows,
    lost_with_the_worker,
    too_slow,
)
from ._schedule import chunk_deadline, may_start
from ._threads import to_thread

logger = logging.getLogger("engine.batch")


# -- processes -----------------------------------------------------------------


def _portable(exc: BaseException) -> BaseException:
    """The exception itself if it survives pickling, else a stand-in that says what it was."""
    try:
        pickle.loads(pickle.dumps(exc, protocol=pickle.HIGHEST_PROTOCOL))
    except Exception:
        return RuntimeError(f"{type(exc).__qualname__}: {exc} (the original could not be pickled)")
    return exc


def run_chunk_in_worker(
    fn: Callable[[Any], object],
    items: list[Any],
    stop_after: float = math.inf,
    board: tuple[str, int] | None = None,
    item_times: bool = False,
) -> tuple[array.array[float], dict[int, BaseException], bytes]:
    """Worker side: each item's run time, the failed ones' errors, every result pickled together.

    Items run in order while :func:`may_start` allows, and only before the
    board's limit (the parent gives the rest to another worker); the parent
    counts those past the run times as never started. The items arrive
    as one pickle, and the results travel as one (one ``loads`` in the
    parent, not one per item); only when that fails are they pickled one
    by one, to say which item's result could not travel. Errors are keyed
    by position in the chunk; a failed item's result is ``None``. With
    ``item_times``, each item's start time goes on the board too, for the
    parent to end it at its own deadline, and then when the results began
    to go back.
    """
    ran = array.array("d")
    errors: dict[int, BaseException] = {}
    values: list[object] = []
    slot = None
    if board is not None:
        # Progress and cuts are an optimisation: without the board, run unwatched.
        with contextlib.suppress(OSError):
            slot = Slot(*board)
    call_started = time.perf_counter()
    for position, item in enumerate(items):
        started = time.perf_counter()
        left = len(items) - position if slot is None else min(len(items), slot.limit()) - position
        if position and not may_start(started - call_started, position, left, stop_after):
            break
        if slot is not None:
            # Claim the item, then look for a cut: the parent lowers the
            # limit before it reads the claims (see _board).
            if item_times:
                slot.report_time(time.monotonic_ns())
            slot.report(position + 1)
            if position >= slot.limit():
                slot.report(position)
                break
        try:
            value = fn(item)
        except Exception as exc:
            ran.append(time.perf_counter() - started)
            errors[position] = _portable(exc)
            values.append(None)
            continue
        ran.append(time.perf_counter() - started)
        values.append(value)
    if item_times and slot is not None:
        # No item runs from here on: pickling and sending the results is not
        # the last item's time (the parent gives it a deadline of its own).
        slot.report_sending(time.monotonic_ns())
    try:
        return ran, errors, pickle.dumps(values, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception:
        pass
    for position, value in enumerate(values):
        try:
            pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as exc:
            errors[position] = SerializationError(
                "result", f"of item: {type(value).__name__} ({exc})"
            )
            values[position] = None
    return ran, errors, pickle.dumps(values, protocol=pickle.HIGHEST_PROTOCOL)


class Lease(Protocol):
    """What a process call needs of its pool while it holds a worker (see ``lease_worker``)."""

    @property
    def place(self) -> CallSlot | None:
        """The call's slot on the pool's progress board; ``None`` to run unwatched."""
        ...

    async def dispatch(self, payload: bytes, fn: Callable[..., object]) -> bytes:
        """Run a pickled call in the worker; cancelled, kill the worker."""
        ...

    async def ensure_idle_worker(self) -> None:
        """Start a worker if none is idle, so that the call's deadline excludes start-up."""
        ...

    async def replace_lost_worker(self) -> None:
        """Start a worker in place of one that was killed or died."""
        ...


@attrs.define
class ProcessRunner:
    """Calls of several items in the worker processes of a pool."""

    pool: ProcessPool
    chunked: bool = True

    async def run(
        self, fn: Any, chunk: Chunk, deadline: float, stop_after: float, call: Call
    ) -> ChunkReport:
        """Run the call in a worker: see :class:`engine._runner.BatchRunner`."""
        async with lease_worker(self.pool) as lease:
            place = lease.place
            if place is None and call.at_most_once and len(chunk) > 1:
                # Unwatched, a failed call could not say which of its
                # items ran: one item a call from now on (the pool will
                # have no board later either), the rest back in line.
                self.chunked = False
                report = await self._run(fn, chunk[:1], deadline, stop_after, lease, call)
                report.not_started.extend(index for index, _ in chunk[1:])
                return report
            if place is not None:
                call.started = place.started
                if not call.at_most_once:  # a cut may, rarely, start an item twice (see _board)
                    call.cut = place.cut
            try:
                return await self._run(fn, chunk, deadline, stop_after, lease, call)
            finally:
                call.started = call.cut = None

    async def _run(
        self, fn: Any, chunk: Chunk, deadline: float, stop_after: float, lease: Lease, call: Call
    ) -> ChunkReport:
        failure: BaseException | None = None
        items = [item for _, item in chunk]
        place = lease.place
        board = place.address if place is not None else None
        # Watched item by item: each item is ended at its own deadline.
        watched = place is not None and call.at_most_once and math.isfinite(deadline)
        payload = pickle_call(run_chunk_in_worker, (fn, items, stop_after, board, watched))
        await lease.ensure_idle_worker()
        # A started worker is ours: the deadline starts now.
        limit = math.inf if watched else chunk_deadline(deadline, len(chunk), stop_after)
        data: bytes | Exception = b""
        watch = Watch()
        with trio.move_on_after(limit) as scope:
            if watched:
                assert place is not None
                data = await _call_watched(lease, payload, fn, place, deadline, scope, watch)
            else:
                data = await _call(lease, payload, fn)
        if isinstance(data, WorkerCrashed):
            failure = data
        elif isinstance(data, Exception):
            # The call failed outside the per-item handling: the worker
            # could not unpickle the chunk (a class it cannot import).
            # Which item is unknown; alone, each says for itself. No item
            # ran, so this holds for at-most-once calls too.
            return ChunkReport(
                unknown=[index for index, _ in chunk[: call.limit]],
                failure=SerializationError(
                    "argument", f"could not be unpickled in the worker ({data})"
                ),
            )
        overdue = None
        if scope.cancelled_caught:
            failure = too_slow(deadline)
            overdue = watch.overdue
        if failure is None:
            assert isinstance(data, bytes)
            return returned(chunk, call.limit, *pickle.loads(data))
        # Still holding the worker's place: replace the lost worker now, so
        # the next item's deadline does not pay for a process start.
        await lease.replace_lost_worker()
        begun = place.started() if place is not None else 0
        kept = chunk[: call.limit]
        if watched and place is not None and place.started_at() < 0:
            # Every item it started had returned; their results died
            # with the worker while they were being sent back.
            indices = [index for index, _ in kept]
            if scope.cancelled_caught:
                failure = trio.TooSlowError(
                    f"sending the results back took longer than the item deadline of {deadline:g} s"
                )
            return ChunkReport(lost=indices[:begun], not_started=indices[begun:], failure=failure)
        return lost_with_the_worker(kept, min(begun, len(kept)), failure, overdue=overdue)


async def _call(lease: Lease, payload: bytes, fn: Any) -> bytes | Exception:
    """The call's pickled results, or the exception that ended it."""
    try:
        return await lease.dispatch(payload, fn)
    except Exception as exc:
        return exc


async def _call_watched(
    lease: Lease,
    payload: bytes,
    fn: Any,
    place: CallSlot,
    deadline: float,
    scope: trio.CancelScope,
    watch: Watch,
) -> bytes | Exception:
    """:func:`_call`, while a task ends the call when an item reaches its deadline."""
    async with trio.open_nursery() as nursery:
        nursery.start_soon(end_overdue_item, place, deadline, scope, watch)
        data = await _call(lease, payload, fn)
        nursery.cancel_scope.cancel()
    return data


@attrs.define
class Watch:
    """What the task ending overdue items saw (see :func:`end_overdue_item`)."""

    # Items the call had started when it was found overdue (the last of
    # them was): its worker may start more before the kill lands.
    overdue: int | None = None


async def end_overdue_item(
    place: CallSlot, deadline: float, scope: trio.CancelScope, watch: Watch
) -> None:
    """Cancel ``scope`` when the item the call in ``place`` runs has run for ``deadline``.

    The worker writes each item's start on the board (see
    :func:`run_chunk_in_worker`). No item starts before the call is sent,
    so none is due before ``deadline`` from now; then each look at the
    board says when the item running then is due. A call that has started
    no item by then is ended too: its worker may be running one unwatched
    (it could not open the board), or be stuck before its first. Which
    item was overdue goes in ``watch.overdue``: the worker may finish it
    and start the next before the kill lands. Once the worker starts no
    more items, sending the results back has a deadline of its own, from
    when that began.
    """
    due = trio.current_time() + deadline
    while True:
        await trio.sleep_until(due)
        # The claims first, then the time: the time is at least as new (see _board).
        started = place.started()
        if not started:
            break
        at = place.started_at()
        if at < 0:
            # It starts no more items: sending the results back has a
            # deadline of its own, from when it began.
            left = deadline - (time.monotonic_ns() + at) / 1e9
            if left <= 0:
                break
        else:
            left = deadline - (time.monotonic_ns() - at) / 1e9
            if left <= 0:
                watch.overdue = started
                break
        due = trio.current_time() + left
    scope.cancel()


def returned(
    chunk: Chunk,
    limit: int,
    ran: Sequence[float],
    errors: dict[int, BaseException],
    blob: bytes,
) -> ChunkReport:
    """The report of a process call that returned what :func:`run_chunk_in_worker` did.

    Past ``limit`` the items are another call's. If this one ran any of them
    (its worker saw the cut too late, see ``_board``), the other call's
    result is the one that counts. Those before ``limit`` it never started
    go back in line.
    """
    done = min(len(ran), limit)
    indices = [index for index, _ in chunk[:done]]
    if done < len(ran):
        ran = ran[:done]
        errors = {position: error for position, error in errors.items() if position < done}
    return ChunkReport(
        not_started=[index for index, _ in chunk[done:limit]],
        ran=ran,
        decode=functools.partial(_decode, indices, ran, errors, blob),
    )


def _decode(
    indices: list[int], ran: Sequence[float], errors: dict[int, BaseException], blob: bytes
) -> Rows:
    """A chunk's results, unpickled.

    Raises:
        ResultsLost: pickled in the worker but not loadable here (a class this
            process lacks, say), for a chunk of several items: which item's
            result it was is unknown. A lone item ends with this error instead.
    """
    try:
        values = pickle.loads(blob)[: len(indices)]
    except Exception as exc:
        failure = ResultsLost("result", f"could not be unpickled here ({exc})")
        if len(indices) > 1:
            raise failure from exc
        return Rows(indices, [None], ran, {0: errors.get(0, failure)})
    return Rows(indices, values, ran, errors)


# -- threads ---------------------------------------------------------------------


@attrs.define(eq=False)
class _ThreadChunk:
    """Shared by the thread running a chunk and the task watching its deadlines."""

    clock: trio.abc.Clock
    position: int = 0  # index into the chunk of the item running now
    item_started: float = 0.0
    abandoned: bool = False
    started: int = 0  # items started so far
    limit: int = NO_LIMIT  # the batch gave the items from here on to another call
    stopped: int | None = None  # where the thread stopped, by its clock or a cut
    finished: list[Finished] = attrs.Factory(list)
    lock: threading.Lock = attrs.Factory(threading.Lock)

    def cut(self, limit: int) -> None:
        # Under the lock the thread claims its items with, so that an item is
        # either started here or taken, never both.
        with self.lock:
            self.limit = limit

    def claim(self, position: int) -> bool:
        """In the thread: whether to start the item at ``position`` (and say so)."""
        with self.lock:
            if self.abandoned:
                return False
            if position >= self.limit:
                self.stopped = position
                return False
            self.position = position
            self.started = position + 1
            self.item_started = self.clock.current_time()
            return True

    def report(self, chunk: Chunk, deadline: float) -> ChunkReport:
        """Once the thread has stopped, or been abandoned: what became of each item."""
        report = ChunkReport(finished=self.finished)
        if self.stopped is not None:
            report.not_started = [index for index, _ in chunk[self.stopped : self.limit]]
        if self.abandoned:
            report.timed_out = [(chunk[self.position][0], deadline)]
            report.not_started = [index for index, _ in chunk[self.position + 1 : self.limit]]
            report.failure = too_slow(deadline)
        return report


def _run_in_thread(
    state: _ThreadChunk, fn: Callable[[Any], object], chunk: Chunk, stop_after: float
) -> None:
    """The thread's side of a call: its items in order, while its clock and the cut allow."""
    call_started = time.perf_counter()
    for position, (index, item) in enumerate(chunk):
        started = time.perf_counter()
        left = min(len(chunk), state.limit) - position
        if position and not may_start(started - call_started, position, left, stop_after):
            state.stopped = position
            return
        if not state.claim(position):
            return
        try:
            result = Finished(index, True, fn(item), None, 0.0)
        except Exception as exc:
            result = Finished(index, False, None, exc, 0.0)
        result.ran = time.perf_counter() - started
        with state.lock:
            if not state.abandoned:
                state.finished.append(result)


async def _abandon_overdue(state: _ThreadChunk, deadline: float, scope: trio.CancelScope) -> None:
    """Cancel ``scope``, abandoning the thread, when its item has run for ``deadline``."""
    if not math.isfinite(deadline):
        return
    while True:
        with state.lock:
            due = state.item_started + deadline
            position = state.position
        await trio.sleep_until(due)
        with state.lock:
            if state.position == position and state.item_started + deadline <= due:
                state.abandoned = True  # the thread stops before its next item
                break
    scope.cancel()  # the hung thread is abandoned, and counted as such


@attrs.define
class ThreadRunner:
    """Calls of several items in threads; each item is watched, and nothing runs twice."""

    limiter: trio.CapacityLimiter
    chunked: bool = True
    # The batch's own limiter bounds its threads; trio's default one (40) must not.
    unlimited: trio.CapacityLimiter = attrs.Factory(lambda: trio.CapacityLimiter(math.inf))

    async def run(
        self, fn: Any, chunk: Chunk, deadline: float, stop_after: float, call: Call
    ) -> ChunkReport:
        """Run the call in a thread: see :class:`engine._runner.BatchRunner`."""
        state = _ThreadChunk(clock=trio.lowlevel.current_clock())
        async with self.limiter:  # a thread is ours: deadlines start now
            state.item_started = trio.current_time()
            call.started = lambda: state.started
            call.cut = state.cut
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(_abandon_overdue, state, deadline, nursery.cancel_scope)
                    await to_thread(
                        _run_in_thread, state, fn, chunk, stop_after, limiter=self.unlimited
                    )
                    nursery.cancel_scope.cancel()
            finally:
                call.started = call.cut = None
        return state.report(chunk, deadline)


# -- async functions ----------------------------------------------------------------


@attrs.define
class AsyncRunner:
    """One trio task a call, one item a call, each in its own cancel scope."""

    chunked: bool = False

    async def run(
        self,
        fn: Callable[[Any], Awaitable[object]],
        chunk: Chunk,
        deadline: float,
        stop_after: float,
        call: Call,
    ) -> ChunkReport:
        """Run the call's items as trio code: see :class:`engine._runner.BatchRunner`."""
        report = ChunkReport()
        for index, item in chunk:
            started = trio.current_time()
            with trio.move_on_after(deadline) as scope:
                try:
                    value = await fn(item)
                except Exception as exc:
                    ran = trio.current_time() - started
                    report.finished.append(Finished(index, False, None, exc, ran))
                    continue
            ran = trio.current_time() - started
            if scope.cancelled_caught:
                report.timed_out.append((index, ran))
            else:
                report.finished.append(Finished(index, True, value, None, ran))
        if report.timed_out:
            report.failure = too_slow(deadline)
        return report
