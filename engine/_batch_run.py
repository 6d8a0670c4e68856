"""A batch at work: its workers, its line of items, its calls in flight (private).

Each worker task takes the next call (sized by ``_schedule``), runs it
through the batch's runner, and hands its report on: finished items to
the collector task, which records their outcomes while the worker's next
call is on its way; failed calls to ``_batch_failures``, whose decision
this module carries out.
"""

from __future__ import annotations

import collections
import logging
import math
import pickle
from collections.abc import Callable, Sequence
from typing import Any, Generic, TypeVar

import attrs
import trio

from ._batch_failures import Settlement, settle_failed_call, settle_lost_results
from ._batch_runners import ProcessRunner
from ._exceptions import SerializationError
from ._outcome import Recorder, Status
from ._runner import BatchRunner, Call, Chunk, ChunkReport, ResultsLost, Rows
from ._schedule import InFlight, Limits, items_within_bytes, plan_call, share_slowest

logger = logging.getLogger("engine.batch")

T = TypeVar("T")
R = TypeVar("R")

# Outcomes recorded between two schedule points of the collector: a worker
# whose call has just returned waits for at most a slice's recording
# before its next call goes.
_RECORD_SLICE = 128


class _Line:
    """The items waiting for a call: lone re-runs first, then items sent back, then fresh ones."""

    def __init__(self, total: int) -> None:
        self._total = total
        self._next = 0  # first item never taken
        self.alone: collections.deque[int] = collections.deque()  # each in a call of its own
        self._back: collections.deque[int] = collections.deque()  # taken, never started

    @property
    def waiting(self) -> int:
        """Items for calls of several (not counting :attr:`alone`)."""
        return len(self._back) + self._total - self._next

    def take(self, size: int) -> list[int]:
        """Up to ``size`` items: first those sent back, then fresh ones."""
        back = self._back
        taken: list[int] = []
        while back and len(taken) < size:
            taken.append(back.popleft())
        if len(taken) < size:
            fresh = min(self._next + size - len(taken), self._total)
            taken.extend(range(self._next, fresh))
            self._next = fresh
        return taken

    def put_back(self, indices: Sequence[int]) -> None:
        """Items to go first in the next calls, in this order."""
        self._back.extendleft(reversed(indices))


@attrs.frozen
class _Running:
    """A call in flight, as the batch sizes the next calls around it."""

    sent: float  # trio time
    indices: list[int]  # the items sent, in order
    speed: float | None  # its worker's seconds per item, from an earlier call
    stop_after: float  # its worker starts no item after this (see may_start)
    call: Call  # how far it has got, and how to take part of it

    def in_flight(self) -> InFlight:
        call = self.call
        size = min(len(self.indices), call.limit)
        shareable = call.cut is not None
        return InFlight(self.sent, size, call.begun(), self.speed, self.stop_after, shareable)


@attrs.define(eq=False)
class _Arrived:
    """A call's report, waiting for its outcomes to be recorded."""

    chunk: Chunk
    report: ChunkReport
    decoded: Rows | None = None
    recorded: int = 0  # of ``decoded``


