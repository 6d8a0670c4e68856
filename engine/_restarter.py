"""Launching a supervisor's runs, judging each ended run, and carrying out restarts.

:class:`Restarter` is the part of a :class:`~engine.Supervisor` that works
inside its nursery: it starts each run of a child as a task there, decides
in ``on_exit`` (a plain function, so no other task interleaves with the
decision) what follows a run's end, and runs each restart as a task of its
own, so one child's backoff never delays another child's restart. The
policy it applies is plain arithmetic (see ``_restarts``).
"""

from __future__ import annotations

import logging

import trio

from ._children import Child, Children, Run, run_child
from ._exceptions import FailureRecord, RestartIntensityExceeded
from ._names import describe_error
from ._restarts import RestartIntensity, Strategy, restart_group, wants_restart
from ._statistics import ChildState

logger = logging.getLogger("engine.supervisor")


class Restarter:
    """Runs a supervisor's children in its nursery and restarts them by policy."""

    def __init__(
        self, name: str, strategy: Strategy, intensity: RestartIntensity, children: Children
    ) -> None:
        self._name = name
        self._strategy = strategy
        self.intensity = intensity
        self._children = children
        self.nursery: trio.Nursery | None = None
        # Set once the intensity is broken; the supervisor's block raises it.
        self.failure: RestartIntensityExceeded | None = None
        # Set by stop(): nothing restarts from then on.
        self.stopped = False
        self._pending: set[trio.CancelScope] = set()

    def launch(self, child: Child, *, initial: bool) -> Run:
        """Start a new run of ``child`` as a task in the supervisor's nursery."""
        assert self.nursery is not None
        run = child.new_run(initial=initial)
        self.nursery.start_soon(
            run_child, child, run, self._name, self.on_exit, name=f"{self._name}/{child.spec.name}"
        )
        return run

    def stop(self) -> None:
        """Restart nothing from now on; restarts backing off are dropped."""
        self.stopped = True
        for scope in self._pending:
            scope.cancel()

    def on_exit(self, child: Child, run: Run) -> None:
        """Decide what follows the end of ``run``: nothing, a restart, or failing the tree."""
        if run.cancel_reason in ("stop", "restart") or child.run is not run:
            return  # whoever cancelled it decides what comes next
        now = trio.current_time()
        child.run = None
        error = run.failure
        if error is not None:
            self._record_failure(child, run, error, now)
        if self.stopped or child.stopping:
            # Ended while being stopped: by request, or by itself meanwhile.
            # Either way nothing restarts it.
            child.state = ChildState.FAILED if error is not None else ChildState.STOPPED
            return
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
            self.intensity.record_failure(FailureRecord(now, child.spec.name, "returned"))
        if now - run.started_at >= child.spec.backoff.reset_after:
            child.attempt = 0
        if self.intensity.admit(now):
            self._schedule(child)
        else:
            child.state = ChildState.FAILED
            self.failure = self.intensity.exceeded(self._name, child.spec.name, now)
            logger.error("%s", self.failure, extra={"supervisor": self._name})
            assert self.nursery is not None
            self.nursery.cancel_scope.cancel()

    def _record_failure(self, child: Child, run: Run, error: Exception, now: float) -> None:
        description = child.record_failure(error, now)
        self.intensity.record_failure(FailureRecord(now, child.spec.name, description))
        if run.stall is None:  # a stall was logged, with its stack, by the watchdog
            logger.error(
                "child %r failed: %s",
                child.spec.name,
                description,
                exc_info=error,
                extra={"supervisor": self._name, "child": child.spec.name},
            )

    def _schedule(self, child: Child) -> None:
        assert self.nursery is not None
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
        self.nursery.start_soon(
            self._restart, group, stop_only, token, delay, name=f"{self._name} restart"
        )

    async def _restart(
        self, group: list[Child], stop_only: list[Child], token: object, delay: float
    ) -> None:
        # stop() cancels it: a child backing off is then simply not started.
        if self.stopped:
            return  # scheduled just before the supervisor's shutdown began
        with trio.CancelScope() as scope:
            self._pending.add(scope)
            try:
                await self._restart_group(group, stop_only, token, delay)
            finally:
                self._pending.discard(scope)
        if scope.cancelled_caught:
            for member in group:
                if member.restart_token is token and member.run is None:
                    member.state = ChildState.STOPPED

    async def _restart_group(
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
            if self.stopped or member.restart_token is not token or member.stopping:
                continue  # shutting down, stopped, or taken over by a newer restart
            member.restart_token = None
            member.restarts += 1
            run = self.launch(member, initial=False)
            await run.settled.wait()
