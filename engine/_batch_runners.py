"""How one chunk of a batch runs on each bridge, and what comes back (private).

A runner takes a chunk (a list of ``(index, item)``), a per-item deadline and
a time after which to start no more items, runs it, and reports per item:
finished (ok or error, with its run time), timed out for certain, not
started, lost (it ran, but its result died with the worker), or of unknown
fate (running when the worker was killed or died; the batch re-runs each
such item alone). While it runs, the batch may cut it (see :class:`Call`):
the items from the cut on are another call's, and the report leaves them out.

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

from ._board import NO_LIMIT, Board, Slot
from ._exceptions import SerializationError, WorkerCrashed
from ._processes import ProcessPool, pickle_call
from ._threads import to_thread

logger = logging.getLogger("engine.batch")


@attrs.define
class Finished:
    index: int
    ok: bool
    value: object
    error: BaseException | None
    ran: float


@attrs.frozen
class Rows:
    """The finished items of one call, by column.

    Thousands finish per call: a list per column costs far less to send,
    unpickle and read than an object (or a tuple) per item.
    """

    indices: list[int]
    values: list[object]  # None where the item failed
    ran: Sequence[float]  # seconds each item ran
    errors: dict[int, BaseException]  # by position in the columns: the items that failed

    @classmethod
    def of(cls, finished: list[Finished]) -> Rows:
        return cls(
            [d.index for d in finished],
            [d.value for d in finished],
            [d.ran for d in finished],
            {position: d.error for position, d in enumerate(finished) if d.error is not None},
        )


@attrs.define
class ChunkReport:
    finished: list[Finished] = attrs.Factory(list)
    timed_out: list[tuple[int, float]] = attrs.Factory(list)  # (index, ran) known to be hung
    not_started: list[int] = attrs.Factory(list)
    unknown: list[int] = attrs.Factory(list)  # fate lost with the worker: each runs again alone
    lost: list[int] = attrs.Factory(list)  # ran, but their results died with the worker
    failure: BaseException | None = None  # why the unknown ones are unknown
    # Results still to be decoded (process bridge): the batch decodes them
    # after the worker's next call is on its way; ``ran`` sizes that call.
    decode: Callable[[], Rows] | None = None
    ran: Sequence[float] = attrs.Factory(list)


@attrs.define(eq=False)
class Call:
    """The batch's handle on a call in flight, filled in by its runner where it can.

    ``started()`` says how many items the call has started so far; ``cut``
    asks it to start no item at or past a position. The runner sets both
    while the call runs (neither where it cannot watch the call), and
    reports, when the call returns, only the items before :attr:`limit`.
    The batch sets :attr:`at_most_once` when no item may run twice: the
    runner then leaves ``cut`` unset where a cut could, rarely, let an item
    start in two calls (the process board), and ends an item that runs past
    its deadline at that deadline, counted from the item's own start.
    """

    started: Callable[[], int] | None = None
    cut: Callable[[int], None] | None = None
    limit: int = NO_LIMIT  # the items from here on were given to another call
    at_most_once: bool = False

    def cut_at(self, limit: int) -> int:
        """Take the call's items from ``limit`` on; return where those taken start.

        The items taken end where an earlier cut's began (the call's size at
        first). The call may have started the item at ``limit``, or past it,
        before it saw the cut: then the items taken start where it has got
        to, and none may be left.
        """
        if self.cut is None or self.started is None or limit >= self.limit:
            return self.limit
        self.cut(limit)
        begun = self.started()
        if begun > limit:
            limit = min(begun, self.limit)
            self.cut(limit)
        self.limit = limit
        return limit


class ResultsLost(SerializationError):
    """A chunk's results could not be unpickled here; its items run again alone."""


class Runner(Protocol):
    """What the batch needs of a bridge."""

    chunked: bool  # whether chunks of more than one item make sense

    async def run(
        self,
        fn: Any,
        chunk: list[tuple[int, Any]],
        deadline: float,
        stop_after: float,
        call: Call,
    ) -> ChunkReport:
        """Run ``chunk``, starting items only while :func:`may_start` allows.

        Items never started are reported ``not_started``, those before
        ``call.limit`` only: the batch gave the rest to another call.
        """
        ...


# A call past its ``stop_after`` still finishes a remainder that, at its pace
# so far, ends within this much of ``stop_after``: a last few items cost less
# to run than to send back for one more call.
_GRACE = 1.25


def may_start(elapsed: float, done: int, left: int, stop_after: float) -> bool:
    """Whether a call starts its next item.

    ``elapsed`` seconds into the call, with ``done`` items run and ``left``
    still to go (the next one included).

    Always before ``stop_after``; after it, only if the rest, at the call's
    pace so far, would end by ``stop_after * _GRACE``. So every item starts
    within ``stop_after * _GRACE`` of the call's start.
    """
    if not done or elapsed < stop_after:
        return True
    return elapsed + left * elapsed / done <= latest_start(stop_after)


