"""Stopping one child gracefully, and what a supervisor's shutdown did, child by child.

:meth:`Supervisor.shutdown` (through :class:`SupervisorShutdown`) and
:meth:`Supervisor.stop` stop each child with :func:`stop_child`: its stop
request, its ``shutdown`` budget, then a cancel.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import attrs
import trio

from ._children import Child
from ._names import describe_error
from ._statistics import ChildState

logger = logging.getLogger("engine.supervisor")

RETURNED = "returned"
FAILED = "failed"
CANCELLED = "cancelled"
NOT_RUNNING = "not_running"


@attrs.frozen
class ChildShutdown:
    """How one child stopped.

    Attributes:
        name: the child's name.
        outcome: ``"returned"`` (it stopped on its own within its budget),
            ``"failed"`` (it raised while stopping), ``"cancelled"`` (it was
            cancelled: at once, because it never asked for its stop request,
            or at the end of its ``shutdown`` budget) or ``"not_running"``
            (it had already ended, or was backing off).
        seconds: from its stop request until its task had ended.
        budget: its ``shutdown`` budget, in seconds.
        dropped: what it still held once stopped, as counted by its
            ``holds`` callable; ``None`` if it declared none.
        error: ``"Type: message"`` of what it raised while stopping, if it did.
    """

    name: str
    outcome: str
    seconds: float
    budget: float
    dropped: int | None = None
    error: str | None = None


@attrs.frozen
class ShutdownReport:
    """What :meth:`engine.Supervisor.shutdown` did, in the order it stopped the children.

    Attributes:
        supervisor: the supervisor's name.
        reason: the reason given to every child's stop request.
        children: one :class:`ChildShutdown` per child, last started first.
        seconds: how long the whole shutdown took.
    """

    supervisor: str
    reason: str
    children: tuple[ChildShutdown, ...]
    seconds: float

    @property
    def dropped(self) -> int:
        """What the children still held once stopped, summed over those that count it."""
        return sum(c.dropped or 0 for c in self.children)

    @property
    def graceful(self) -> bool:
        """Whether every child stopped on its own and nothing was dropped."""
        return self.dropped == 0 and all(
            c.outcome in (RETURNED, NOT_RUNNING) for c in self.children
        )


async def stop_child(child: Child, reason: str, supervisor: str) -> ChildShutdown:
    """Ask ``child`` to stop, wait out its budget, cancel it if need be; count what it held."""
    spec = child.spec
    child.restart_token = None
    child.stopping = True  # however its run ends now, it is not restarted
    run = child.run
    started = trio.current_time()
    outcome = NOT_RUNNING
    error: str | None = None
    if run is not None and not run.done.is_set():
        budget = spec.shutdown if run.context.stop_watched else 0.0
        run.context.stop.request(reason)
        with trio.move_on_after(budget):
            await run.done.wait()
        if not run.done.is_set():
            why = (
                f"shutdown budget of {budget:g} s expired"
                if run.context.stop_watched
                else "it does not watch engine.current_stop()"
            )
            run.context.stop.force(why)
            await child.cancel_run("stop")
            outcome = CANCELLED
            level = logging.WARNING if run.context.stop_watched else logging.INFO
            logger.log(
                level,
                "child %r cancelled at shutdown: %s",
                spec.name,
                why,
                extra={"supervisor": supervisor, "child": spec.name},
            )
        elif run.error is not None:
            outcome, error = FAILED, describe_error(run.error)
        else:
            outcome = RETURNED
    if child.live:
        child.state = ChildState.STOPPED
    child.run = None
    report = ChildShutdown(
        name=spec.name,
        outcome=outcome,
        seconds=trio.current_time() - started,
        budget=spec.shutdown,
        dropped=_held(child, supervisor),
        error=error,
    )
    if report.dropped:
        logger.warning(
            "child %r dropped %d held at shutdown (%s)",
            spec.name,
            report.dropped,
            outcome,
            extra={"supervisor": supervisor, "child": spec.name, "dropped": report.dropped},
        )
    return report


class SupervisorShutdown:
    """The one graceful shutdown of a supervisor's children: run once, reported to every caller."""

    def __init__(self, supervisor: str) -> None:
        self._supervisor = supervisor
        self._done: trio.Event | None = None
        self._report: ShutdownReport | None = None

    @property
    def begun(self) -> bool:
        """Whether :meth:`run` has been called."""
        return self._done is not None

    async def run(self, children: Iterable[Child], reason: str) -> ShutdownReport:
        """Stop ``children`` one at a time, the last started first, each with :func:`stop_child`.

        A second call waits for the first and returns the same report; a
        shutdown cancelled part way reports the children it got through.
        """
        if self._done is not None:
            await self._done.wait()
            assert self._report is not None
            return self._report
        self._done = trio.Event()
        started = trio.current_time()
        ordered = sorted(children, key=lambda c: c.order, reverse=True)
        logger.info(
            "shutting down %d children, last started first: %s",
            len(ordered),
            reason,
            extra={"supervisor": self._supervisor},
        )
        stopped: list[ChildShutdown] = []
        try:
            for child in ordered:
                stopped.append(await stop_child(child, reason, self._supervisor))
        finally:
            self._report = ShutdownReport(
                supervisor=self._supervisor,
                reason=reason,
                children=tuple(stopped),
                seconds=trio.current_time() - started,
            )
            self._done.set()
        return self._report


def _held(child: Child, supervisor: str) -> int | None:
    holds = child.spec.holds
    if holds is None:
        return None
    try:
        return int(holds())
    except Exception as exc:  # a broken count must not stop the shutdown
        logger.error(
            "child %r: its holds() count failed: %s",
            child.spec.name,
            describe_error(exc),
            exc_info=exc,
            extra={"supervisor": supervisor, "child": child.spec.name},
        )
        return None
