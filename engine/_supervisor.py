"""Supervisors: children that are restarted by policy, watched for stalls, and counted.

A supervisor owns a nursery. Each run of a child is one task in it, holding
an inner nursery with the child's own task and, when ``stall_after`` is
finite, a watchdog task. A run that ends is judged in ``_on_exit`` (a plain
function, so no other task can interleave with the decision); a restart is
a task of its own in the supervisor's nursery, so one child's backoff never
delays another child's restart.
"""

from __future__ import annotations

import collections
import enum
import logging
import math
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager

import attrs
import trio

from ._backoff import Backoff
from ._exceptions import ChildStalled, ChildStartError, FailureRecord, RestartIntensityExceeded
from ._names import describe_error
from ._statistics import ChildState, ChildStatistics, SupervisorStatistics
from ._validation import check_choice, check_count, check_duration, check_name
from ._watchdog import RunContext, attach, current_run, detach, format_task_tree

logger = logging.getLogger("engine.supervisor")

ChildFunction = Callable[..., Awaitable[object]]

# Failures kept for the intensity report; more would only repeat themselves.
_MAX_FAILURE_RECORDS = 50


class Strategy(enum.StrEnum):
    """Which children a supervisor restarts when one of them ends abnormally."""

    ONE_FOR_ONE = "one_for_one"
    """Only the child that ended."""
    ONE_FOR_ALL = "one_for_all"
    """Every live child: all are stopped, then started again in order."""
    REST_FOR_ONE = "rest_for_one"
    """The child that ended and every live child started after it."""


class Restart(enum.StrEnum):
    """When a child that ended is started again."""

    PERMANENT = "permanent"
    """Always, whether it failed or returned."""
    TRANSIENT = "transient"
    """Only when it failed (raised or stalled)."""
    TEMPORARY = "temporary"
    """Never; a group restart stops it and leaves it stopped."""


class _Cancel(enum.Enum):
    """Why the supervisor itself cancelled a run."""

    STALL = "stall"
    STOP = "stop"
    RESTART = "restart"


@attrs.frozen
class _ChildSpec:
    name: str
    fn: ChildFunction
    args: tuple[object, ...]
    restart: Restart
    backoff: Backoff
    stall_after: float
    wants_ready: bool


@attrs.define(eq=False)
class _Run:
    """One run of a child, from launch until its task has ended."""

    initial: bool  # the run of start(), whose caller is told if it fails before ready
    context: RunContext
    started_at: float
    scope: trio.CancelScope = attrs.Factory(trio.CancelScope)
    settled: trio.Event = attrs.Factory(trio.Event)  # ready, or ended before that
    done: trio.Event = attrs.Factory(trio.Event)  # its task has ended
    ready: bool = False
    value: object = None
    cancel_reason: _Cancel | None = None
    error: Exception | None = None
    stall: ChildStalled | None = None
    call_task: trio.lowlevel.Task | None = None


@attrs.define(eq=False)
class _Child:
    spec: _ChildSpec
    order: int
    rng: random.Random
    state: ChildState = ChildState.STARTING
    run: _Run | None = None
    restarts: int = 0
    failures: int = 0
    stalls: int = 0
    attempt: int = 0  # consecutive restarts since the last healthy run
    last_error: str | None = None
    last_error_at: float | None = None
    # Set by the restart that will start this child next; a newer restart
    # that includes the child replaces it, and stop() clears it.
    restart_token: object | None = None

    @property
    def live(self) -> bool:
        return self.state in (ChildState.STARTING, ChildState.RUNNING, ChildState.BACKING_OFF)


@attrs.define(eq=False)
class _ReadySignal:
    """The ``task_status`` a child started with :meth:`Supervisor.start` receives."""

    supervisor: Supervisor
    child: _Child
    run: _Run

    def started(self, value: object = None) -> None:
        """Report that the child is ready; ``value`` is returned by ``start()``."""
        if self.run.ready:
            raise RuntimeError("called 'started' twice on the same task status")
        self.supervisor._mark_ready(self.child, self.run, value)