class BatchRun(Generic[T, R]):
    """The running side of a batch: worker tasks that make calls, and a collector."""

    def __init__(
        self,
        fn: Callable[[T], Any],
        recorder: Recorder[T, R],
        runner: BatchRunner,
        limits: Limits,
        *,
        at_most_once: bool,
    ) -> None:
        self._fn = fn
        self._recorder = recorder
        self._runner = runner
        self._limits = limits
        self._at_most_once = at_most_once
        self._line = _Line(len(recorder.items))
        self._work_changed = trio.Event()
        # Calls that finished cleanly wait here for their outcomes to be
        # recorded by the collector, so that a worker's next call goes first.
        self._finished: collections.deque[_Arrived] = collections.deque()
        self._finished_added = trio.Event()
        self._running: dict[int, _Running] = {}  # by call number
        self._per_item: float | None = None  # measured seconds per item
        self._ran_total = 0.0
        self._ran_count = 0
        self._started_at = 0.0
        self.cancel_scope = trio.CancelScope()
        self.in_flight = 0
        self.calls = 0
        self.split = 0

    async def run(self) -> None:
        """Run every item; however this ends, each item has its one outcome."""
        self._started_at = trio.current_time()
        try:
            with self.cancel_scope:
                async with trio.open_nursery() as collecting:
                    collecting.start_soon(self._collect, name="batch collector")
                    async with trio.open_nursery() as nursery:
                        for number in range(self._limits.workers):
                            nursery.start_soon(self._worker, name=f"batch worker {number}")
                    collecting.cancel_scope.cancel()
        finally:
            self._record_finished()  # results that arrived are results, even on cancel
            self._recorder.cancel_the_rest()
            self._recorder.flush_tally()
            self._recorder.close()

    async def _collect(self) -> None:
        while True:
            await self._finished_added.wait()
            self._finished_added = trio.Event()
            # A slice at a time, letting other tasks in between: a worker
            # whose call just returned sends its next one within a slice's
            # time, not after a whole call's outcomes.
            while self._record_finished(_RECORD_SLICE):
                await trio.lowlevel.checkpoint()
            self._notify()  # workers wait for this before they call it a day

    def _record_finished(self, limit: int | None = None) -> bool:
        """Record the outcomes of finished calls, up to ``limit``; whether some are left."""
        recorded = 0
        while self._finished and (limit is None or recorded < limit):
            arrived = self._finished[0]
            rows = arrived.decoded if arrived.decoded is not None else self._decode(arrived)
            if rows is None:
                continue
            start, end = arrived.recorded, len(rows.indices)
            if limit is not None:
                end = min(end, start + limit - recorded)
            self._recorder.rows(rows, start, end)
            recorded += end - start
            arrived.recorded = end
            if end == len(rows.indices):
                self._finished.popleft()
        self._recorder.flush_tally()
        return bool(self._finished)

    def _decode(self, arrived: _Arrived) -> Rows | None:
        """The call's rows; ``None`` if its results are lost (and then settled)."""
        report = arrived.report
        try:
            if report.decode is not None:
                arrived.decoded = report.decode()
            else:
                arrived.decoded = Rows.of(report.finished)
        except ResultsLost as failure:
            self._finished.popleft()
            ran = [index for index, _ in arrived.chunk[: len(report.ran)]]
            self._settle(
                settle_lost_results(ran, report.ran, failure, at_most_once=self._at_most_once)
            )
            return None
        return arrived.decoded

    async def _worker(self) -> None:
        # Seconds per item on this worker, from its last call of several
        # items: workers of one batch can differ by half (a busy CPU).
        speed: float | None = None
        while True:
            planned = self._take(speed)
            if planned is None:
                # Results not yet decoded may still send items back for a re-run.
                if self.in_flight == 0 and not self._finished:
                    return
                # Nothing left to take: take part of a call with much still to do.
                if not self._share_slowest():
                    await self._work_changed.wait()
                continue
            chunk, stop_after = planned
            if not chunk:
                continue  # every item of it failed to pickle
            report = await self._call(chunk, stop_after, speed)
            ran = report.ran or [d.ran for d in report.finished]
            self._measure(ran)
            if len(ran) > 1:
                speed = sum(ran) / len(ran)
            if report.not_started:
                self._line.put_back(report.not_started)
            if report.timed_out or report.unknown or report.lost:
                self._absorb(chunk, report)
            else:
                # The common case: record the outcomes after this worker's next
                # call is on its way, not before (the collector runs once this
                # task waits on that call).
                self._finished.append(_Arrived(chunk, report))
                self._finished_added.set()

    async def _call(self, chunk: Chunk, stop_after: float, speed: float | None) -> ChunkReport:
        self.in_flight += 1
        self.calls += 1
        number = self.calls
        now = trio.current_time()
        call = Call(at_most_once=self._at_most_once)
        self._running[number] = _Running(now, [i for i, _ in chunk], speed, stop_after, call)
        queued = self._recorder.queued
        for index, _ in chunk:
            queued[index] = now - self._started_at
        try:
            return await self._runner.run(self._fn, chunk, self._limits.deadline, stop_after, call)
        finally:
            self.in_flight -= 1
            del self._running[number]
            self._notify()

    def _notify(self) -> None:
        self._work_changed.set()
        self._work_changed = trio.Event()

    def _take(self, speed: float | None) -> tuple[Chunk, float] | None:
        """The next call: its chunk, and when its worker stops starting items."""
        line = self._line
        if line.alone:
            return self._prepare([line.alone.popleft()]), math.inf
        if not line.waiting:
            return None
        plan = plan_call(
            self._limits,
            chunked=self._runner.chunked,
            waiting=line.waiting,
            speed=speed,
            per_item=self._per_item,
            now=trio.current_time(),
            running=[running.in_flight() for running in self._running.values()],
        )
        return self._prepare(line.take(plan.size)), plan.stop_after

    def _share_slowest(self) -> bool:
        """Take part of the running call that would end last; whether any was taken.

        This worker's part goes to the front of the line. The other worker
        goes on with its own part: nothing returns early, nothing waits.
        """
        running = list(self._running.values())
        now = trio.current_time()
        share = share_slowest(now, [r.in_flight() for r in running], self._per_item)
        if share is None:
            return False
        slowest = running[share.call]
        start = slowest.call.cut_at(share.cut)
        taken = slowest.indices[start : share.end]
        if not taken:
            return False
        self._line.put_back(taken)
        self._notify()  # for any other worker out of work: this one may leave some
        return True

    def _prepare(self, indices: list[int]) -> Chunk:
        """The chunk to send."""
        items = self._recorder.items
        chunk = [(i, items[i]) for i in indices]
        if not isinstance(self._runner, ProcessRunner):
            return chunk
        return _to_travel(chunk, self._line, self._recorder)

    def _measure(self, ran: Sequence[float]) -> None:
        # The mean over every item so far.
        if ran:
            self._ran_total += sum(ran)
            self._ran_count += len(ran)
            self._per_item = self._ran_total / self._ran_count

    def _absorb(self, chunk: Chunk, report: ChunkReport) -> None:
        self._finished.append(_Arrived(chunk, report))
        self._record_finished()
        deadline = self._limits.deadline
        at_most_once = self._at_most_once
        self._settle(
            settle_failed_call(
                report, size=len(chunk), deadline=deadline, at_most_once=at_most_once
            )
        )
        self._recorder.flush_tally()
        self._notify()

    def _settle(self, settled: Settlement) -> None:
        if settled.warning is not None:
            logger.warning("%s", settled.warning)
        if settled.split:
            self.split += 1
        if settled.another_attempt:
            for index in (*settled.alone, *settled.again):
                self._recorder.attempts[index] += 1
        self._line.alone.extend(settled.alone)
        self._line.put_back(settled.again)
        for ending in settled.ended:
            self._recorder.end(ending.index, ending.status, error=ending.error, ran=ending.ran)


def _to_travel(chunk: Chunk, line: _Line, recorder: Recorder[Any, Any]) -> Chunk:
    """What of ``chunk`` a process call carries.

    At most ``MAX_CALL_BYTES`` of it pickled: the rest goes back in line.
    Items that cannot be pickled end as errors here.
    """
    try:  # one pickle for the chunk; item by item only to name the culprits
        size = len(pickle.dumps([item for _, item in chunk], protocol=pickle.HIGHEST_PROTOCOL))
    except Exception:
        pass
    else:
        keep = items_within_bytes(len(chunk), size)
        line.put_back([index for index, _ in chunk[keep:]])
        return chunk[:keep]
    travelling = []
    for index, item in chunk:
        try:
            pickle.dumps(item, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as exc:
            error = SerializationError("argument", f"item {index}: {item!r:.80} ({exc})")
            error.__cause__ = exc
            recorder.end(index, Status.ERROR, error=error)
        else:
            travelling.append((index, item))
    return travelling
