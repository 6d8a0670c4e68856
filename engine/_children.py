"""One child of a supervisor: what it runs, its runs, and the task of one run.

A run is one task in the supervisor's nursery, holding an inner nursery with
the child's own task and, when ``stall_after`` is finite, a watchdog task.
What follows the end of a run is for the supervisor to decide.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Awaitable, Callable, Iterator
from typing import Literal

import attrs
import trio

from ._backoff import Backoff
from ._exceptions import ChildStalled
from ._names import describe_error
from ._restarts import Restart, RestartName
from ._statistics import ChildState, ChildStatistics
from ._validation import check_choice, check_duration, check_name
from ._watchdog import RunContext, current_run, format_task_tree

logger = logging.getLogger("engine.supervisor")

ChildFunction = Callable[..., Awaitable[object]]


# Seconds a child that drains gets to stop before it is cancelled (OTP's 5000 ms).
DEFAULT_SHUTDOWN = 5.0

CancelReason = Literal["stall", "stop", "restart"]
"""Why the supervisor itself cancelled a run."""


@attrs.frozen
class ChildSpec:
    """What a child runs, and how it is restarted and watched."""

    name: str
    fn: ChildFunction
    args: tuple[object, ...]
    restart: Restart
    backoff: Backoff
    stall_after: float
    wants_ready: bool
    shutdown: float = DEFAULT_SHUTDOWN
    holds: Callable[[], int] | None = None

    @classmethod
    def checked(
        cls,
        fn: ChildFunction,
        args: tuple[object, ...],
        name: str,
        restart: Restart | RestartName,
        backoff: Backoff | None,
        stall_after: float,
        wants_ready: bool,
        shutdown: float,
        holds: Callable[[], int] | None,
    ) -> ChildSpec:
        """The spec of a ``start`` or ``start_soon`` call, every argument checked.

        Positional, in the order of ``Supervisor.start_soon``'s options, so
        that each of its two callers checks them in one short call.
        """
        if not callable(fn):
            raise TypeError(f"fn must be an async callable, got {fn!r}")
        if backoff is not None and not isinstance(backoff, Backoff):
            raise TypeError(f"backoff must be an engine.Backoff, got {backoff!r}")
        if holds is not None and not callable(holds):
            raise TypeError(f"holds must be a callable returning an int, got {holds!r}")
        return cls(
            name=check_name("name", name),
            fn=fn,
            args=args,
            restart=check_choice("restart", restart, Restart),
            backoff=backoff if backoff is not None else Backoff(),
            stall_after=check_duration("stall_after", stall_after),
            wants_ready=wants_ready,
            shutdown=check_duration("shutdown", shutdown, allow_zero=True),
            holds=holds,
        )


@attrs.define(eq=False)
class Run:
    """One run of a child, from launch until its task has ended."""

    initial: bool  # the run of start(), whose caller is told if it fails before ready
    context: RunContext
    started_at: float
    scope: trio.CancelScope = attrs.Factory(trio.CancelScope)
    settled: trio.Event = attrs.Factory(trio.Event)  # ready, or ended before that
    done: trio.Event = attrs.Factory(trio.Event)  # its task has ended
    ready: bool = False
    value: object = None
    cancel_reason: CancelReason | None = None
    error: Exception | None = None
    stall: ChildStalled | None = None
    call_task: trio.lowlevel.Task | None = None

    @property
    def failure(self) -> Exception | None:
        """Why the run failed: its stall, or what the child raised; ``None`` if neither."""
        return self.stall or self.error

    def cancel(self, reason: CancelReason) -> None:
        """Cancel the run, unless its task has ended; the first reason given is kept."""
        if not self.done.is_set():
            self.cancel_reason = self.cancel_reason or reason
            self.scope.cancel()


@attrs.define(eq=False)
class Child:
    """A child as its supervisor knows it: its spec, its current run, its counters."""

    spec: ChildSpec
    order: int
    rng: random.Random
    state: ChildState = ChildState.STARTING
    run: Run | None = None
    restarts: int = 0
    failures: int = 0
    stalls: int = 0
    attempt: int = 0  # consecutive restarts since the last healthy run
    last_error: str | None = None
    last_error_at: float | None = None
    # Set by the restart that will start this child next; a newer restart
    # that includes the child replaces it, and stop() clears it.
    restart_token: object | None = None
    # Set once the supervisor stops it for good (stop() or shutdown()).
    stopping: bool = False

    @property
    def live(self) -> bool:
        """Whether it is starting, running or backing off."""
        return self.state in (ChildState.STARTING, ChildState.RUNNING, ChildState.BACKING_OFF)

    @property
    def restart(self) -> Restart:
        """Its restart type."""
        return self.spec.restart

    def new_run(self, *, initial: bool) -> Run:
        """A run starting now, which becomes the child's current run."""
        now = trio.current_time()
        clock = trio.lowlevel.current_clock()
        run = Run(initial=initial, context=RunContext(self.spec.name, clock, now), started_at=now)
        self.run = run
        self.state = ChildState.STARTING
        return run

    async def cancel_run(self, reason: CancelReason) -> None:
        """Cancel the current run, if there is one, and wait until its task has ended."""
        run = self.run
        if run is not None:
            run.cancel(reason)
            await run.done.wait()
            if self.run is run:
                self.run = None

    def mark_ready(self, run: Run, value: object) -> None:
        """Record that ``run`` reported ready with ``value``."""
        run.ready = True
        run.value = value
        if self.run is run:
            self.state = ChildState.RUNNING
        run.settled.set()

    def record_failure(self, error: BaseException, now: float) -> str:
        """Count a failure at ``now``; returns its description, now ``last_error``."""
        self.failures += 1
        self.last_error = describe_error(error)
        self.last_error_at = now
        return self.last_error

    def statistics(self, now: float) -> ChildStatistics:
        """A frozen snapshot of the child at ``now``."""
        run = self.run
        running = run if run is not None and not run.done.is_set() else None
        return ChildStatistics(
            name=self.spec.name,
            state=self.state,
            restart=str(self.spec.restart),
            ready=running is not None and running.ready,
            restarts=self.restarts,
            failures=self.failures,
            stalls=self.stalls,
            stall_after=self.spec.stall_after,
            last_error=self.last_error,
            last_error_at=self.last_error_at,
            started_at=running.started_at if running else None,
            heartbeat_age=now - running.context.last_beat if running else None,
            attached=tuple(s.statistics() for s in run.context.attached) if run else (),
        )


