"""What /health, /ready and /status say: verdicts judged from statistics snapshots.

Pure functions of frozen snapshots, so every rule is tested without a server
and the watch thread can build its answer without touching the loop.
"""

from __future__ import annotations

import enum
import json
import math
from collections.abc import Iterable, Iterator, Mapping

import attrs

from ._breaker import BreakerStatistics
from ._health import SourceHealth
from ._loopwatch import LoopStall
from ._periodic import CycleStatistics
from ._statistics import ChildState, ChildStatistics, SupervisorStatistics


class Kind(enum.StrEnum):
    """Why a probe fails."""

    LOOP_STALLED = "loop_stalled"
    CHILD_STALLED = "child_stalled"
    CHILD_FAILED = "child_failed"
    SUPERVISOR_FAILED = "supervisor_failed"
    NOT_READY = "not_ready"
    STOPPING = "stopping"
    CYCLE_FAILING = "cycle_failing"
    CIRCUIT_OPEN = "circuit_open"


@attrs.frozen
class Problem:
    """One reason a probe fails, in words (``message``) and as fields."""

    kind: Kind
    message: str
    subject: str | None = None  # a child's or supervisor's path, or a task's name
    seconds: float | None = None
    limit: float | None = None
    error: str | None = None
    where: str | None = None
    stack: tuple[str, ...] = ()


def liveness(tree: SupervisorStatistics | None) -> list[Problem]:
    """Problems that mean the process should be restarted.

    A supervisor that gave up, a child whose heartbeat is older than its
    ``stall_after`` (its watchdog is cancelling it, or cannot), and a
    permanent child that failed for good.
    """
    if tree is None:
        return []
    problems = [_supervisor_failed(path, sup) for path, sup in _supervisors(tree) if sup.failed]
    for path, child in tree.walk():
        age = child.heartbeat_age
        if child.state in _RUNNING and age is not None and age > child.stall_after:
            problems.append(
                Problem(
                    Kind.CHILD_STALLED,
                    f"child {path!r} stalled: no heartbeat for {age:.2f} s "
                    f"(limit {child.stall_after:g} s); its watchdog is cancelling it",
                    subject=path,
                    seconds=age,
                    limit=child.stall_after,
                )
            )
        elif child.state is ChildState.FAILED and child.restart == "permanent":
            problems.append(
                Problem(
                    Kind.CHILD_FAILED,
                    f"child {path!r} failed and will not be restarted ({child.last_error})",
                    subject=path,
                    error=child.last_error,
                )
            )
    return problems


def warnings(tree: SupervisorStatistics | None) -> list[Problem]:
    """What /health reports without failing: failing cycles and open circuits.

    A cycle cut by its deadline, or whose run raised, is retried on its
    next tick; the process is alive and should not be restarted for it, but
    an operator should see it: a cycle that keeps failing is otherwise
    invisible while the process looks healthy. It clears once a later run of
    the cycle succeeds. Likewise each open circuit of a breaker listed under
    a child (``where`` is its key, ``seconds`` the time until its next try),
    until a probe closes it.
    """
    if tree is None:
        return []
    found: list[Problem] = []
    for path, child in tree.walk():
        for inner in child.attached:
            if isinstance(inner, BreakerStatistics):
                found.extend(_circuits_open(path, inner))
                continue
            if not isinstance(inner, CycleStatistics) or inner.last_failure_at is None:
                continue
            if inner.last_success_at is not None and inner.last_success_at > inner.last_failure_at:
                continue
            found.append(
                Problem(
                    Kind.CYCLE_FAILING,
                    f"cycle {inner.name!r} of child {path!r}: its latest run failed "
                    f"({inner.last_error}); {inner.failures} of {inner.runs} runs failed",
                    subject=path,
                    error=inner.last_error,
                )
            )
    return found


def _circuits_open(path: str, breaker: BreakerStatistics) -> Iterator[Problem]:
    for key, retry_at in breaker.open_keys().items():
        wait = max(0.0, retry_at - breaker.taken_at)
        yield Problem(
            Kind.CIRCUIT_OPEN,
            f"breaker {breaker.name!r} of child {path!r}: circuit {key!r} is open; "
            f"next try in {wait:.1f} s",
            subject=path,
            seconds=wait,
            where=key,
        )