class Supervisor:
    """Runs children, restarts them by policy, and cancels the ones that stall.

    Open one with :func:`open_supervisor`; do not construct it directly.
    Like a nursery, the ``async with`` block ends once every child has ended
    for good; cancel the enclosing scope, or call :meth:`cancel`, to stop a
    supervisor whose children run forever.
    """

    def __init__(self, *, name: str, strategy: Strategy, max_restarts: int, period: float) -> None:
        self._name = name
        self._strategy = strategy
        self._max_restarts = max_restarts
        self._period = period
        self._nursery: trio.Nursery | None = None
        self._closed = False
        self._children: dict[str, _Child] = {}
        self._order = 0
        self._restart_times: collections.deque[float] = collections.deque()
        self._failures: collections.deque[FailureRecord] = collections.deque(
            maxlen=_MAX_FAILURE_RECORDS
        )
        self._failure: RestartIntensityExceeded | None = None

    @property
    def name(self) -> str:
        """The supervisor's name, as used in logs and statistics paths."""
        return self._name

    @property
    def strategy(self) -> str:
        """The restart strategy: ``one_for_one``, ``one_for_all`` or ``rest_for_one``."""
        return str(self._strategy)

    @property
    def children(self) -> tuple[str, ...]:
        """Names of the children the supervisor knows, in start order."""
        return tuple(self._children)

    def start_soon(
        self,
        fn: ChildFunction,
        *args: object,
        name: str,
        restart: str = "permanent",
        backoff: Backoff | None = None,
        stall_after: float = math.inf,
        reports_ready: bool = False,
    ) -> None:
        """Start a child without waiting for it, like ``nursery.start_soon``.

        Args:
            fn: the async function the child runs, called as ``fn(*args)``.
            *args: positional arguments for ``fn``.
            name: unique among this supervisor's live children.
            restart: ``"permanent"``, ``"transient"`` or ``"temporary"``.
            backoff: delays between restarts; ``Backoff()`` when omitted.
            stall_after: seconds without :func:`engine.heartbeat` after which
                the child is cancelled and counted as stalled; ``math.inf``
                (the default) turns the watchdog off.
            reports_ready: call ``fn(*args, task_status=...)`` and count the
                child as ready only once it calls ``task_status.started()``
                (a feed that is ready when connected). Unlike :meth:`start`,
                a failure before that is handled by the restart policy,
                because nobody is waiting to be told.

        Raises:
            ValueError: for a bad argument, or a name already in use.
            RuntimeError: if the supervisor has already closed.
        """
        spec = self._spec(fn, args, name, restart, backoff, stall_after, wants_ready=reports_ready)
        self._launch(self._add(spec), initial=False)

    async def start(
        self,
        fn: ChildFunction,
        *args: object,
        name: str,
        restart: str = "permanent",
        backoff: Backoff | None = None,
        stall_after: float = math.inf,
    ) -> object:
        """Start a child and wait until it reports ready, like ``nursery.start``.

        ``fn`` is called as ``fn(*args, task_status=...)`` and must call
        ``task_status.started(value)`` once it is ready; restarts wait for
        readiness the same way, so in a group restart each child is ready
        before the next one starts. The watchdog, if any, already runs
        during startup.

        Args: as for :meth:`start_soon`.

        Returns:
            The value the child passed to ``task_status.started``.

        Raises:
            ChildStartError: the child raised, stalled or returned before it
                reported ready. It is not restarted; the cause is chained.
            ValueError: for a bad argument, or a name already in use.
            RuntimeError: if the supervisor has already closed.
        """
        spec = self._spec(fn, args, name, restart, backoff, stall_after, wants_ready=True)
        child = self._add(spec)
        run = self._launch(child, initial=True)
        try:
            await run.settled.wait()
        except BaseException:
            # Our caller was cancelled: like nursery.start, the start is abandoned.
            self._cancel_run(run, _Cancel.STOP)
            self._remove(child)
            raise
        if run.ready:
            return run.value
        cause = run.stall or run.error
        reason = describe_error(cause) if cause else "returned before calling task_status.started()"
        raise ChildStartError(name, reason) from cause

    async def stop(self, name: str) -> None:
        """Stop a child for good and forget it; waits until its task has ended.

        A child backing off is simply not started again.

        Raises:
            KeyError: there is no child of that name.
        """
        try:
            child = self._children[name]
        except KeyError:
            raise KeyError(f"supervisor {self._name!r} has no child named {name!r}") from None
        child.restart_token = None
        run = child.run
        if run is not None:
            self._cancel_run(run, _Cancel.STOP)
            await run.done.wait()
        self._remove(child)

    def cancel(self) -> None:
        """Cancel every child and end the supervisor's block without an error."""
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    def statistics(self) -> SupervisorStatistics:
        """A frozen snapshot of this supervisor and everything below it."""
        now = trio.current_time()
        return SupervisorStatistics(
            name=self._name,
            strategy=str(self._strategy),
            max_restarts=self._max_restarts,
            period=self._period,
            restarts_in_period=sum(1 for t in self._restart_times if t > now - self._period),
            failed=self._failure is not None,
            taken_at=now,
            children=tuple(self._child_statistics(c, now) for c in self._children.values()),
        )

    # -- adding and launching ------------------------------------------------

    def _spec(
        self,
        fn: ChildFunction,
        args: tuple[object, ...],
        name: str,
        restart: str,
        backoff: Backoff | None,
        stall_after: float,
        *,
        wants_ready: bool,
    ) -> _ChildSpec:
        if not callable(fn):
            raise TypeError(f"fn must be an async callable, got {fn!r}")
        if backoff is not None and not isinstance(backoff, Backoff):
            raise TypeError(f"backoff must be an engine.Backoff, got {backoff!r}")
        return _ChildSpec(
            name=check_name("name", name),
            fn=fn,
            args=args,
            restart=check_choice("restart", restart, Restart),
            backoff=backoff if backoff is not None else Backoff(),
            stall_after=check_duration("stall_after", stall_after),
            wants_ready=wants_ready,
        )

    def _add(self, spec: _ChildSpec) -> _Child:
        if self._closed or self._nursery is None:
            raise RuntimeError(f"supervisor {self._name!r} is closed")
        old = self._children.get(spec.name)
        if old is not None:
            if old.live:
                raise ValueError(
                    f"supervisor {self._name!r} already has a child named {spec.name!r}"
                )
            del self._children[spec.name]
        self._order += 1
        child = _Child(spec=spec, order=self._order, rng=spec.backoff.new_random())
        self._children[spec.name] = child
        return child

    def _remove(self, child: _Child) -> None:
        child.state = ChildState.STOPPED
        child.run = None
        if self._children.get(child.spec.name) is child:
            del self._children[child.spec.name]

    def _launch(self, child: _Child, *, initial: bool) -> _Run:
        assert self._nursery is not None
        now = trio.current_time()
        context = RunContext(
            child=child.spec.name, clock=trio.lowlevel.current_clock(), last_beat=now
        )
        run = _Run(initial=initial, context=context, started_at=now)
        child.run = run
        child.state = ChildState.STARTING
        self._nursery.start_soon(
            self._run_child, child, run, name=f"{self._name}/{child.spec.name}"
        )
        return run

    @staticmethod
    def _mark_ready(child: _Child, run: _Run, value: object) -> None:
        run.ready = True
        run.value = value
        if child.run is run:
            child.state = ChildState.RUNNING
        run.settled.set()

    @staticmethod
    def _cancel_run(run: _Run, reason: _Cancel) -> None:
        if not run.done.is_set():
            run.cancel_reason = run.cancel_reason or reason
            run.scope.cancel()

    # -- one run of a child --------------------------------------------------

    async def _run_child(self, child: _Child, run: _Run) -> None:
        current_run.set(run.context)
        try:
            with run.scope:
                async with trio.open_nursery() as inner:
                    inner.start_soon(self._call, child, run, name=child.spec.name)
                    if math.isfinite(child.spec.stall_after):
                        inner.start_soon(
                            self._watch, child, run, name=f"{child.spec.name} watchdog"
                        )
        except BaseException:
            # Cancelled from outside: the supervisor itself is going away.
            if child.run is run:
                child.state = ChildState.STOPPED
                child.run = None
            raise
        finally:
            run.settled.set()
            run.done.set()
        self._on_exit(child, run)

    async def _call(self, child: _Child, run: _Run) -> None:
        run.call_task = trio.lowlevel.current_task()
        spec = child.spec
        try:
            if spec.wants_ready:
                await spec.fn(*spec.args, task_status=_ReadySignal(self, child, run))
            else:
                self._mark_ready(child, run, None)
                await spec.fn(*spec.args)
        except Exception as exc:
            run.error = exc
        finally:
            # The run is over: this also stops its watchdog.
            run.settled.set()
            run.scope.cancel()

    async def _watch(self, child: _Child, run: _Run) -> None:
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
            extra={"supervisor": self._name, "child": child.spec.name, "stalls": child.stalls},
        )
        self._cancel_run(run, _Cancel.STALL)

    # -- judging an ended run ------------------------------------------------

    def _on_exit(self, child: _Child, run: _Run) -> None:
        if run.cancel_reason in (_Cancel.STOP, _Cancel.RESTART) or child.run is not run:
            return  # whoever cancelled it decides what comes next
        now = trio.current_time()
        child.run = None
        error: BaseException | None = run.stall or run.error
        if error is not None:
            self._record_failure(child, run, error, now)
        if run.initial and not run.ready:
            child.state = ChildState.FAILED  # start() raises; nothing restarts it
            return
        if not self._wants_restart(child.spec.restart, error):
            child.state = ChildState.FAILED if error is not None else ChildState.STOPPED
            logger.info(
                "child %r ended (%s), restart=%s: not restarted",
                child.spec.name,
                describe_error(error) if error is not None else "returned",
                child.spec.restart,
                extra={"supervisor": self._name, "child": child.spec.name},
            )
            return
        if error is None:
            # A permanent child that returned still counts against the intensity.
            self._failures.append(FailureRecord(now, child.spec.name, "returned"))
        if now - run.started_at >= child.spec.backoff.reset_after:
            child.attempt = 0
        if self._admit_restart(child, now):
            self._schedule_restart(child)

    def _record_failure(self, child: _Child, run: _Run, error: BaseException, now: float) -> None:
        child.failures += 1
        child.last_error = describe_error(error)
        child.last_error_at = now
        self._failures.append(FailureRecord(now, child.spec.name, child.last_error))
        if run.stall is None:  # a stall was logged, with its stack, by the watchdog
            logger.error(
                "child %r failed: %s",
                child.spec.name,
                child.last_error,
                exc_info=error,
                extra={"supervisor": self._name, "child": child.spec.name},
            )

    @staticmethod
    def _wants_restart(restart: Restart, error: BaseException | None) -> bool:
        if restart is Restart.PERMANENT:
            return True
        if restart is Restart.TRANSIENT:
            return error is not None
        return False

    def _admit_restart(self, child: _Child, now: float) -> bool:
        horizon = now - self._period
        while self._restart_times and self._restart_times[0] <= horizon:
            self._restart_times.popleft()
        self._restart_times.append(now)
        if len(self._restart_times) <= self._max_restarts:
            return True
        child.state = ChildState.FAILED
        recent = [f for f in self._failures if f.at > horizon]
        self._failure = RestartIntensityExceeded(
            self._name, child.spec.name, self._max_restarts, self._period, recent
        )
        logger.error("%s", self._failure, extra={"supervisor": self._name})
        self.cancel()
        return False

    def _schedule_restart(self, child: _Child) -> None:
        assert self._nursery is not None
        group, stop_only = self._restart_group(child)
        delay = child.spec.backoff.delay(child.attempt, child.rng)
        child.attempt += 1
        token = object()
        for member in group:
            member.restart_token = token
            member.state = ChildState.BACKING_OFF
        logger.warning(
            "restarting %s in %.3f s (%s, consecutive restart %d)",
            ", ".join(repr(m.spec.name) for m in group),
            delay,
            self._strategy,
            child.attempt,
            extra={"supervisor": self._name, "child": child.spec.name, "restarts": child.restarts},
        )
        self._nursery.start_soon(
            self._restart, group, stop_only, token, delay, name=f"{self._name} restart"
        )

    def _restart_group(self, failed: _Child) -> tuple[list[_Child], list[_Child]]:
        """The children to restart, and the temporary ones to stop, in start order."""
        if self._strategy is Strategy.ONE_FOR_ONE:
            return [failed], []
        siblings = [
            c
            for c in self._children.values()
            if c is failed
            or (c.live and (self._strategy is Strategy.ONE_FOR_ALL or c.order > failed.order))
        ]
        group = [c for c in siblings if c is failed or c.spec.restart is not Restart.TEMPORARY]
        stop_only = [c for c in siblings if c not in group]
        return group, stop_only

    async def _restart(
        self, group: list[_Child], stop_only: list[_Child], token: object, delay: float
    ) -> None:
        # Stop the others in reverse start order: later children may depend
        # on earlier ones, never the other way round.
        for member in sorted(group + stop_only, key=lambda c: c.order, reverse=True):
            run = member.run
            if run is not None:
                self._cancel_run(run, _Cancel.RESTART)
                await run.done.wait()
                if member.run is run:
                    member.run = None
            if member in stop_only:
                member.state = ChildState.STOPPED
        await trio.sleep(delay)
        for member in group:
            if member.restart_token is not token:
                continue  # stopped, or taken over by a newer restart
            member.restart_token = None
            member.restarts += 1
            run = self._launch(member, initial=False)
            await run.settled.wait()

    # -- statistics ----------------------------------------------------------

    def _child_statistics(self, child: _Child, now: float) -> ChildStatistics:
        run = child.run
        running = run is not None and not run.done.is_set()
        return ChildStatistics(
            name=child.spec.name,
            state=child.state,
            restart=str(child.spec.restart),
            ready=bool(running and run is not None and run.ready),
            restarts=child.restarts,
            failures=child.failures,
            stalls=child.stalls,
            stall_after=child.spec.stall_after,
            last_error=child.last_error,
            last_error_at=child.last_error_at,
            started_at=run.started_at if running and run is not None else None,
            heartbeat_age=now - run.context.last_beat if running and run is not None else None,
            attached=tuple(s.statistics() for s in run.context.attached) if run else (),
        )