@attrs.define(eq=False)
class Children:
    """A supervisor's children by name, in start order."""

    supervisor: str
    _by_name: dict[str, Child] = attrs.Factory(dict)
    _added: int = 0

    def __iter__(self) -> Iterator[Child]:
        return iter(self._by_name.values())

    def __getitem__(self, name: str) -> Child:
        try:
            return self._by_name[name]
        except KeyError:
            raise KeyError(f"supervisor {self.supervisor!r} has no child named {name!r}") from None

    @property
    def names(self) -> tuple[str, ...]:
        """Their names, in start order."""
        return tuple(self._by_name)

    def add(self, spec: ChildSpec) -> Child:
        """A new child for ``spec``, taking the name of one that has ended for good.

        Raises:
            ValueError: a live child has that name.
        """
        old = self._by_name.get(spec.name)
        if old is not None and old.live:
            raise ValueError(
                f"supervisor {self.supervisor!r} already has a child named {spec.name!r}"
            )
        self._by_name.pop(spec.name, None)  # a new name goes last, in start order
        self._added += 1
        child = Child(spec=spec, order=self._added, rng=spec.backoff.new_random())
        self._by_name[spec.name] = child
        return child

    def remove(self, child: Child) -> None:
        """Mark ``child`` stopped and forget it, unless a newer child took its name."""
        child.state = ChildState.STOPPED
        child.run = None
        if self._by_name.get(child.spec.name) is child:
            del self._by_name[child.spec.name]


@attrs.define(eq=False)
class ReadySignal:
    """The ``task_status`` a child started with :meth:`Supervisor.start` receives."""

    child: Child
    run: Run

    def started(self, value: object = None) -> None:
        """Report that the child is ready; ``value`` is returned by ``start()``."""
        if self.run.ready:
            raise RuntimeError("called 'started' twice on the same task status")
        self.child.mark_ready(self.run, value)


async def run_child(
    child: Child, run: Run, supervisor: str, on_exit: Callable[[Child, Run], None]
) -> None:
    """Carry out ``run``: the child's own task and its watchdog, until both have ended.

    Then ``on_exit(child, run)`` judges the run, unless it was cancelled from
    outside.

    Raises:
        BaseException: what cancelled the run from outside (the supervisor
            going away), once the child is marked stopped.
    """
    current_run.set(run.context)
    name = child.spec.name
    try:
        with run.scope:
            async with trio.open_nursery() as inner:
                inner.start_soon(_call, child, run, name=name)
                if math.isfinite(child.spec.stall_after):
                    inner.start_soon(_watch, child, run, supervisor, name=f"{name} watchdog")
    except BaseException:
        # Cancelled from outside: the supervisor itself is going away.
        if child.run is run:
            child.state = ChildState.STOPPED
            child.run = None
        raise
    finally:
        run.settled.set()
        run.done.set()
    on_exit(child, run)


async def _call(child: Child, run: Run) -> None:
    run.call_task = trio.lowlevel.current_task()
    spec = child.spec
    try:
        if spec.wants_ready:
            await spec.fn(*spec.args, task_status=ReadySignal(child, run))
        else:
            child.mark_ready(run, None)
            await spec.fn(*spec.args)
    except Exception as exc:
        run.error = exc
    finally:
        # The run is over: this also stops its watchdog.
        run.settled.set()
        run.scope.cancel()


async def _watch(child: Child, run: Run, supervisor: str) -> None:
    limit = child.spec.stall_after
    while True:
        now = trio.current_time()
        deadline = run.context.last_beat + limit
        if now >= deadline:
            break
        await trio.sleep_until(deadline)
    stall = ChildStalled(child.spec.name, limit, now - run.context.last_beat)
    child.stalls += 1
    run.stall = stall
    where = format_task_tree(run.call_task) if run.call_task else "  (its task never ran)\n"
    logger.warning(
        "%s; cancelling it. Where it was:\n%s",
        stall,
        where,
        extra={"supervisor": supervisor, "child": child.spec.name, "stalls": child.stalls},
    )
    run.cancel("stall")
