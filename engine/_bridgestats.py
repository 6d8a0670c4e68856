"""Counters shared by the thread and process bridges, one set per trio run."""

from __future__ import annotations

import threading

import attrs
import trio


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

    thread_calls: int
    threads_abandoned: int
    threads_abandoned_running: int
    iterator_threads_abandoned: int
    process_calls: int
    workers_killed: int
    workers_crashed: int
    batch_ok: int
    batch_error: int
    batch_timeout: int
    batch_crashed: int
    batch_cancelled: int


@attrs.define
class Tally:
    """The mutable counters behind :class:`BridgeStatistics` (private)."""

    thread_calls: int = 0
    threads_abandoned: int = 0
    threads_abandoned_running: int = 0
    iterator_threads_abandoned: int = 0
    process_calls: int = 0
    workers_killed: int = 0
    workers_crashed: int = 0
    batch_outcomes: dict[str, int] = attrs.Factory(dict)
    # Abandoned threads finish in their own thread and decrement a counter.
    lock: threading.Lock = attrs.Factory(threading.Lock)

    def snapshot(self) -> BridgeStatistics:
        with self.lock:
            return BridgeStatistics(
                thread_calls=self.thread_calls,
                threads_abandoned=self.threads_abandoned,
                threads_abandoned_running=self.threads_abandoned_running,
                iterator_threads_abandoned=self.iterator_threads_abandoned,
                process_calls=self.process_calls,
                workers_killed=self.workers_killed,
                workers_crashed=self.workers_crashed,
                batch_ok=self.batch_outcomes.get("ok", 0),
                batch_error=self.batch_outcomes.get("error", 0),
                batch_timeout=self.batch_outcomes.get("timeout", 0),
                batch_crashed=self.batch_outcomes.get("crashed", 0),
                batch_cancelled=self.batch_outcomes.get("cancelled", 0),
            )

    def count_batch_outcome(self, status: str, count: int = 1) -> None:
        self.batch_outcomes[status] = self.batch_outcomes.get(status, 0) + count


_TALLY: trio.lowlevel.RunVar[Tally] = trio.lowlevel.RunVar("engine_bridge_tally")


def tally() -> Tally:
    """The current run's counters, created on first use."""
    try:
        return _TALLY.get()
    except LookupError:
        fresh = Tally()
        _TALLY.set(fresh)
        return fresh


def bridge_statistics() -> BridgeStatistics:
    """A frozen snapshot of the bridges' counters for the current trio run.

    Raises:
        RuntimeError: called outside a trio run.
    """
    return tally().snapshot()
