"""Loop-stall detection: notice when the event loop stops turning and name who holds it.

Two halves, one on each side of the loop:

* In the loop, a *feeder* task wakes every ``poll`` seconds and publishes
  when it is next due (``perf_counter`` time). If it wakes more than
  ``threshold`` late, the loop was stalled that long; the feeder counts and
  logs the stall once the loop turns again.
* Outside the loop, a *watch thread* checks the feeder's due time every
  ``poll`` seconds. Once it is overdue by more than ``threshold`` the loop is
  stalled *now*: the thread samples the trio thread's stack
  (``sys._current_frames``), finds the task whose coroutine is running
  (``coro.cr_running``) and logs both at once, so a loop that never turns
  again (a blocking ``pubsub.listen()``, say) is still named. While the
  stall lasts, the thread also answers the ops server's pending connections.

With ``per_step=True`` a trio :class:`~trio.abc.Instrument` times every task
step instead: exact durations and task names, at the cost of two hook calls
per step (see the ops docs for the measured overhead).
"""

from __future__ import annotations

import logging
import math
import sys
import sysconfig
import threading
import traceback
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from time import perf_counter

import attrs
import trio

from ._counters import Tally, counter_metric, gauge_metric, metric_source
from ._validation import check_duration

logger = logging.getLogger("engine.loop")

# Most stack lines kept per stall: the innermost ones say what blocks.
_MAX_STACK = 12
# The watch thread's longest wait: bounds how late a stall is seen.
_MAX_POLL = 0.05


@attrs.frozen
class LoopStall:
    """One stall of the event loop.

    Attributes:
        task: the name of the task that held the loop, or ``None`` when the
            stall ended before it could be sampled.
        where: the innermost line it was running, ``"file:line in func: code"``.
        stack: the task's frames, outermost first, as ``"file:line in func"``.
        seconds: how long the loop did not turn (so far, while ``ongoing``).
        ongoing: whether the loop is still stalled.
    """

    task: str | None
    where: str | None
    stack: tuple[str, ...]
    seconds: float
    ongoing: bool

    def describe(self) -> str:
        """The stall in words: ``event loop stalled 1.20 s in task 'feed' at ...``."""
        task = f"task {self.task!r}" if self.task else "an unsampled task"
        where = f" at {self.where}" if self.where else ""
        return f"event loop stalled {self.seconds:.2f} s in {task}{where}"


@metric_source(label=None)
@attrs.frozen
class LoopStatistics:
    """A snapshot of the loop-stall detector.

    Attributes:
        threshold: a loop that does not turn for longer than this is stalled.
        per_step: whether the per-step instrument does the timing.
        stalls: stalls seen so far.
        stall_seconds_total: their summed length.
        stall_seconds_max: the longest one.
        last_stall: the latest stall that ended, or ``None``.
    """

    threshold: float = attrs.field(
        metadata=gauge_metric("What counts as a stall", name="stall_threshold_seconds")
    )
    per_step: bool
    stalls: int = attrs.field(default=0, metadata=counter_metric("Event-loop stalls"))
    stall_seconds_total: float = attrs.field(
        default=0.0, metadata=counter_metric("Summed length of the stalls", name="stall_seconds")
    )
    stall_seconds_max: float = attrs.field(default=0.0, metadata=gauge_metric("The longest stall"))
    last_stall: LoopStall | None = None


class _Tally(Tally[LoopStatistics]):
    """The counters behind :meth:`LoopWatch.statistics` (under the watch's lock)."""


@attrs.define(eq=False)
class _Episode:
    key: float  # when the stall began (the feeder's due time, or the step's start)
    task: str | None
    stack: tuple[str, ...] = ()
    where: str | None = None


class _StepTimer(trio.abc.Instrument):
    """Times every task step; the opt-in precise mode of :class:`LoopWatch`."""

    __slots__ = ("current", "watch")

    def __init__(self, watch: LoopWatch) -> None:
        self.watch = watch
        # One tuple, assigned at once, so the watch thread never reads a
        # start time that belongs to another task.
        self.current: tuple[float, trio.lowlevel.Task] | None = None

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self.current = (perf_counter(), task)

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        current = self.current
        self.current = None
        if current is not None:
            took = perf_counter() - current[0]
            if took > self.watch.threshold:
                self.watch._ended(current[0], took, task.name)