def readiness(tree: SupervisorStatistics | None, *, stopping: str | None) -> list[Problem]:
    """Problems that mean the process should get no traffic now.

    Everything :func:`liveness` finds, a stop in progress, and every child
    that should be running but is not ready: starting (a feed still
    connecting) or backing off before a restart. Children that stopped, and
    non-permanent children that failed, were not meant to run and do not count.
    """
    problems = liveness(tree)
    if stopping is not None:
        problems.append(Problem(Kind.STOPPING, f"stopping: {stopping}"))
    if tree is None:
        return problems
    for path, child in tree.walk():
        if child.state is ChildState.STARTING:
            message = f"child {path!r} is starting and not ready yet"
        elif child.state is ChildState.BACKING_OFF:
            message = f"child {path!r} is restarting (last error: {child.last_error})"
        else:
            continue
        problems.append(Problem(Kind.NOT_READY, message, subject=path, error=child.last_error))
    return problems


def sources_not_ready(health: Mapping[str, SourceHealth]) -> list[Problem]:
    """A problem for each source that says it is not ready (a bus without its broker)."""
    return [
        Problem(Kind.NOT_READY, f"source {name!r} is not ready: {h.state}", subject=name)
        for name, h in health.items()
        if not h.ready
    ]


def loop_stalled(stall: LoopStall) -> Problem:
    """The problem the watch thread reports while the loop is stalled."""
    return Problem(
        Kind.LOOP_STALLED,
        stall.describe(),
        subject=stall.task,
        seconds=stall.seconds,
        where=stall.where,
        stack=stall.stack,
    )


def verdict_body(problems: Iterable[Problem], **extra: object) -> tuple[int, bytes]:
    """The status code and JSON body of a probe: 200 without problems, else 503."""
    found = list(problems)
    body = {
        "status": "failing" if found else "ok",
        "reasons": [p.message for p in found],
        "problems": [to_jsonable(p) for p in found],
        **{key: to_jsonable(value) for key, value in extra.items()},
    }
    return (503 if found else 200), dumps(body)


def dumps(value: object) -> bytes:
    """Strict JSON (no NaN or Infinity), compact, UTF-8."""
    return json.dumps(value, separators=(",", ":"), allow_nan=False).encode()


def to_jsonable(value: object) -> object:
    """A statistics snapshot as JSON-ready data.

    attrs instances become objects with a ``"type"`` key naming their class
    (so the trees under ``attached`` say what each node is), enums their
    values, tuples lists, and infinite or NaN floats ``null`` (``stall_after``
    of an unwatched child, for one: there is no limit).
    """
    cls = type(value)
    if attrs.has(cls):
        fields = {
            f.name: to_jsonable(getattr(value, f.name))
            for f in attrs.fields(cls)
            if not f.name.startswith("_")
        }
        return {"type": cls.__name__, **fields}
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, list | tuple):
        return [to_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if value is None or isinstance(value, str | int | float | bool):
        return value
    return repr(value)


_RUNNING = (ChildState.STARTING, ChildState.RUNNING)


def _supervisors(tree: SupervisorStatistics) -> Iterator[tuple[str, SupervisorStatistics]]:
    """Every supervisor in the tree with its path, the root first."""
    yield tree.name, tree
    yield from _nested(tree.name, tree.children)


def _nested(
    prefix: str, children: tuple[ChildStatistics, ...]
) -> Iterator[tuple[str, SupervisorStatistics]]:
    for child in children:
        path = f"{prefix}/{child.name}"
        for inner in child.attached:
            if isinstance(inner, SupervisorStatistics):
                yield f"{path}/{inner.name}", inner
                yield from _nested(path, inner.children)


def _supervisor_failed(path: str, sup: SupervisorStatistics) -> Problem:
    return Problem(
        Kind.SUPERVISOR_FAILED,
        f"supervisor {path!r} exhausted its restart intensity "
        f"(more than {sup.max_restarts} restarts in {sup.period:g} s) and stopped its children",
        subject=path,
        limit=float(sup.max_restarts),
    )
