"""Supervisors: children that are restarted by policy, watched for stalls, and counted.

A supervisor owns a nursery. Each run of a child is one task in it (see
``_children``). A run that ends is judged in ``_on_exit``, a plain function,
so no other task can interleave with the decision; the policy it applies is
plain arithmetic (see ``_restarts``). A restart is a task of its own in the
supervisor's nursery, so one child's backoff never delays another child's
restart.
"""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager

import trio

from ._backoff import Backoff
from ._children import Child, ChildFunction, Children, ChildSpec, Run, run_child
from ._exceptions import ChildStartError, FailureRecord, RestartIntensityExceeded
from ._names import describe_error
from ._restarts import (
    Restart,
    RestartIntensity,
    RestartName,
    Strategy,
    StrategyName,
    restart_group,
    wants_restart,
)
from ._statistics import ChildState, SupervisorStatistics
from ._validation import check_choice, check_count, check_duration, check_name
from ._watchdog import attach_statistics

logger = logging.getLogger("engine.supervisor")


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
        self._intensity = RestartIntensity(max_restarts, period)
        self._nursery: trio.Nursery | None = None
        self._closed = False
        self._children = Children(name)
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
        return self._children.names

    def start_soon(
        self,
        fn: ChildFunction,
        *args: object,
        name: str,
        restart: Restart | RestartName = "permanent",
        backoff: Backoff | None = None,
        stall_after: float = math.inf,
        reports_ready: bool = False,
    ) -> None:
        """Start a child without waiting for it, like ``nursery.start_soon``.

        Args:
            fn: the async function the child runs, called as ``fn(*args)``.
            *args: positional arguments for ``fn``.
            name: unique among this supervisor's live children.
            restart: a :class:`Restart`, or its value: ``"permanent"``,
                ``"transient"`` or ``"temporary"``.
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
        spec = ChildSpec.checked(
            fn, args, name, restart, backoff, stall_after, wants_ready=reports_ready
        )
        self._launch(self._add(spec), initial=False)

    # The options of start_soon, spelled out again so that each signature
    # documents itself, as nursery.start and httpx's request methods do.
    async def start(
        self,
        fn: ChildFunction,
        *args: object,
        name: str,
        restart: Restart | RestartName = "permanent",
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
        spec = ChildSpec.checked(fn, args, name, restart, backoff, stall_after, wants_ready=True)
        child = self._add(spec)
        run = self._launch(child, initial=True)
        try:
            await run.settled.wait()
        except BaseException:
            # Our caller was cancelled: like nursery.start, the start is abandoned.
            run.cancel("stop")
            self._children.remove(child)
            raise
        if run.ready:
            return run.value
        cause = run.failure
        reason = describe_error(cause) if cause else "returned before calling task_status.started()"
        raise ChildStartError(name, reason) from cause

    async def stop(self, name: str) -> None:
        """Stop a child for good and forget it; waits until its task has ended.

        A child backing off is simply not started again.

        Raises:
            KeyError: there is no child of that name.
        """
        child = self._children[name]
        child.restart_token = None
        await child.cancel_run("stop")
        self._children.remove(child)

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
            max_restarts=self._intensity.max_restarts,
            period=self._intensity.period,
            restarts_in_period=self._intensity.in_period(now),
            failed=self._failure is not None,
            taken_at=now,
            children=tuple(c.statistics(now) for c in self._children),
        )

    # -- adding and launching ------------------------------------------------

    def _add(self, spec: ChildSpec) -> Child:
        if self._closed or self._nursery is None:
            raise RuntimeError(f"supervisor {self._name!r} is closed")
        return self._children.add(spec)

    def _launch(self, child: Child, *, initial: bool) -> Run:
        assert self._nursery is not None
        run = child.new_run(initial=initial)
        self._nursery.start_soon(
            run_child, child, run, self._name, self._on_exit, name=f"{self._name}/{child.spec.name}"
        )
        return run

    # -- judging an ended run ------------------------------------------------

    def _on_exit(self, child: Child, run: Run) -> None:
        if run.cancel_reason in ("stop", "restart") or child.run is not run:
            return  # whoever cancelled it decides what comes next
        now = trio.current_time()
        child.run = None
        error = run.failure
        if error is not None:
            self._record_failure(child, run, error, now)
        if run.initial and not run.ready:
            child.state = ChildState.FAILED  # start() raises; nothing restarts it
            return
        if not wants_restart(child.spec.restart, failed=error is not None):
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
            self._intensity.record_failure(FailureRecord(now, child.spec.name, "returned"))
        if now - run.started_at >= child.spec.backoff.reset_after:
            child.attempt = 0
        if self._intensity.admit(now):
            self._schedule_restart(child)
        else:
            child.state = ChildState.FAILED
            self._failure = self._intensity.exceeded(self._name, child.spec.name, now)
            logger.error("%s", self._failure, extra={"supervisor": self._name})
            self.cancel()

    def _record_failure(self, child: Child, run: Run, error: Exception, now: float) -> None:
        description = child.record_failure(error, now)
        self._intensity.record_failure(FailureRecord(now, child.spec.name, description))
        if run.stall is None:  # a stall was logged, with its stack, by the watchdog
            logger.error(
                "child %r failed: %s",
                child.spec.name,
                description,
                exc_info=error,
                extra={"supervisor": self._name, "child": child.spec.name},
            )

    def _schedule_restart(self, child: Child) -> None:
        assert self._nursery is not None
        group, stop_only = restart_group(self._strategy, child, self._children)
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

    async def _restart(
        self, group: list[Child], stop_only: list[Child], token: object, delay: float
    ) -> None:
        # Stop the others in reverse start order: later children may depend
        # on earlier ones, never the other way round.
        for member in sorted(group + stop_only, key=lambda c: c.order, reverse=True):
            await member.cancel_run("restart")
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


def open_supervisor(
    *,
    name: str = "supervisor",
    strategy: Strategy | StrategyName = "one_for_one",
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
        strategy: a :class:`Strategy`, or its value: ``"one_for_one"``,
            ``"one_for_all"`` or ``"rest_for_one"``.
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
    with attach_statistics(supervisor):
        try:
            async with trio.open_nursery() as nursery:
                supervisor._nursery = nursery
                yield supervisor
        finally:
            supervisor._closed = True
    if supervisor._failure is not None:
        raise supervisor._failure
