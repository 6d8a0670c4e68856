"""A map_batch bridge that runs items in virtual time, as a process bridge would."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import attrs
import trio

from .._board import NO_LIMIT
from .._exceptions import WorkerCrashed
from .._runner import Call, ChunkReport, Finished, lost_with_the_worker, too_slow
from .._schedule import chunk_deadline, may_start


def _finite_and_not_negative(
    instance: object, attribute: attrs.Attribute[float], value: float
) -> None:
    if not 0 <= value < math.inf:
        raise ValueError(f"{attribute.name} must be a finite number >= 0, got {value!r}")


@attrs.define(eq=False)
class VirtualBridge:
    """Pass as ``engine.map_batch(..., bridge=VirtualBridge(...))`` to test deadlines fast.

    Each item "takes" ``duration(item)`` seconds of trio time (``math.inf``
    hangs it) and then returns ``fn(item)``, called inline; an item for
    which ``crashes(item)`` is true kills its "worker" when it starts. Chunks
    behave exactly as on the process bridge: a call's clock stops it starting
    items, a chunk that runs past its deadline, or whose worker dies, loses
    its results and is re-run item by item. With ``map_batch(...,
    at_most_once=True)``, as there, an item is ended at its own deadline,
    counted from its start, calls are not shared, and nothing runs twice.
    Under ``autojump_clock`` a batch with 60 s deadlines runs in
    milliseconds with exact, asserted times.

    Args:
        duration: virtual seconds each item takes.
        crashes: which items kill their worker; none by default.
        dispatch: virtual seconds from sending a call to its first item (a
            process call's pickling and wake-up), counted against the call's
            deadline as on the process bridge; 0 by default.

    Attributes:
        calls: the item indices of every call, in dispatch order.
        started: the index of each item each time it started, in order
            (an item that hangs or crashes its worker counts as started).
        max_in_flight: the most calls that ran at once.
    """

    duration: Callable[[Any], float]
    crashes: Callable[[Any], bool] = attrs.field(default=lambda item: False)
    dispatch: float = attrs.field(default=0.0, kw_only=True, validator=_finite_and_not_negative)
    chunked: bool = attrs.field(default=True, init=False)
    calls: list[list[int]] = attrs.field(factory=list, init=False)
    started: list[int] = attrs.field(factory=list, init=False)
    max_in_flight: int = attrs.field(default=0, init=False)
    _in_flight: int = attrs.field(default=0, init=False)

    async def run(
        self,
        fn: Callable[[Any], object],
        chunk: list[tuple[int, Any]],
        deadline: float,
        stop_after: float = math.inf,
        call: Call | None = None,
    ) -> ChunkReport:
        """Run one call of ``chunk`` (called by the batch; not for users)."""
        self.calls.append([index for index, _ in chunk])
        self._in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self._in_flight)
        progress = _Progress()
        at_most_once = call is not None and call.at_most_once
        if call is not None:
            call.started = lambda: progress.started
            if not at_most_once:  # as on the process bridge
                call.cut = functools.partial(setattr, progress, "limit")
        try:
            return await self._run(fn, chunk, deadline, stop_after, progress, at_most_once)
        finally:
            self._in_flight -= 1
            if call is not None:
                call.started = call.cut = None

    async def _run(
        self,
        fn: Callable[[Any], object],
        chunk: list[tuple[int, Any]],
        deadline: float,
        stop_after: float,
        progress: _Progress,
        at_most_once: bool,
    ) -> ChunkReport:
        await trio.lowlevel.checkpoint()  # a real call always lets others run
        time_limit = chunk_deadline(deadline, len(chunk), stop_after)
        # Results stay in the "worker" until the call returns: a crash or a
        # kill loses all of them, as it would in a real process.
        report = ChunkReport()
        if at_most_once and self.dispatch >= deadline:
            # Watched item by item, a call that starts no item within the
            # deadline is ended: which item it ran, if any, cannot be told.
            await trio.sleep(deadline)
            return lost_with_the_worker(chunk, 0, too_slow(deadline))
        if self.dispatch:
            await trio.sleep(self.dispatch)
        # The worker's clock starts with its first item, the deadline's at dispatch.
        elapsed = 0.0
        for position, (index, item) in enumerate(chunk):
            if position >= progress.limit:
                break  # the rest were given to another call
            left = min(len(chunk), progress.limit) - position
            if position and not may_start(elapsed, position, left, stop_after):
                # Out of time: the rest go back unstarted, as in a real worker.
                report.not_started = [i for i, _ in chunk[position : progress.limit]]
                break
            progress.started = position + 1
            self.started.append(index)
            if self.crashes(item):
                crash = WorkerCrashed(f"running item {index} (virtual)", exit_code=None, signal=9)
                return lost_with_the_worker(chunk[: progress.limit], progress.started, crash)
            took = self.duration(item)
            # Past the deadline the worker is killed, taking all results with
            # it: the call's deadline, from dispatch, or, watched item by
            # item, the item's own, from its start.
            spent = 0.0 if at_most_once else self.dispatch + elapsed
            limit = deadline if at_most_once else time_limit
            if spent + took > limit:
                await trio.sleep(limit - spent if math.isfinite(limit) else math.inf)
                kept = chunk[: progress.limit]
                return lost_with_the_worker(kept, progress.started, too_slow(deadline))
            # Item by item, so that the batch sees how far the call has got.
            await trio.sleep(took)
            elapsed += took
            try:
                report.finished.append(Finished(index, True, fn(item), None, took))
            except Exception as exc:
                report.finished.append(Finished(index, False, None, exc, took))
        return report


@attrs.define
class _Progress:
    started: int = 0
    limit: int = NO_LIMIT
