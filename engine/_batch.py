"""map_batch: a function over many items, with exactly one outcome per item.

Seed 000 waited on thread-pool futures whose ``wait_for`` never fired and
made more chunks than workers; seed 002 asked for 2,500 symbols with a 60 s
per-symbol timeout recorded as an error, per-symbol exceptions recorded, a
progress callback and a pool owned by a context manager. Here:

- every item ends as exactly one of ok, error, timeout, crashed, cancelled;
- an item's deadline starts when a worker takes it, never while it queues;
- never more calls in flight than ``workers``;
- small items travel in chunks, sized by each worker's measured speed and
  ended by a clock in the worker, so dispatch cost is amortised; a worker
  out of work takes part of a slower call's rest, which goes on without
  a pause;
- a chunk that times out or whose worker dies is split: the item it was
  running runs again alone, first in line, the others again or for the
  first time, so each still gets its own true outcome, and a hung item is
  reported within twice its deadline;
- with ``at_most_once``, no item runs twice: a hung item is ended at its
  own deadline, and it and the items whose results died with its worker
  end with that failure instead of running again.
"""

from __future__ import annotations

import collections
import enum
import logging
import math
import os
import pickle
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, Generic, TypeVar

import attrs
import trio

from ._batch_runners import (
    AsyncRunner,
    Call,
    ChunkReport,
    ProcessRunner,
    ResultsLost,
    Rows,
    Runner,
    ThreadRunner,
    latest_start,
)
from ._bridgestats import tally
from ._channels import ReceiveChannel, SendChannel, open_channel
from ._exceptions import SerializationError, WorkerCrashed
from ._processes import _DEFAULT, ProcessPool, pickle_call, to_process
from ._validation import check_choice, check_count, check_duration

logger = logging.getLogger("engine.batch")

T = TypeVar("T")
R = TypeVar("R")

# Aim for calls of about this much work: each call costs a round trip (about
# 0.2 ms of this process plus two process wake-ups) during which its worker
# idles, and the last calls are sized to end together, so long calls cost
# nothing at the end. Progress and outcomes arrive a call at a time.
_TARGET_CALL_SECONDS = 0.1
# The last calls are never smaller than this much work: smaller ones cost
# more in dispatch than they save in waiting.
_MIN_CALL_SECONDS = 0.004
_MAX_CHUNK = 4096
# A worker with nothing left to take shares a running call that still has
# more than this much work ahead (and takes at least _MIN_CALL_SECONDS of it).
_SHARE_AFTER_SECONDS = 2 * _MIN_CALL_SECONDS
# A call carries at most this much pickled input (unless one item is more):
# items that it has no time left to start travel for nothing.
_MAX_CALL_BYTES = 8 << 20


# Outcomes recorded between two schedule points of the collector (about
# 0.3 ms of work).
_RECORD_SLICE = 128


class Status(enum.StrEnum):
    """How one item of a batch ended."""

    OK = "ok"
    """The function returned; ``value`` holds the result."""
    ERROR = "error"
    """The function raised (or the item or result could not be pickled)."""
    TIMEOUT = "timeout"
    """Its deadline fired; ``error`` is a ``trio.TooSlowError``."""
    CRASHED = "crashed"
    """Its worker process died running it; ``error`` is a ``WorkerCrashed``."""
    CANCELLED = "cancelled"
    """The batch was cancelled before it finished."""


@attrs.frozen
class Outcome(Generic[T, R]):
    """The one outcome of one item.

    Attributes:
        index: the item's position in the input.
        item: the item.
        status: see :class:`Status`.
        value: the result, when ``status`` is ``ok``.
        error: the exception, for ``error``, ``timeout`` and ``crashed``.
        queued: seconds from the batch's start until a worker took the item
            (its last attempt).
        ran: seconds the item ran, measured where it ran (0 if it never did).
        attempts: 2 when a call it had started in failed (timed out, or its
            worker died), so that it ran again; always 1 with ``at_most_once``.
    """

    index: int
    item: T
    status: Status
    value: R | None = None
    error: BaseException | None = None
    queued: float = 0.0
    ran: float = 0.0
    attempts: int = 1

    @property
    def ok(self) -> bool:
        """Whether the function returned a value."""
        return self.status is Status.OK

    def unwrap(self) -> R:
        """The value, or raise the error (``trio.Cancelled`` is never stored here).

        Raises:
            BaseException: the item's error; for ``cancelled``, ``trio.TooSlowError``
                would mislead, so a ``RuntimeError`` says it was cancelled.
        """
        if self.status is Status.OK:
            return self.value  # type: ignore[return-value]  # set whenever status is OK
        if self.error is not None:
            raise self.error
        raise RuntimeError(f"item {self.index} was cancelled before it finished")