def latest_start(stop_after: float) -> float:
    """The latest a call limited by ``stop_after`` starts an item (see :func:`may_start`)."""
    return stop_after * _GRACE


def chunk_deadline(deadline: float, size: int, stop_after: float = math.inf) -> float:
    """How long a call of ``size`` items may run in a worker that cannot report progress.

    A lone item gets its full deadline. A call limited by ``stop_after`` (see
    :func:`may_start`) starts every item within ``latest = stop_after *
    _GRACE``, and gets ``deadline - latest``, so no item is cut before it has
    had ``deadline - 2 * latest``. If the call runs out, its items run again
    alone, first in line, and a hung one is cut at most ``deadline - latest``
    + (its chunk-mates before it, all started within ``latest``) +
    ``deadline`` after its first dispatch: within twice its deadline. A chunk
    without such a limit gets half the deadline.
    """
    latest = latest_start(stop_after)
    if size == 1:
        return deadline
    if latest < deadline / 2:
        return deadline - latest
    return deadline / 2


def too_slow(deadline: float) -> trio.TooSlowError:
    return trio.TooSlowError(f"item deadline of {deadline:g} s expired")


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


@attrs.define
class ProcessRunner:
    pool: ProcessPool
    chunked: bool = True

    async def run(
        self,
        fn: Any,
        chunk: list[tuple[int, Any]],
        deadline: float,
        stop_after: float,
        call: Call,
    ) -> ChunkReport:
        async with self.pool._limiter:
            # Holding a worker, so a slot is free: the pool's board has one
            # per worker (or there is no board, and the call runs unwatched).
            board = self.pool._progress_board()
            if board is None:
                if call.at_most_once and len(chunk) > 1:
                    # Unwatched, a failed call could not say which of its
                    # items ran: one item a call from now on (the pool will
                    # have no board later either), the rest back in line.
                    self.chunked = False
                    report = await self._run(fn, chunk[:1], deadline, stop_after, None, call)
                    report.not_started.extend(index for index, _ in chunk[1:])
                    return report
                return await self._run(fn, chunk, deadline, stop_after, None, call)
            slot = board.take()
            try:
                call.started = functools.partial(board.started, slot)
                if not call.at_most_once:  # a cut may, rarely, start an item twice (see _board)
                    call.cut = functools.partial(board.cut, slot)
                return await self._run(fn, chunk, deadline, stop_after, (board, slot), call)
            finally:
                call.started = call.cut = None
                board.give_back(slot)

    async def _run(
        self,
        fn: Any,
        chunk: list[tuple[int, Any]],
        deadline: float,
        stop_after: float,
        place: tuple[Board, int] | None,  # the call's slot on the board
        call: Call,
    ) -> ChunkReport:
        failure: BaseException | None = None
        items = [item for _, item in chunk]
        board = (place[0].path, place[1]) if place is not None else None
        # Watched item by item: each item is ended at its own deadline.
        watched = place is not None and call.at_most_once and math.isfinite(deadline)
        payload = pickle_call(run_chunk_in_worker, (fn, items, stop_after, board, watched))
        await self.pool._ensure_idle_worker()
        # A started worker is ours: the deadline starts now.
        limit = math.inf if watched else chunk_deadline(deadline, len(chunk), stop_after)
        data: bytes | Exception = b""
        watch = Watch()
        with trio.move_on_after(limit) as scope:
            if watched:
                assert place is not None
                data = await self._call_watched(payload, fn, place, deadline, scope, watch)
            else:
                data = await self._call(payload, fn)
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
        if failure is not None:
            # Still holding the worker's place: replace the lost worker now, so
            # the next item's deadline does not pay for a process start.
            await self.pool._replace_lost_worker()
            begun = place[0].started(place[1]) if place is not None else 0
            kept = chunk[: call.limit]
            if watched and place is not None and place[0].started_at(place[1]) < 0:
                # Every item it started had returned; their results died
                # with the worker while they were being sent back.
                indices = [index for index, _ in kept]
                if scope.cancelled_caught:
                    failure = trio.TooSlowError(
                        f"sending the results back took longer than the item deadline"
                        f" of {deadline:g} s"
                    )
                return ChunkReport(
                    lost=indices[:begun], not_started=indices[begun:], failure=failure
                )
            return lost_with_the_worker(kept, min(begun, len(kept)), failure, overdue=overdue)
        assert isinstance(data, bytes)
        return returned(chunk, call.limit, *pickle.loads(data))

    async def _call(self, payload: bytes, fn: Any) -> bytes | Exception:
        """The call's pickled results, or the exception that ended it."""
        try:
            return await self.pool._dispatch(payload, fn, kill_on_cancel=True)
        except Exception as exc:
            return exc

    async def _call_watched(
        self,
        payload: bytes,
        fn: Any,
        place: tuple[Board, int],
        deadline: float,
        scope: trio.CancelScope,
        watch: Watch,
    ) -> bytes | Exception:
        """:meth:`_call`, while a task ends the call when an item reaches its deadline."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(end_overdue_item, *place, deadline, scope, watch)
            data = await self._call(payload, fn)
            nursery.cancel_scope.cancel()
        return data


@attrs.define
class Watch:
    """What the task ending overdue items saw (see :func:`end_overdue_item`)."""

    # Items the call had started when it was found overdue (the last of
    # them was): its worker may start more before the kill lands.
    overdue: int | None = None


async def end_overdue_item(
    board: Board, slot: int, deadline: float, scope: trio.CancelScope, watch: Watch
) -> None:
    """Cancel ``scope`` when the item the call in ``slot`` runs has run for ``deadline``.

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
        started = board.started(slot)
        if not started:
            break
        at = board.started_at(slot)
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
    chunk: list[tuple[int, Any]],
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


