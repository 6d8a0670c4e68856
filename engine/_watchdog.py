"""Heartbeats, and what the stall watchdog needs to name where a child is stuck.

Each run of a supervised child gets a :class:`RunContext` in a context
variable. Trio copies context variables into every task a child spawns and
into threads started with ``trio.to_thread``, so :func:`heartbeat` finds the
run from anywhere inside the child without being handed anything.
"""

from __future__ import annotations

import contextlib
import contextvars
import traceback
from collections.abc import Iterator
from typing import Protocol

import attrs
import trio

from ._runtime import Shutdown


class StatisticsSource(Protocol):
    """Something that can be listed under a child in the supervision tree."""

    @property
    def name(self) -> str:
        """Its name in the tree."""
        ...

    def statistics(self) -> object:
        """A frozen snapshot of what it has done (an attrs class exports on /metrics)."""
        ...


@attrs.define(eq=False)
class RunContext:
    """What one run of a child shares with the code it runs (private)."""

    child: str
    clock: trio.abc.Clock
    last_beat: float
    # Supervisors and cycles opened inside this run, so statistics form a tree.
    attached: list[StatisticsSource] = attrs.Factory(list)
    # Requested by the supervisor's shutdown(); see engine.current_stop().
    stop: Shutdown = attrs.Factory(Shutdown)
    # Whether the run's code asked for its stop request: one that never did
    # cannot act on it, so its supervisor cancels it at once.
    stop_watched: bool = False

    def beat(self) -> None:
        # The clock, not trio.current_time(), so that threads may beat too.
        self.last_beat = self.clock.current_time()


current_run: contextvars.ContextVar[RunContext | None] = contextvars.ContextVar(
    "engine_current_run", default=None
)


def heartbeat() -> None:
    """Tell the supervisor that the current child is making progress.

    Call it from anywhere inside a supervised child: the child's own task,
    tasks it spawned, or a thread it started through ``trio.to_thread`` or
    the engine's bridges. A child started with ``stall_after=S`` that has not
    called this for ``S`` seconds is cancelled and restarted by policy.

    Outside a supervised child it does nothing, so library code may beat
    unconditionally. It is synchronous and cheap (one attribute store).
    """
    run = current_run.get()
    if run is not None:
        run.beat()


@contextlib.contextmanager
def attach_statistics(source: StatisticsSource) -> Iterator[None]:
    """List ``source`` under the current supervised child while the block runs.

    A supervisor, a cycle or a server opened inside a supervised child
    appears under that child in its supervisor's statistics, so statistics
    form a tree. Outside a supervised child it does nothing.

    Args:
        source: anything with a ``name`` and a ``statistics()`` method.
    """
    run = current_run.get()
    if run is None:
        yield
        return
    run.attached.append(source)
    try:
        yield
    finally:
        if source in run.attached:
            run.attached.remove(source)


def format_task_tree(task: trio.lowlevel.Task) -> str:
    """Where ``task`` and every task below it are waiting, as tracebacks.

    The watchdog logs this when it cancels a stalled child: the innermost
    frames say which call is stuck.
    """
    lines: list[str] = []
    _format_into(task, lines, depth=0)
    return "".join(lines)


def _format_into(task: trio.lowlevel.Task, lines: list[str], depth: int) -> None:
    indent = "  " * depth
    lines.append(f"{indent}task {task.name!r}:\n")
    for entry in traceback.StackSummary.extract(task.iter_await_frames()).format():
        lines.extend(f"{indent}{line}\n" for line in entry.rstrip("\n").split("\n"))
    for nursery in task.child_nurseries:
        for child in nursery.child_tasks:
            _format_into(child, lines, depth + 1)