def open_supervisor(
    *,
    name: str = "supervisor",
    strategy: str = "one_for_one",
    max_restarts: int = 3,
    period: float = 5.0,
) -> AbstractAsyncContextManager[Supervisor]:
    """Open a supervisor: ``async with engine.open_supervisor() as sup:``.

    Children started in it are restarted by ``strategy`` when they end
    abnormally (and permanent ones when they end at all). If more than
    ``max_restarts`` restarts are needed within ``period`` seconds, the
    supervisor cancels every child and its block raises
    :class:`RestartIntensityExceeded`; inside a parent supervisor that is
    one failure of the parent's child, so trees escalate as in Erlang/OTP.

    Opened inside a supervised child, the supervisor is listed under that
    child in the parent's statistics.

    Args:
        name: used in logs and statistics paths.
        strategy: ``"one_for_one"``, ``"one_for_all"`` or ``"rest_for_one"``.
        max_restarts: restarts allowed within ``period``; 0 allows none.
        period: the sliding window for ``max_restarts``, in seconds.

    Raises:
        ValueError: at call time, for an unknown strategy or a bad number.
        RestartIntensityExceeded: from the block, when the limit is broken.
    """
    supervisor = Supervisor(
        name=check_name("name", name),
        strategy=check_choice("strategy", strategy, Strategy),
        max_restarts=check_count("max_restarts", max_restarts),
        period=check_duration("period", period),
    )
    return _open(supervisor)


@asynccontextmanager
async def _open(supervisor: Supervisor) -> AsyncIterator[Supervisor]:
    run = attach(supervisor)
    try:
        async with trio.open_nursery() as nursery:
            supervisor._nursery = nursery
            yield supervisor
    finally:
        supervisor._closed = True
        detach(run, supervisor)
    if supervisor._failure is not None:
        raise supervisor._failure
