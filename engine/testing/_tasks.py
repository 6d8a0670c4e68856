"""Tasks that outlive the code that spawned them.

No trio task can outlive ``trio.run``, and a nursery cannot close while a
child runs, so a task can only "leak" into a nursery that outlives the code
under test: one owned by a fixture or a long-lived service object, or trio's
system nursery (``trio.lowlevel.spawn_system_task``). Such a task is cancelled
silently when its owner closes, which hides a missing ``close()`` or a
forgotten background job. The check here makes it loud.

It installs a trio instrument that sees every spawn. A task counts as
*tracked* when it was spawned by a root task (the code under test) or by a
task that is itself tracked; whatever nursery it lands in does not matter.
At the end, every tracked task still alive is a leak.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import trio

from .._watchdog import format_task_tree


class _TaskTracker(trio.abc.Instrument):
    """Follows the tasks spawned, directly or not, by a set of root tasks."""

    def __init__(self, roots: Iterable[trio.lowlevel.Task]) -> None:
        self._roots = frozenset(roots)
        # Insertion-ordered, so leaks are reported in the order they spawned.
        self._alive: dict[trio.lowlevel.Task, None] = {}

    def task_spawned(self, task: trio.lowlevel.Task) -> None:
        # trio calls this synchronously inside the spawning task.
        try:
            spawner = trio.lowlevel.current_task()
        except RuntimeError:  # pragma: no cover - spawned by trio's own bootstrap
            return
        if spawner in self._roots or spawner in self._alive:
            self._alive[task] = None

    def task_exited(self, task: trio.lowlevel.Task) -> None:
        self._alive.pop(task, None)

    def leaked(self) -> list[trio.lowlevel.Task]:
        """The tracked tasks still alive whose parent task is not one of them."""
        return [task for task in self._alive if _parent(task) not in self._alive]

    def check(self, what: str) -> None:
        """Raise AssertionError naming every leaked task and where it waits."""
        leaked = self.leaked()
        if leaked:
            trees = "".join(format_task_tree(task) for task in leaked)
            raise AssertionError(
                f"{len(leaked)} task(s) spawned by {what} still alive:\n{trees}"
                "They live in a nursery that outlives the code that spawned them "
                "(a fixture's, a service's, or the system nursery)."
            )


def _parent(task: trio.lowlevel.Task) -> trio.lowlevel.Task | None:
    nursery = task.parent_nursery
    return None if nursery is None else nursery.parent_task


@contextlib.contextmanager
def _tracking(roots: Iterable[trio.lowlevel.Task]) -> Iterator[_TaskTracker]:
    tracker = _TaskTracker(roots)
    trio.lowlevel.add_instrument(tracker)
    try:
        yield tracker
    finally:
        trio.lowlevel.remove_instrument(tracker)


@contextlib.contextmanager
def assert_no_task_leaks() -> Iterator[None]:
    """Fail if the block leaves behind a task it spawned.

    Tracks every task spawned, directly or indirectly, by code running in the
    block (in the current task), whatever nursery it was spawned into. If any
    is still alive when the block exits normally, raises ``AssertionError``
    naming each one and where it waits. Tasks spawned into nurseries opened
    inside the block have always finished by then, so what it catches is work
    handed to longer-lived owners: a fixture's or a service's nursery, or the
    system nursery. If the block raises, nothing is checked and the exception
    propagates unchanged.

    Use it inside a trio run: ``with engine.testing.assert_no_task_leaks(): ...``.
    Tasks spawned from other threads through ``trio.from_thread`` are spawned
    by trio's token task, not by the block, and are not tracked.

    Yields:
        Nothing; the check runs on exit.

    Raises:
        AssertionError: on exit, if a tracked task is still alive.
        RuntimeError: if called outside a trio run.
    """
    with _tracking([trio.lowlevel.current_task()]) as tracker:
        yield
    tracker.check("the block")
