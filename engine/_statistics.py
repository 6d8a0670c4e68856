"""Frozen snapshots of a supervision tree, shaped for /status (JSON) and /metrics.

Every field is a number, a string, a bool, ``None``, or a tuple of further
snapshots, so ``attrs.asdict(snapshot)`` is ready for a JSON encoder and each
counter maps onto one Prometheus series labelled by the child's path.
Times are ``trio.current_time()`` readings (virtual under a test clock);
``taken_at`` says when the snapshot was made, so ages are ``taken_at - t``.
"""

from __future__ import annotations

import enum

import attrs

from ._counters import counter_metric, gauge_metric, metric_source


class ChildState(enum.StrEnum):
    """Where a supervised child is in its life."""

    STARTING = "starting"
    """Running, but has not yet reported ready (``task_status.started``)."""
    RUNNING = "running"
    """Running and ready."""
    BACKING_OFF = "backing_off"
    """Waiting out its backoff delay before the next start."""
    STOPPED = "stopped"
    """Ended and will not be started again: it finished, or was stopped."""
    FAILED = "failed"
    """Ended with an error and will not be started again."""


@metric_source(label="child")
@attrs.frozen
class ChildStatistics:
    """One supervised child at the moment of the snapshot.

    Attributes:
        name: the child's name, unique within its supervisor.
        state: see :class:`ChildState`.
        restart: its restart policy: ``permanent``, ``transient`` or ``temporary``.
        ready: whether the current run reported ready.
        restarts: how many times it was started again after its first start.
        failures: runs that ended with an error or a stall.
        stalls: runs the watchdog cancelled for a missed heartbeat.
        stall_after: its heartbeat limit in seconds (``inf`` when unwatched).
        last_error: ``"Type: message"`` of the latest failure, or ``None``.
        last_error_at: when that failure happened.
        started_at: when the current run started, or ``None`` when not running.
        heartbeat_age: seconds since the current run last beat (or started);
            ``None`` when not running.
        attached: snapshots of supervisors and cycles running inside this child.
    """

    # Each field declared once with its metric, as in every statistics class
    # of the engine: the classes look alike field by field for that reason.
    name: str
    state: ChildState
    restart: str
    ready: bool = attrs.field(metadata=gauge_metric("1 when the current run is ready"))
    restarts: int = attrs.field(metadata=counter_metric("Starts after the first"))
    failures: int = attrs.field(metadata=counter_metric("Runs that raised or stalled"))
    stalls: int = attrs.field(metadata=counter_metric("Runs cancelled by the watchdog"))
    stall_after: float = attrs.field(
        metadata=gauge_metric("Heartbeat limit", name="stall_after_seconds")
    )
    last_error: str | None
    last_error_at: float | None
    started_at: float | None
    heartbeat_age: float | None = attrs.field(
        metadata=gauge_metric(
            "Seconds since the running child last beat", name="heartbeat_age_seconds"
        )
    )
    attached: tuple[object, ...] = ()


@metric_source(label="supervisor")
@attrs.frozen
class SupervisorStatistics:
    """A supervisor and, recursively, everything below it.

    Attributes:
        name: the supervisor's name.
        strategy: ``one_for_one``, ``one_for_all`` or ``rest_for_one``.
        max_restarts: the restart intensity limit.
        period: the window of the limit, in seconds.
        restarts_in_period: restarts counted against the limit right now.
        failed: whether the supervisor gave up (intensity exceeded).
        taken_at: ``trio.current_time()`` when this snapshot was taken.
        children: the children in start order.
    """

    name: str
    strategy: str
    max_restarts: int = attrs.field(metadata=gauge_metric("The restart intensity limit"))
    period: float
    restarts_in_period: int = attrs.field(
        metadata=gauge_metric("Restarts counted against the intensity limit now")
    )
    failed: bool = attrs.field(metadata=gauge_metric("1 once it gave up"))
    taken_at: float
    children: tuple[ChildStatistics, ...]

    def walk(self) -> list[tuple[str, ChildStatistics]]:
        """Every child in the tree with its path (``"root/feed/parser"``), depth first."""
        found: list[tuple[str, ChildStatistics]] = []
        self._walk_into(self.name, found)
        return found

    def _walk_into(self, prefix: str, found: list[tuple[str, ChildStatistics]]) -> None:
        for child in self.children:
            path = f"{prefix}/{child.name}"
            found.append((path, child))
            for inner in child.attached:
                if isinstance(inner, SupervisorStatistics):
                    inner._walk_into(path, found)
