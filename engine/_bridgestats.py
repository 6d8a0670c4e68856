"""Counters shared by the thread and process bridges, one set per trio run."""

from __future__ import annotations

import threading

import attrs
import trio

from ._counters import Tally, counter_metric, gauge_metric, metric_source
from ._runlocal import run_local


@metric_source(label=None)
@attrs.frozen
class BridgeStatistics:
    """What the bridges of the current trio run have done so far.

    Attributes:
        thread_calls: calls of :func:`engine.to_thread`.
        threads_abandoned: calls whose caller was cancelled while the thread
            still ran (the thread finishes on its own; its result is dropped).
        threads_abandoned_running: of those, the threads still running now.
        iterator_threads_abandoned: :func:`engine.iterate_in_thread` threads
            that did not stop in time when their block ended.
        process_calls: calls run in a worker process (``to_process``,
            process-pool calls, and ``map_batch`` chunks).
        workers_killed: worker processes killed because their caller was
            cancelled (a deadline, a stop).
        workers_crashed: worker processes that died on their own (a signal,
            ``os._exit``, a segfault) while running a call.
        batch_ok, batch_error, batch_timeout, batch_crashed, batch_cancelled:
            outcomes of :func:`engine.map_batch` items, by status.
    """

    # thread_calls, process_calls and batch_* are samples of labelled
    # families, built in _metrics.py.
    thread_calls: int = 0
    threads_abandoned: int = attrs.field(
        default=0,
        metadata=counter_metric("Thread calls whose caller was cancelled while the thread ran"),
    )
    threads_abandoned_running: int = attrs.field(
        default=0, metadata=gauge_metric("Abandoned threads still running")
    )
    iterator_threads_abandoned: int = attrs.field(
        default=0,
        metadata=counter_metric("Blocking-iterator threads that did not stop in time"),
    )
    process_calls: int = 0
    workers_killed: int = attrs.field(
        default=0,
        metadata=counter_metric("Worker processes killed because their caller was cancelled"),
    )
    workers_crashed: int = attrs.field(
        default=0, metadata=counter_metric("Worker processes that died during a call")
    )
    batch_ok: int = 0
    batch_error: int = 0
    batch_timeout: int = 0
    batch_crashed: int = 0
    batch_cancelled: int = 0


class _Tally(Tally[BridgeStatistics]):
    """The mutable counters behind :class:`BridgeStatistics` (private)."""

    __slots__ = ("lock",)

    def __init__(self) -> None:
        super().__init__()
        # Abandoned threads finish in their own thread and decrement a counter.
        self.lock = threading.Lock()

    def count_batch_outcome(self, status: str, count: int = 1) -> None:
        """Add ``count`` items of a :func:`engine.map_batch` outcome ``status``."""
        name = f"batch_{status}"
        setattr(self, name, getattr(self, name) + count)


_TALLY: trio.lowlevel.RunVar[_Tally] = trio.lowlevel.RunVar("engine_bridge_tally")


def tally() -> _Tally:
    """The current run's counters, created on first use."""
    return run_local(_TALLY, _Tally)


def bridge_statistics() -> BridgeStatistics:
    """A frozen snapshot of the bridges' counters for the current trio run.

    Raises:
        RuntimeError: called outside a trio run.
    """
    counters = tally()
    with counters.lock:
        return counters.snapshot()
