"""The seam between a batch and where its items run: :class:`BatchRunner` (private).

The batch decides which items go in each call, when, and what each
item's outcome is; a runner runs one call at a time per task and reports
what became of each of its items in a :class:`ChunkReport`. The engine's
own runners (processes, threads, async functions) are in
``_batch_runners``; ``engine.testing.VirtualBridge`` is one more, and
another may be passed as ``map_batch(..., bridge=runner)``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import attrs
import trio

from ._board import NO_LIMIT
from ._exceptions import SerializationError

Chunk = list[tuple[int, Any]]
"""The items of one call, as ``(index, item)`` pairs in the batch's order."""


@attrs.define
class Finished:
    """An item of a call that returned (``ok``) or raised (``error``), and its run time.

    Attributes:
        index: the item's index, as the chunk gave it.
        ok: whether it returned.
        value: what it returned (``None`` when it raised).
        error: what it raised (``None`` when it returned).
        ran: seconds it ran, measured where it ran.
    """

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

    Attributes:
        indices: the items' indices.
        values: what each returned; ``None`` where it raised.
        ran: seconds each ran.
        errors: what the failed ones raised, by position in the columns.
    """

    indices: list[int]
    values: list[object]
    ran: Sequence[float]
    errors: dict[int, BaseException]

    @classmethod
    def of(cls, finished: list[Finished]) -> Rows:
        """The rows of a list of :class:`Finished`."""
        return cls(
            [d.index for d in finished],
            [d.value for d in finished],
            [d.ran for d in finished],
            {position: d.error for position, d in enumerate(finished) if d.error is not None},
        )


@attrs.define
class ChunkReport:
    """What became of each item of one call: every item before the call's limit, once.

    Attributes:
        finished: the items that returned or raised. They end ``ok`` or ``error``.
        timed_out: ``(index, ran)`` of items that ran past their deadline and
            were abandoned or ended. They end ``timeout`` with ``failure``.
        not_started: items the call never started (stopped by its clock, or
            its worker gone). They go back in line and run in a later call.
        unknown: items whose fate died with the worker: the one it was
            running when it died or was killed, or, when that cannot be
            told, every item of the call. Each runs again alone (with
            ``at_most_once``, ends with ``failure`` instead).
        lost: items that ran, but whose results died with the worker. They
            run again (with ``at_most_once``, end ``crashed`` instead).
        failure: why ``timed_out``, ``unknown`` and ``lost`` are so: a
            ``trio.TooSlowError`` (their deadline), a ``WorkerCrashed``, or
            a ``SerializationError`` when the worker could not unpickle the
            call, so that no item of it ran.
        decode: instead of ``finished``, a function the batch calls for
            them, as :class:`Rows`, once the worker's next call is on its
            way (a process call's results, still pickled). It may raise
            :class:`ResultsLost`.
        ran: with ``decode``, the finished items' run times, in order: they
            size the worker's next call before the results are decoded.
    """

    finished: list[Finished] = attrs.Factory(list)
    timed_out: list[tuple[int, float]] = attrs.Factory(list)
    not_started: list[int] = attrs.Factory(list)
    unknown: list[int] = attrs.Factory(list)
    lost: list[int] = attrs.Factory(list)
    failure: BaseException | None = None
    decode: Callable[[], Rows] | None = None
    ran: Sequence[float] = attrs.Factory(list)


class ResultsLost(SerializationError):
    """A call's results could not be unpickled here; its items run again alone."""


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

    Attributes:
        started: how many items the call has started so far, if the runner can tell.
        cut: start no item at or past this position, if the runner can be told.
        limit: the items from here on were given to another call.
        at_most_once: no item of the call may run twice.
    """

    started: Callable[[], int] | None = None
    cut: Callable[[int], None] | None = None
    limit: int = NO_LIMIT
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

    def begun(self) -> int:
        """Items the call has started so far; 0 where the runner cannot tell."""
        return self.started() if self.started is not None else 0


class BatchRunner(Protocol):
    """Where the items of a batch run: pass one as ``map_batch(..., bridge=runner)``.

    The batch keeps at most ``workers`` calls of :meth:`run` in flight, one
    per task, and decides which items each call takes and what each item's
    outcome is; a runner runs one call and says what became of each of its
    items. The engine's ``"process"``, ``"thread"`` and ``"async"`` bridges
    are runners, and so is :class:`engine.testing.VirtualBridge`.

    Attributes:
        chunked: whether calls of several items are worth making (dispatch
            costs more than an item: another process or machine). ``False``
            sends one item a call. Read before each call; a runner may turn
            it off while a batch runs.
    """

    chunked: bool

    async def run(
        self, fn: Any, chunk: Chunk, deadline: float, stop_after: float, call: Call
    ) -> ChunkReport:
        """Run one call: the items of ``chunk``, in order, each at most once.

        Args:
            fn: the batch's function, as given to ``map_batch``.
            chunk: ``(index, item)`` pairs; the report names items by index.
            deadline: seconds an item may run, from when it starts
                (``math.inf`` for none). Where item starts cannot be seen,
                give the whole call ``chunk_deadline(deadline, len(chunk),
                stop_after)`` instead, and report its items ``unknown``
                when it runs out.
            stop_after: seconds into the call after which the next item
                starts only if :func:`may_start` says so; ``math.inf`` for
                every item. Items not started go in ``not_started``.
            call: the batch's handle on this call. Set ``call.started``
                (and ``call.cut``) while the call runs, if it can be
                watched, and unset them before returning; start no item at
                or past ``call.limit``, and leave those out of the report.
                With ``call.at_most_once`` no item may run twice.

        Returns:
            A :class:`ChunkReport` naming each item before ``call.limit``
            exactly once.

        Cancellation:
            The batch cancels ``run`` when it is cancelled; the runner ends
            the call's work (kills or abandons it) and lets
            ``trio.Cancelled`` out.
        """
        ...


def too_slow(deadline: float) -> trio.TooSlowError:
    """The error of an item that ran past its deadline."""
    return trio.TooSlowError(f"item deadline of {deadline:g} s expired")


def lost_with_the_worker(
    chunk: Chunk,
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