# attrs' __init__ for a frozen class sets each field through a bound
# ``object.__setattr__``. A batch makes its outcomes by the thousand, at its
# end, while its caller waits: writing the slots directly costs about half
# as much (0.3 against 0.6 µs an outcome here). Same fields, same values:
# test_batch checks that both ways make equal outcomes.
_OUTCOME_SLOTS = tuple(getattr(Outcome, field.name).__set__ for field in attrs.fields(Outcome))


def _ok_outcomes(
    indices: Sequence[int],
    items: Sequence[T],
    values: Sequence[Any],
    ran: Sequence[float],
    queued: Sequence[float],
    attempts: Sequence[int],
) -> list[Outcome[T, Any]]:
    """The ``ok`` outcomes of rows ``(index, value, ran)``, made in bulk.

    Each equals ``Outcome(index, items[index], Status.OK, value, None,
    queued[index], ran, attempts[index])``.
    """
    set_index, set_item, set_status, set_value, set_error, set_queued, set_ran, set_attempts = (
        _OUTCOME_SLOTS
    )
    new, ok = object.__new__, Status.OK
    made: list[Outcome[T, Any]] = []
    for index, value, took in zip(indices, values, ran, strict=True):
        outcome = new(Outcome)
        set_index(outcome, index)
        set_item(outcome, items[index])
        set_status(outcome, ok)
        set_value(outcome, value)
        set_error(outcome, None)
        set_queued(outcome, queued[index])
        set_ran(outcome, took)
        set_attempts(outcome, attempts[index])
        made.append(outcome)
    return made


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


@attrs.frozen
class _Running:
    """A call in flight, as the batch sizes the next calls around it."""

    started: float  # trio time it was sent
    indices: list[int]  # the items sent, in order
    speed: float | None  # its worker's seconds per item, from an earlier call
    stop_after: float  # its worker starts no item after this (see may_start)
    call: Call  # how far it has got, and how to take part of it


@attrs.define(eq=False)
class _Arrived:
    """A call's report, waiting for its outcomes to be recorded."""

    chunk: list[tuple[int, Any]]
    report: ChunkReport
    decoded: Rows | None = None
    recorded: int = 0  # of ``decoded``