def lost_with_the_worker(
    chunk: list[tuple[int, Any]],
    begun: int,
    failure: BaseException,
    *,
    overdue: int | None = None,
) -> ChunkReport:
    """What is known of a call whose worker was killed or died, ``begun`` items in.

    The item running then (the last begun) hung or crashed the worker: only
    it runs again alone. The ones before it ran, but their results died
    with the worker; the ones after it never started. Without progress
    (``begun`` 0), every item is a suspect. A call killed because its
    ``overdue``-th item ran past its deadline blames that item: any the
    worker started after it, before the kill landed, are lost too.
    """
    indices = [index for index, _ in chunk]
    if not begun:
        return ChunkReport(unknown=indices, failure=failure)
    culprit = begun - 1 if not overdue else min(overdue, begun) - 1
    return ChunkReport(
        lost=indices[:culprit] + indices[culprit + 1 : begun],
        unknown=[indices[culprit]],
        not_started=indices[begun:],
        failure=failure,
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


def _cut_thread_chunk(state: _ThreadChunk, limit: int) -> None:
    # Under the lock the thread claims its items with, so that an item is
    # either started here or taken, never both.
    with state.lock:
        state.limit = limit


@attrs.define
class ThreadRunner:
    limiter: trio.CapacityLimiter
    chunked: bool = True
    # The batch's own limiter bounds its threads; trio's default one (40) must not.
    unlimited: trio.CapacityLimiter = attrs.Factory(lambda: trio.CapacityLimiter(math.inf))

    async def run(
        self,
        fn: Any,
        chunk: list[tuple[int, Any]],
        deadline: float,
        stop_after: float,
        call: Call,
    ) -> ChunkReport:
        state = _ThreadChunk(clock=trio.lowlevel.current_clock())

        def work() -> None:
            call_started = time.perf_counter()
            for position, (index, item) in enumerate(chunk):
                started = time.perf_counter()
                left = min(len(chunk), state.limit) - position
                if position and not may_start(started - call_started, position, left, stop_after):
                    state.stopped = position
                    return
                with state.lock:
                    if state.abandoned:
                        return
                    if position >= state.limit:
                        state.stopped = position
                        return
                    state.position = position
                    state.started = position + 1
                    state.item_started = state.clock.current_time()
                try:
                    result = Finished(index, True, fn(item), None, 0.0)
                except Exception as exc:
                    result = Finished(index, False, None, exc, 0.0)
                result.ran = time.perf_counter() - started
                with state.lock:
                    if not state.abandoned:
                        state.finished.append(result)

        async with self.limiter:  # a thread is ours: deadlines start now
            state.item_started = trio.current_time()
            call.started = lambda: state.started
            call.cut = functools.partial(_cut_thread_chunk, state)
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._watch, state, deadline, nursery.cancel_scope)
                    await to_thread(work, limiter=self.unlimited)
                    nursery.cancel_scope.cancel()
            finally:
                call.started = call.cut = None
        report = ChunkReport(finished=state.finished)
        if state.stopped is not None:
            report.not_started = [index for index, _ in chunk[state.stopped : state.limit]]
        if state.abandoned:
            report.timed_out = [(chunk[state.position][0], deadline)]
            report.not_started = [index for index, _ in chunk[state.position + 1 : state.limit]]
            report.failure = too_slow(deadline)
        return report

    @staticmethod
    async def _watch(state: _ThreadChunk, deadline: float, scope: trio.CancelScope) -> None:
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


# -- async functions ----------------------------------------------------------------


@attrs.define
class AsyncRunner:
    chunked: bool = False

    async def run(
        self,
        fn: Callable[[Any], Awaitable[object]],
        chunk: list[tuple[int, Any]],
        deadline: float,
        stop_after: float,
        call: Call,
    ) -> ChunkReport:
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
