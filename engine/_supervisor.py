"""Supervisors: children that are restarted by policy, watched for stalls, and counted.

A supervisor owns a nursery. Each run of a child is one task in it (see
``_children``). A run that ends is judged by the supervisor's restarter, in
a plain function, so no other task can interleave with the decision; the
policy it applies is plain arithmetic (see ``_restarts``). A restart is a
task of its own in the supervisor's nursery, so one child's backoff never
delays another child's restart (see ``_restarter``). Stopping children
gracefully is ``_drain``'s.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager

import trio

from ._backoff import Backoff
from ._children import DEFAULT_SHUTDOWN, Child, ChildFunction, Children, ChildSpec, Run
from ._drain import ChildShutdown, ShutdownReport, SupervisorShutdown, stop_child
from ._exceptions import ChildStartError
from ._names import describe_error
from ._restarter import Restarter
from ._restarts import Restart, RestartIntensity, RestartName, Strategy, StrategyName
from ._runtime import Shutdown
from ._statistics import SupervisorStatistics
from ._stopping import child_stop
from ._validation import check_choice, check_count, check_duration, check_name
from ._watchdog import attach_statistics


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
        self._closed = False
        self._children = Children(name)
        self._restarter = Restarter(
            name, strategy, RestartIntensity(max_restarts, period), self._children
        )
        # Begun by shutdown(): no starts or restarts from then on.
        self._shutdown = SupervisorShutdown(name)

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
        shutdown: float = DEFAULT_SHUTDOWN,
        holds: Callable[[], int] | None = None,
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
            shutdown: seconds the child gets to stop on its own once
                :meth:`shutdown` asks it to (its ``engine.current_stop()``
                is requested), before it is cancelled; ``0`` cancels it at
                once, ``math.inf`` waits for it. A child that never called
                :func:`engine.current_stop` is cancelled at once whatever
                its budget: it cannot be draining.
            holds: ``holds()`` counts what the child still holds and would
                lose (its queue's depth, say). Read once the child has
                stopped; a count above zero is logged as dropped at
                shutdown and reported in :class:`ShutdownReport`.

        Raises:
            ValueError: for a bad argument, or a name already in use.
            RuntimeError: if the supervisor has already closed.
        """
        spec = ChildSpec.checked(
            fn, args, name, restart, backoff, stall_after, reports_ready, shutdown, holds
        )
        self._start_run(spec, initial=False)

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
        shutdown: float = DEFAULT_SHUTDOWN,
        holds: Callable[[], int] | None = None,
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
        spec = ChildSpec.checked(
            fn, args, name, restart, backoff, stall_after, True, shutdown, holds
        )
        child, run = self._start_run(spec, initial=True)
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

    async def stop(self, name: str) -> ChildShutdown:
        """Stop a child for good and forget it; waits until its task has ended.

        As in :meth:`shutdown`: its stop request is set and it gets its
        ``shutdown`` budget to return (at once cancelled if it never asked
        for its stop request), then it is cancelled. A child backing off is
        simply not started again.

        Returns:
            How it stopped.

        Raises:
            KeyError: there is no child of that name.
        """
        child = self._children[name]
        report = await stop_child(child, f"stop({name!r}) was called", self._name)
        self._children.remove(child)
        return report

    def cancel(self) -> None:
        """Cancel everything at once, the body of the ``async with`` block included.

        This is the hard stop, ``nursery.cancel_scope.cancel()``: every child
        is cancelled where it stands (what it holds is lost, uncounted) and
        so is the block's own code, at its next checkpoint, so nothing
        written after ``sup.cancel()`` in the block runs past its first
        ``await``. The block then ends without an error.

        For a graceful stop that drains and leaves the block running, use
        :meth:`shutdown`.
        """
        if self._restarter.nursery is not None:
            self._restarter.nursery.cancel_scope.cancel()

    async def shutdown(self, reason: str = "supervisor shutting down") -> ShutdownReport:
        """Stop every child gracefully, one at a time, the last started first.

        Nothing is started or restarted any more (pending restarts are
        dropped). Each child that is running has its stop request
        (:func:`engine.current_stop`) requested and gets its ``shutdown``
        budget to return: a source stops reading, a consumer empties its
        queue into its sink; only then is the next child asked. A child past
        its budget, or one that never asked for its stop request, is
        cancelled. What a child still holds (its ``holds`` count) is logged
        as dropped at shutdown.

        Unlike :meth:`cancel`, the block's own code is not cancelled: it
        goes on after ``await sup.shutdown()``, and the block ends once it
        does. Under :func:`engine.run`, the grace period bounds the whole
        shutdown: when it expires the shutdown is cancelled with ``main``.

        A second call waits for the first and returns the same report.

        Args:
            reason: given to every child's stop request, for the logs.

        Returns:
            What happened to each child, in the order they were stopped.

        Raises:
            ValueError: ``reason`` is not a non-empty string.
        """
        check_name("reason", reason)
        if not self._shutdown.begun:
            self._restarter.stop()
        return await self._shutdown.run(self._children, reason)

    def statistics(self) -> SupervisorStatistics:
        """A frozen snapshot of this supervisor and everything below it."""
        now = trio.current_time()
        intensity = self._restarter.intensity
        return SupervisorStatistics(
            name=self._name,
            strategy=str(self._strategy),
            max_restarts=intensity.max_restarts,
            period=intensity.period,
            restarts_in_period=intensity.in_period(now),
            failed=self._restarter.failure is not None,
            taken_at=now,
            children=tuple(c.statistics(now) for c in self._children),
        )

    def _start_run(self, spec: ChildSpec, *, initial: bool) -> tuple[Child, Run]:
        # initial: the run of start(), whose caller is told if it fails before ready.
        if self._closed or self._restarter.nursery is None:
            raise RuntimeError(f"supervisor {self._name!r} is closed")
        if self._shutdown.begun:
            raise RuntimeError(f"supervisor {self._name!r} is shutting down")
        child = self._children.add(spec)
        return child, self._restarter.launch(child, initial=initial)


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
    stop = child_stop()  # opened inside a supervised child: it drains with its children
    with attach_statistics(supervisor):
        try:
            async with trio.open_nursery() as nursery:
                supervisor._restarter.nursery = nursery
                waiting = trio.CancelScope()
                if stop is not None:
                    nursery.start_soon(_shut_down_on_stop, supervisor, stop, waiting)
                try:
                    yield supervisor
                finally:
                    waiting.cancel()  # a shutdown already under way goes on
        finally:
            supervisor._closed = True
    if supervisor._restarter.failure is not None:
        raise supervisor._restarter.failure


async def _shut_down_on_stop(
    supervisor: Supervisor, stop: Shutdown, waiting: trio.CancelScope
) -> None:
    """Shut ``supervisor`` down once the child it was opened in is asked to stop."""
    with waiting:
        await stop.wait()
    if not waiting.cancelled_caught:
        await supervisor.shutdown(stop.reason or "the enclosing child was asked to stop")