@attrs.define(eq=False)
class LoopWatch:
    """The loop-stall detector of one trio run; open it with :func:`open_loop_watch`.

    Attributes:
        threshold: seconds the loop may go without turning before it counts
            as stalled.
        poll: how often the feeder turns and the watch thread looks.
        per_step: whether task steps are timed by a trio instrument.
    """

    threshold: float
    poll: float
    per_step: bool
    _root: trio.lowlevel.Task | None = attrs.field(repr=False)
    _trio_thread: int = attrs.field(repr=False)
    _due_at: float = attrs.field(init=False, repr=False, default=math.inf)
    _timer: _StepTimer | None = attrs.field(init=False, repr=False, default=None)
    _lock: threading.Lock = attrs.field(init=False, repr=False, factory=threading.Lock)
    _stop: threading.Event = attrs.field(init=False, repr=False, factory=threading.Event)
    _episode: _Episode | None = attrs.field(init=False, repr=False, default=None)
    _ended_key: float = attrs.field(init=False, repr=False, default=math.nan)
    _tally: _Tally = attrs.field(init=False, repr=False, factory=_Tally)
    # Called by the watch thread, over and over, while the loop is stalled.
    on_stalled: Callable[[float], None] | None = attrs.field(init=False, repr=False, default=None)

    def statistics(self) -> LoopStatistics:
        """A frozen snapshot of the stalls seen so far."""
        with self._lock:
            return self._tally.snapshot(threshold=self.threshold, per_step=self.per_step)

    def current_stall(self) -> LoopStall | None:
        """The stall in progress, or ``None`` while the loop turns.

        Meant for other threads: called in the trio thread, the loop is
        obviously turning, and the answer is ``None`` or about to be.
        """
        begun = self._stalled_since()
        if begun is None:
            return None
        with self._lock:
            episode = self._episode
        if episode is None or episode.key != begun[0]:
            return LoopStall(None, None, (), perf_counter() - begun[0], ongoing=True)
        return _stall(episode, perf_counter() - begun[0], ongoing=True)

    # -- the trio side ------------------------------------------------------

    async def _feed(self) -> None:
        try:
            due = self._due_at  # set when the watch opened, before this task first ran
            while True:
                await trio.sleep(max(0.0, due - perf_counter()))
                late = perf_counter() - due
                if late > self.threshold:
                    self._ended(due, late, None)
                due = perf_counter() + self.poll
                self._due_at = due
        finally:
            self._due_at = math.inf  # not fed any more, but not stalled either

    def _ended(self, key: float, seconds: float, task: str | None) -> None:
        """Count and log a stall that is over (called in the trio thread)."""
        tally = self._tally
        with self._lock:
            episode = self._episode
            if episode is None or episode.key != key:
                tally.stalls += 1  # the watch thread did not see this one
                episode = _Episode(key, task)
            self._episode = None
            self._ended_key = key
            tally.stall_seconds_total += seconds
            tally.stall_seconds_max = max(tally.stall_seconds_max, seconds)
            tally.last_stall = stall = _stall(episode, seconds, ongoing=False)
        logger.warning(
            "%s; the loop turns again",
            stall.describe(),
            extra={"task": stall.task, "stall_seconds": round(seconds, 3)},
        )

    # -- the watch thread ---------------------------------------------------

    def _stalled_since(self) -> tuple[float, trio.lowlevel.Task | None] | None:
        """``(key, task)`` when the loop is stalled past the threshold, else ``None``."""
        now = perf_counter()
        if self._timer is not None:
            current = self._timer.current
            if current is not None and now - current[0] > self.threshold:
                return current
            return None
        due = self._due_at
        if now - due > self.threshold:
            return due, None
        return None

    def _watch(self) -> None:
        while not self._stop.is_set():
            try:
                self._look()
            except Exception:
                # The watch must outlive a bad sample or a broken client; say so and go on.
                logger.exception("loop watch: unexpected error")
                self._stop.wait(self.poll)

    def _look(self) -> None:
        begun = self._stalled_since()
        if begun is not None:
            self._begin(*begun)
        on_stalled = self.on_stalled
        if begun is not None and on_stalled is not None:
            on_stalled(self.poll)  # waits up to poll for connections to answer
        else:
            self._stop.wait(self.poll)

    def _begin(self, key: float, task: trio.lowlevel.Task | None) -> None:
        with self._lock:
            if self._episode is not None and self._episode.key == key:
                return  # already seen and logged
        name, stack, where = self._sample(task)
        with self._lock:
            if key == self._ended_key or (self._episode is not None and self._episode.key == key):
                return  # it ended, or was seen, while we sampled
            self._episode = episode = _Episode(key, name, stack, where)
            self._tally.stalls += 1
        stall = _stall(episode, perf_counter() - key, ongoing=True)
        logger.warning(
            "%s, and it is still stalled. The task's stack:\n  %s",
            stall.describe(),
            "\n  ".join(stack) or "(not available)",
            extra={"task": name},
        )

    def _sample(
        self, task: trio.lowlevel.Task | None
    ) -> tuple[str | None, tuple[str, ...], str | None]:
        """The stalling task's name, its stack, and the application line it is on."""
        frame = sys._current_frames().get(self._trio_thread)
        if frame is None:
            return (task.name if task else None), (), None
        summary = traceback.extract_stack(frame)
        # Keep the task's own frames: those inside trio's run loop.
        starts = [i for i, f in enumerate(summary) if f.name == "unrolled_run"]
        frames = summary[starts[-1] + 1 :] if starts else summary
        # The innermost frame of the application is the line to fix; library
        # frames below it (threading, socket, a client library) come after it.
        ours = [i for i, f in enumerate(frames) if not _is_library(f.filename)]
        cut = ours[-1] + 1 if ours else len(frames)
        stack = tuple(_line(f) for f in frames[max(0, cut - _MAX_STACK) : cut])
        where = stack[-1] if stack else None
        stack += tuple(_line(f) for f in frames[cut:][:_MAX_STACK])
        if task is None:
            task = _running_task(self._root)
        return (task.name if task else None), stack, where