class Batch(Generic[T, R]):
    """What :func:`map_batch` yields: iterate it for outcomes in completion order."""

    def __init__(
        self,
        fn: Callable[[T], Any],
        items: list[T],
        runner: Runner,
        *,
        workers: int,
        item_deadline: float,
        chunk_size: int | None,
        on_progress: Callable[[int, int], object] | None,
        at_most_once: bool = False,
    ) -> None:
        self._fn = fn
        self._items = items
        self._runner = runner
        self._workers = workers
        self._deadline = item_deadline
        self._chunk_size = chunk_size
        self._on_progress = on_progress
        self._at_most_once = at_most_once
        self._results: list[Outcome[T, R] | None] = [None] * len(items)
        self._counts: collections.Counter[Status] = collections.Counter()
        self._completed = 0  # outcomes other than cancelled
        self._ended = 0  # outcomes of any kind
        self._attempts = [1] * len(items)
        self._queued = [0.0] * len(items)
        self._next = 0  # first item never dispatched
        self._retry: collections.deque[int] = collections.deque()  # single re-runs, first
        self._resume: collections.deque[int] = collections.deque()  # sent, never started
        self._work_changed = trio.Event()
        # Chunks that finished cleanly wait here for their outcomes to be
        # recorded by the collector task, so a worker's next call is sent first.
        self._finished: collections.deque[_Arrived] = collections.deque()
        self._finished_added = trio.Event()
        self._tallied: collections.Counter[Status] = collections.Counter()
        self._in_flight = 0
        # The calls in flight, by number, so that the next calls can be sized
        # to end together with them.
        self._running: dict[int, _Running] = {}
        self._calls = 0
        self._split = 0
        self._per_item: float | None = None  # measured seconds per item
        self._ran_total = 0.0
        self._ran_count = 0
        self._started_at = 0.0
        self._cancel_scope = trio.CancelScope()
        self._send: SendChannel[Outcome[T, R]]
        self._receive: ReceiveChannel[Outcome[T, R]]
        self._send, self._receive = open_channel(max(1, len(items)))

    # -- the public side ---------------------------------------------------------

    def __aiter__(self) -> AsyncIterator[Outcome[T, R]]:
        return self._receive

    def results(self) -> list[Outcome[T, R]]:
        """Every outcome, in input order; complete once the batch's block has ended.

        Raises:
            RuntimeError: some item has no outcome yet (the batch still runs).
        """
        missing = len(self._results) - self._ended
        if missing:
            raise RuntimeError(f"the batch is still running: {missing} items have no outcome yet")
        return list(self._results)  # type: ignore[arg-type]  # none is None any more

    def cancel(self) -> None:
        """Stop the batch: running calls are cancelled, unfinished items end ``cancelled``."""
        self._cancel_scope.cancel()

    def statistics(self) -> BatchStatistics:
        """A frozen snapshot of the batch's progress."""
        counts = self._counts
        return BatchStatistics(
            total=len(self._items),
            completed=sum(counts.values()) - counts[Status.CANCELLED],
            ok=counts[Status.OK],
            error=counts[Status.ERROR],
            timeout=counts[Status.TIMEOUT],
            crashed=counts[Status.CRASHED],
            cancelled=counts[Status.CANCELLED],
            in_flight=self._in_flight,
            calls=self._calls,
            split_chunks=self._split,
        )

    # -- running -------------------------------------------------------------------

    async def _run(self) -> None:
        self._started_at = trio.current_time()
        try:
            with self._cancel_scope:
                async with trio.open_nursery() as collecting:
                    collecting.start_soon(self._collect, name="batch collector")
                    async with trio.open_nursery() as nursery:
                        for number in range(self._workers):
                            nursery.start_soon(self._worker, name=f"batch worker {number}")
                    collecting.cancel_scope.cancel()
        finally:
            self._record_finished()  # results that arrived are results, even on cancel
            if self._ended < len(self._results):
                for index, result in enumerate(self._results):
                    if result is None:
                        self._finish(index, Status.CANCELLED)
            self._flush_tally()
            self._send.close()

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
            if arrived.decoded is None:
                report = arrived.report
                try:
                    if report.decode is not None:
                        arrived.decoded = report.decode()
                    else:
                        arrived.decoded = Rows.of(report.finished)
                except ResultsLost as failure:
                    self._finished.popleft()
                    # Only the items it ran: those it never started (stopped by
                    # its clock) are back in line already.
                    ran = arrived.chunk[: len(report.ran)]
                    if self._at_most_once:
                        for (index, _), took in zip(ran, report.ran, strict=True):
                            self._finish(index, Status.ERROR, error=failure, ran=took)
                    else:
                        self._split_chunk([index for index, _ in ran], failure)
                    continue
            rows = arrived.decoded
            start, end = arrived.recorded, len(rows.indices)
            if limit is not None:
                end = min(end, start + limit - recorded)
            self._record_rows(rows, start, end)
            recorded += end - start
            arrived.recorded = end
            if end == len(rows.indices):
                self._finished.popleft()
        self._flush_tally()
        return bool(self._finished)

    def _flush_tally(self) -> None:
        # The run-wide counters take one update per chunk, not one per item.
        counters = tally()
        for status, count in self._counts.items():
            if count != self._tallied[status]:
                counters.count_batch_outcome(str(status), count - self._tallied[status])
                self._tallied[status] = count

    async def _worker(self) -> None:
        # Seconds per item on this worker, from its last call of several
        # items: workers of one batch can differ by half (a busy CPU).
        speed: float | None = None
        while True:
            planned = self._take(speed)
            if planned is None:
                # Results not yet decoded may still send items back for a re-run.
                if self._in_flight == 0 and not self._finished:
                    return
                # Nothing left to take: take part of a call with much still to do.
                if not self._share_slowest():
                    await self._work_changed.wait()
                continue
            chunk, stop_after = planned
            if not chunk:
                continue  # every item of it failed to pickle
            self._in_flight += 1
            self._calls += 1
            number = self._calls
            now = trio.current_time()
            call = Call(at_most_once=self._at_most_once)
            self._running[number] = _Running(now, [i for i, _ in chunk], speed, stop_after, call)
            for index, _ in chunk:
                self._queued[index] = now - self._started_at
            try:
                report = await self._runner.run(self._fn, chunk, self._deadline, stop_after, call)
            finally:
                self._in_flight -= 1
                del self._running[number]
                self._notify()
            ran = report.ran or [d.ran for d in report.finished]
            self._measure(ran)
            if len(ran) > 1:
                speed = sum(ran) / len(ran)
            if report.not_started:
                # Back to the front of the line, in order.
                self._resume.extendleft(reversed(report.not_started))
            if report.timed_out or report.unknown or report.lost:
                self._absorb(chunk, report)
            else:
                # The common case: record the outcomes after this worker's next
                # call is on its way, not before (the collector runs once this
                # task waits on that call).
                self._finished.append(_Arrived(chunk, report))
                self._finished_added.set()

    def _notify(self) -> None:
        self._work_changed.set()
        self._work_changed = trio.Event()

    def _take(self, speed: float | None) -> tuple[list[tuple[int, Any]], float] | None:
        """The next call: its chunk, and when its worker stops starting items."""
        if self._retry:
            return self._prepare([self._retry.popleft()]), math.inf
        waiting = len(self._resume) + len(self._items) - self._next
        if not waiting:
            return None
        size, stop_after = self._plan(speed, waiting)
        indices: list[int] = []
        while self._resume and len(indices) < size:
            indices.append(self._resume.popleft())
        if len(indices) < size:
            fresh = min(self._next + size - len(indices), len(self._items))
            indices.extend(range(self._next, fresh))
            self._next = fresh
        return self._prepare(indices), stop_after

    def _plan(self, speed: float | None, waiting: int) -> tuple[int, float]:
        """How many items the next call takes, and after how long it stops starting them."""
        if not self._runner.chunked:
            return 1, math.inf
        if self._chunk_size is not None:
            return self._chunk_size, math.inf
        budget = _TARGET_CALL_SECONDS
        if math.isfinite(self._deadline):
            budget = min(budget, self._deadline / 8)
        # The worker starts no item after twice the aim: a call whose items
        # prove slower than measured ends anyway, and the unmeasured first
        # calls end by the clock. (So the call can be given all but this of
        # the deadline; see chunk_deadline.)
        stop_after = 2 * budget
        if self._per_item is None:
            # Nothing measured yet: an even share, for the worker's clock to
            # cut short if the items are slow. A worker that turns out slower
            # than the others has its call shared when they run out of work.
            share = math.ceil(len(self._items) / self._workers)
            return min(_MAX_CHUNK, share, waiting), stop_after
        per_item = max(speed or self._per_item, 1e-7)
        # (+1e-9: 0.05 / 0.001 must be 50 items, not 49.99999 -> 49)
        size = max(1, min(int(budget / per_item + 1e-9), _MAX_CHUNK))
        # Near the end, share what is left so that every worker ends at once,
        # counting what the running calls still have to do and how fast their
        # workers go. Not into calls too small to be worth their dispatch,
        # though, and leave no crumb behind for one more call.
        now = trio.current_time()
        running = [self._expected_end(now, entry) for entry in self._running.values()]
        end = _balanced_end(now, waiting, per_item, self._workers, running)
        fair = math.ceil((end - now) / per_item - 1e-9)
        floor = max(1, min(size, int(_MIN_CALL_SECONDS / per_item + 1e-9)))
        size = min(size, max(fair, floor))
        if waiting - size < floor and waiting * per_item <= budget:
            size = waiting
        return size, stop_after

    def _expected_end(self, now: float, running: _Running) -> tuple[float, float]:
        """When a running call should end, and its worker's seconds per item."""
        assert self._per_item is not None
        call, started, speed = running.call, running.started, running.speed
        count = min(len(running.indices), call.limit)
        begun = call.started() if call.started is not None else 0
        if speed is None:
            # Its worker's first call: the pace so far, once an item is done.
            speed = (now - started) / (begun - 1) if begun > 1 else self._per_item
        # The item running now ends when the call's pace says, but not before now.
        end = max(now, started + begun * speed) + (count - begun) * speed
        return min(end, started + latest_start(running.stop_after) + speed), speed

    def _share_slowest(self) -> bool:
        """Take part of the running call that would end last; whether any was taken.

        Its items not started yet are split so that its worker and this one
        end together; this worker's part goes to the front of the line. The
        other worker goes on with its own part: nothing returns early,
        nothing waits.
        """
        if self._per_item is None:
            return False
        now = trio.current_time()
        slowest, latest, pace = None, now + _SHARE_AFTER_SECONDS, self._per_item
        for running in self._running.values():
            if running.call.cut is None:
                continue
            end, its_pace = self._expected_end(now, running)
            if end > latest:
                slowest, latest, pace = running, end, its_pace
        if slowest is None:
            return False
        call = slowest.call
        begun = call.started() if call.started is not None else 0
        end = min(len(slowest.indices), call.limit)
        left = end - begun
        # It ends the item it runs now at ``busy_until`` and then ``keep``
        # more; this worker, free now, does the other ``left - keep``. Both
        # at the call's pace so far: whether it is slow for its items or for
        # its CPU cannot be told apart, and if the two still end apart, the
        # one done first takes part of the other's rest again.
        busy_until = max(now, slowest.started + begun * pace)
        keep = max(1, math.ceil((now - busy_until + left * pace) / (2 * pace) - 1e-9))
        if (left - keep) * pace < _MIN_CALL_SECONDS:
            return False
        start = call.cut_at(begun + keep)
        taken = slowest.indices[start:end]
        if not taken:
            return False
        self._resume.extendleft(reversed(taken))
        self._notify()  # for any other worker out of work: this one may leave some
        return True

    def _prepare(self, indices: list[int]) -> list[tuple[int, Any]]:
        """The chunk to send; items that cannot travel to a process end as errors here."""
        chunk = [(i, self._items[i]) for i in indices]
        if not isinstance(self._runner, ProcessRunner):
            return chunk
        try:  # one pickle for the chunk; item by item only to name the culprits
            size = len(pickle.dumps([item for _, item in chunk], protocol=pickle.HIGHEST_PROTOCOL))
        except Exception:
            pass
        else:
            if size > _MAX_CALL_BYTES and len(chunk) > 1:
                keep = max(1, len(chunk) * _MAX_CALL_BYTES // size)
                self._resume.extendleft(reversed([index for index, _ in chunk[keep:]]))
                chunk = chunk[:keep]
            return chunk
        travelling = []
        for index, item in chunk:
            try:
                pickle.dumps(item, protocol=pickle.HIGHEST_PROTOCOL)
            except Exception as exc:
                error = SerializationError("argument", f"item {index}: {item!r:.80} ({exc})")
                error.__cause__ = exc
                self._finish(index, Status.ERROR, error=error)
            else:
                travelling.append((index, item))
        return travelling

    def _measure(self, ran: Sequence[float]) -> None:
        # The mean over every item so far.
        if ran:
            self._ran_total += sum(ran)
            self._ran_count += len(ran)
            self._per_item = self._ran_total / self._ran_count

    def _absorb(self, chunk: list[tuple[int, Any]], report: ChunkReport) -> None:
        self._finished.append(_Arrived(chunk, report))
        self._record_finished()
        for index, ran in report.timed_out:
            self._finish(index, Status.TIMEOUT, error=report.failure, ran=ran)
        if report.unknown or report.lost:
            # Sent alone (not left alone by a cut: that call had a chunk's
            # time), the item had its whole deadline.
            if len(chunk) == 1 and report.unknown:
                (index,) = report.unknown
                if isinstance(report.failure, trio.TooSlowError):
                    self._finish(index, Status.TIMEOUT, error=report.failure, ran=self._deadline)
                elif isinstance(report.failure, SerializationError):
                    self._finish(index, Status.ERROR, error=report.failure)
                else:
                    self._finish(index, Status.CRASHED, error=report.failure)
            else:
                assert report.failure is not None
                if self._at_most_once and not isinstance(report.failure, SerializationError):
                    self._end_failed_call(report.unknown, report.failure, lost=report.lost)
                elif isinstance(report.failure, SerializationError):
                    # The worker could not unpickle the chunk: no item ran.
                    self._split_chunk(report.unknown, report.failure, ran=False)
                else:
                    self._split_chunk(report.unknown, report.failure, lost=report.lost)
        self._flush_tally()
        self._notify()

    def _end_failed_call(
        self, suspects: list[int], failure: BaseException, *, lost: Sequence[int]
    ) -> None:
        # At most once: the item the call was running (or, when which is
        # unknown, every item it may have run) ends with the call's failure,
        # and the items whose results died with the worker end ``crashed``.
        if len(suspects) + len(lost) > 1:
            self._split += 1
        logger.warning(
            "a call failed (%s): %d items end with it, %d lost their results; none runs again",
            failure,
            len(suspects),
            len(lost),
        )
        if isinstance(failure, trio.TooSlowError):
            # Ended at its own deadline, when the board said which item ran.
            ran = self._deadline if len(suspects) == 1 else 0.0
            for index in suspects:
                self._finish(index, Status.TIMEOUT, error=failure, ran=ran)
        else:
            for index in suspects:
                self._finish(index, Status.CRASHED, error=failure)
        if lost:
            error = _results_lost(failure, suspects)
            for index in lost:
                self._finish(index, Status.CRASHED, error=error)

    def _split_chunk(
        self,
        suspects: list[int],
        failure: BaseException,
        *,
        lost: Sequence[int] = (),
        ran: bool = True,
    ) -> None:
        # The suspects (the item that hung, crashed the worker or could not
        # travel, or all of a call when which is unknown) each run again
        # alone, first in line; the lost ones ran, but their results died
        # with the worker, so they run again too, next in line.
        self._split += 1
        logger.warning(
            "a call failed (%s): %d items run again alone, %d others again",
            failure,
            len(suspects),
            len(lost),
        )
        if ran:  # (a chunk the worker could not unpickle ran no item)
            for index in (*suspects, *lost):
                self._attempts[index] += 1
        self._retry.extend(suspects)
        self._resume.extendleft(reversed(lost))

    def _record_rows(self, rows: Rows, start: int, end: int) -> None:
        """``_finish`` for the items ``start:end`` of a call's rows, per-item work hoisted.

        Without a progress callback nothing outside the batch runs between
        two of these outcomes, so the counters and the channel take them
        all at once: 1,250 outcomes cost about 0.8 ms instead of 1.25.
        """
        indices, values, ran, errors = rows.indices, rows.values, rows.ran, rows.errors
        if self._on_progress is not None:
            for position in range(start, end):
                error = errors.get(position)
                self._finish(
                    indices[position],
                    Status.OK if error is None else Status.ERROR,
                    value=values[position],
                    error=error,
                    ran=ran[position],
                )
            return
        results = self._results
        made: list[Outcome[T, R]] = _ok_outcomes(
            indices[start:end],
            self._items,
            values[start:end],
            ran[start:end],
            self._queued,
            self._attempts,
        )
        for outcome in made:
            if results[outcome.index] is not None:
                raise AssertionError(f"engine bug: item {outcome.index} of a batch finished twice")
            results[outcome.index] = outcome
        failed = 0
        for position, error in errors.items():
            if start <= position < end:
                # Few, if any: made as OK above, corrected here.
                outcome = attrs.evolve(made[position - start], status=Status.ERROR, error=error)
                results[outcome.index] = made[position - start] = outcome
                failed += 1
        self._counts[Status.OK] += len(made) - failed
        self._counts[Status.ERROR] += failed
        self._completed += len(made)
        self._ended += len(made)
        self._send.send_batch_nowait(made)

    def _finish(
        self,
        index: int,
        status: Status,
        *,
        value: object = None,
        error: BaseException | None = None,
        ran: float = 0.0,
    ) -> None:
        if self._results[index] is not None:
            raise AssertionError(f"engine bug: item {index} of a batch finished twice")
        outcome: Outcome[T, R] = Outcome(
            index,
            self._items[index],
            status,
            value,  # type: ignore[arg-type]  # R by construction when OK
            error,
            self._queued[index],
            ran,
            self._attempts[index],
        )
        self._results[index] = outcome
        self._ended += 1
        self._counts[status] += 1
        self._send.send_nowait(outcome)
        if status is not Status.CANCELLED:
            self._completed += 1
            if self._on_progress is not None:
                self._on_progress(self._completed, len(self._items))


def _results_lost(failure: BaseException, culprits: list[int]) -> WorkerCrashed:
    """The error of an item that ran, in a call whose worker then died or was killed.

    No culprits: every item the call started had returned, and the worker
    died, or was ended, sending the results back.
    """
    which = f"item {culprits[0]}" if len(culprits) == 1 else "a later item"
    if isinstance(failure, WorkerCrashed):
        exit_code, signal = failure.exit_code, failure.signal
        if culprits:
            what = f"{failure.what}, running {which} of its call"
        else:
            what = f"{failure.what}, sending back the results of its call"
    else:
        exit_code = signal = None
        what = (
            f"running {which} of its call, ended at its deadline"
            if culprits
            else "sending back the results of its call, ended at the item deadline"
        )
    return WorkerCrashed(
        f"{what}; this item had run, and its result was lost with the worker",
        exit_code=exit_code,
        signal=signal,
    )


def _balanced_end(
    now: float,
    waiting: int,
    per_item: float,
    workers: int,
    running: list[tuple[float, float]],
) -> float:
    """When ``waiting`` items would all be done, shared so that every worker ends at once.

    The asking worker is free now and does an item in ``per_item`` seconds;
    each running call ``(ends, per_item)`` frees its worker at ``ends``, which
    then goes at its own speed; other workers are free now, at ``per_item``.
    Solves ``sum((end - free_at) / speed) == waiting`` over the workers free
    by ``end``.
    """
    starts = [(now, per_item)] * (workers - len(running)) + [
        (max(now, ends), speed) for ends, speed in running
    ]
    starts.sort()
    rate = 0.0  # items per second of the workers free so far
    offset = 0.0  # sum of free_at * their rates
    for position, (free_at, speed) in enumerate(starts):
        rate += 1 / max(speed, 1e-9)
        offset += free_at / max(speed, 1e-9)
        end = (waiting + offset) / rate
        if position + 1 == len(starts) or end <= starts[position + 1][0]:
            return end
    return now  # no workers: unreachable, ``workers`` is at least 1


class Bridge(enum.StrEnum):
    """Where the items of a batch run."""

    PROCESS = "process"
    THREAD = "thread"
    ASYNC = "async"


def map_batch(
    fn: Callable[[T], Any],
    items: Iterable[T],
    *,
    workers: int | None = None,
    bridge: str | object = "process",
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
            ``"async"`` (trio code), or a test bridge such as
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
        ValueError: at call time, for a bad number or bridge (named).
        TypeError: at call time, for an argument of the wrong type (named).
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
    if isinstance(bridge, str):
        kind = check_choice("bridge", bridge, Bridge)
        if kind is Bridge.PROCESS:
            pickle_call(fn, ())  # a lambda or a local function fails here, not in a worker
    elif hasattr(bridge, "run") and hasattr(bridge, "chunked"):
        kind = None
    else:
        raise ValueError(
            f"bridge must be 'process', 'thread', 'async' or a bridge object, got {bridge!r}"
        )
    return _open_batch(
        fn, listed, kind, bridge, workers, deadline, on_progress, chunk_size, pool, at_most_once
    )


@asynccontextmanager
async def _open_batch(
    fn: Any,
    items: list[Any],
    kind: Bridge | None,
    bridge: object,
    workers: int | None,
    deadline: float,
    on_progress: Callable[[int, int], object] | None,
    chunk_size: int | None,
    pool: ProcessPool | None,
    at_most_once: bool,
) -> AsyncIterator[Batch[Any, Any]]:
    runner: Runner
    if kind is Bridge.PROCESS:
        if pool is None:
            pool = await _default_pool()
        count = workers or pool.workers
        runner = ProcessRunner(pool)
    elif kind is Bridge.THREAD:
        count = workers or os.cpu_count() or 1
        runner = ThreadRunner(trio.CapacityLimiter(count))
    elif kind is Bridge.ASYNC:
        count = workers or 10
        runner = AsyncRunner()
    else:
        runner = bridge  # type: ignore[assignment]  # checked for run/chunked above
        count = workers or 1
    batch: Batch[Any, Any] = Batch(
        fn,
        items,
        runner,
        workers=count,
        item_deadline=deadline,
        chunk_size=chunk_size,
        on_progress=on_progress,
        at_most_once=at_most_once,
    )
    async with trio.open_nursery() as nursery:
        nursery.start_soon(batch._run)
        yield batch


async def _default_pool() -> ProcessPool:
    await to_process(os.getpid)  # opens (and warms one worker of) the run's default pool
    pool = _DEFAULT.get().pool
    assert pool is not None
    return pool


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