def _stall(episode: _Episode, seconds: float, *, ongoing: bool) -> LoopStall:
    return LoopStall(
        task=episode.task,
        where=episode.where,
        stack=episode.stack,
        seconds=seconds,
        ongoing=ongoing,
    )


_LIBRARY_PATHS = tuple(
    {sysconfig.get_paths()[key] for key in ("stdlib", "platstdlib", "purelib", "platlib")}
)


def _is_library(filename: str) -> bool:
    return filename.startswith(_LIBRARY_PATHS) or filename.startswith("<")


def _line(frame: traceback.FrameSummary) -> str:
    return f"{frame.filename}:{frame.lineno} in {frame.name}: {(frame.line or '').strip()}"


def _tasks(task: trio.lowlevel.Task) -> Iterator[trio.lowlevel.Task]:
    yield task
    for nursery in task.child_nurseries:
        for child in nursery.child_tasks:
            yield from _tasks(child)


def _running_task(root: trio.lowlevel.Task | None) -> trio.lowlevel.Task | None:
    """The task whose coroutine is executing right now (read from another thread)."""
    if root is None:
        return None
    for _ in range(3):
        try:
            return next((t for t in _tasks(root) if t.coro.cr_running), None)
        except RuntimeError:
            continue  # the loop changed a set of tasks under us: look again
    return None


@asynccontextmanager
async def open_loop_watch(
    *, threshold: float = 0.1, per_step: bool = False
) -> AsyncIterator[LoopWatch]:
    """Detect event-loop stalls for as long as the block runs.

    A stall is a stretch of more than ``threshold`` seconds in which the loop
    does not turn: a task that calls ``time.sleep``, a blocking socket, a
    blocking iterator, or a long computation without a checkpoint. Each
    stall is logged twice on logger ``engine.loop``: by the watch thread as
    soon as it is seen (with the task's name and stack, even if the loop
    never turns again) and by the loop when it ends (with its length).

    ``serve_ops`` opens one for you; open one yourself to watch a program
    that serves no ops endpoints.

    Args:
        threshold: seconds without a turn that count as a stall (default
            0.1); ``math.inf`` turns detection off. The watch thread and the feeder task look every
            ``min(threshold / 4, 0.05)`` seconds.
        per_step: also install a trio instrument that times every task step,
            so stalls are exact to the step and even short ones are named.
            It costs two hook calls per step; see the ops docs.

    Yields:
        The :class:`LoopWatch`; its ``statistics()`` counts the stalls.

    Raises:
        TypeError, ValueError: ``threshold`` is not a positive number.
    """
    threshold = check_duration("threshold", threshold)
    watch = LoopWatch(
        threshold=threshold,
        poll=min(threshold / 4, _MAX_POLL),
        per_step=bool(per_step),
        root=trio.lowlevel.current_root_task(),
        trio_thread=threading.get_ident(),
    )
    thread = threading.Thread(target=watch._watch, name="engine loop watch", daemon=True)
    if per_step:
        watch._timer = _StepTimer(watch)
        trio.lowlevel.add_instrument(watch._timer)
    try:
        async with trio.open_nursery() as nursery:
            if not per_step:
                # Due at once: a stall that begins before the feeder's first step still shows.
                watch._due_at = perf_counter() + watch.poll
                nursery.start_soon(watch._feed, name="engine loop watch feeder")
            thread.start()
            try:
                yield watch
            finally:
                nursery.cancel_scope.cancel()
    finally:
        watch._stop.set()
        if watch._timer is not None:
            trio.lowlevel.remove_instrument(watch._timer)
        if thread.is_alive():
            # The thread may be answering a slow client; never block the loop on it.
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(thread.join)
