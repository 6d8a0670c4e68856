"""The engine's exceptions, in one hierarchy.

::

    EngineError
    ├── ChildStalled               a child missed its heartbeat deadline
    ├── ForcedShutdown             the runtime cancelled work it had asked to stop
    ├── SubscriberDisconnected     a hub subscriber fell too far behind
    ├── SerializationError         an argument or result could not be pickled
    ├── WorkerCrashed              a worker process died during a call
    └── SupervisorError
        ├── ChildStartError        a child failed before it reported ready
        └── RestartIntensityExceeded
                                   too many restarts within the period

Errors that cross a boundary are translated there and chained with
``raise ... from exc``, so the original cause is never lost. Where trio's own
names fit (``trio.ClosedResourceError``, ``trio.TooSlowError``) the engine
raises those instead of inventing new ones.
"""

from __future__ import annotations

import signal as signal_module
from collections.abc import Sequence

import attrs


class EngineError(Exception):
    """Root of every error the engine raises on its own account."""

    # The attributes a subclass is built from, in its constructor's order: they
    # serve ``match`` patterns and rebuild the error on the far side of a pickle.
    # Subclass constructors look alike (store the attributes, word the message):
    # each message is its own, so each is written out.
    __match_args__: tuple[str, ...] = ()

    def __reduce__(self) -> str | tuple[object, ...]:
        if not self.__match_args__:
            return super().__reduce__()
        return (type(self), tuple(getattr(self, name) for name in self.__match_args__))


class SupervisorError(EngineError):
    """A supervisor could not do what it was asked."""


class ChildStartError(SupervisorError):
    """A child failed, or exited, before it reported that it was ready.

    Raised by :meth:`Supervisor.start` on the first start of a child; the
    child's own exception is chained as ``__cause__``.

    Attributes:
        child: the name of the child.
        reason: what went wrong, in words.
    """

    __match_args__ = ("child", "reason")

    def __init__(self, child: str, reason: str) -> None:
        super().__init__(f"child {child!r} failed to start: {reason}")
        self.child = child
        self.reason = reason


class ChildStalled(EngineError):
    """A supervised child did not call :func:`engine.heartbeat` in time.

    The watchdog cancels the child and records this error as the reason,
    so it appears as the child's ``last_error`` and counts as an abnormal
    exit for its restart policy.

    Attributes:
        child: the name of the child.
        stall_after: the configured limit, in seconds.
        silent_for: seconds since the last heartbeat when it was cancelled.
    """

    __match_args__ = ("child", "stall_after", "silent_for")

    def __init__(self, child: str, stall_after: float, silent_for: float) -> None:
        super().__init__(
            f"child {child!r} stalled: no heartbeat for {silent_for:.3f} s "
            f"(stall_after={stall_after:g} s)"
        )
        self.child = child
        self.stall_after = stall_after
        self.silent_for = silent_for


@attrs.frozen
class FailureRecord:
    """One failure of a child, as kept for restart-intensity reports.

    Attributes:
        at: ``trio.current_time()`` of the failure.
        child: the name of the child that failed.
        error: ``"ExceptionType: message"`` of what it raised, or of its stall.
    """

    at: float
    child: str
    error: str


class RestartIntensityExceeded(SupervisorError):
    """A supervisor had to restart more than ``max_restarts`` times within ``period``.

    The supervisor cancels all its children and raises this from its
    ``async with`` block; in a tree, the parent sees it as a failure of the
    child that ran the supervisor, and applies its own policy.

    Attributes:
        supervisor: the supervisor's name.
        child: the child whose failure broke the limit.
        max_restarts: the configured limit.
        period: the configured window, in seconds.
        failures: the recent failures that counted, oldest first.
    """

    __match_args__ = ("supervisor", "child", "max_restarts", "period", "failures")

    def __init__(
        self,
        supervisor: str,
        child: str,
        max_restarts: int,
        period: float,
        failures: Sequence[FailureRecord],
    ) -> None:
        recent = "; ".join(f"{f.child} at t={f.at:g}: {f.error}" for f in failures)
        super().__init__(
            f"supervisor {supervisor!r} gave up: child {child!r} needed restart number "
            f"{max_restarts + 1} within {period:g} s (max_restarts={max_restarts}). "
            f"Recent failures: {recent}"
        )
        self.supervisor = supervisor
        self.child = child
        self.max_restarts = max_restarts
        self.period = period
        self.failures = tuple(failures)


class ForcedShutdown(EngineError):
    """The runtime had to cancel work after asking it to stop.

    Raised by :func:`engine.run` when the grace period expired, or a second
    stop signal arrived, before ``main`` returned on its own.

    Attributes:
        reason: why the stop was forced, in words.
        signal: the number of the signal that started the stop, if any.
    """

    __match_args__ = ("reason", "signal")

    def __init__(self, reason: str, signal: int | None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.signal = signal

    @property
    def exit_status(self) -> int:
        """The conventional exit status: ``128 + signal``, or 1 without a signal."""
        return 128 + self.signal if self.signal is not None else 1


class SubscriberDisconnected(EngineError):
    """A hub subscription with ``overflow="disconnect"`` fell behind and was cut off.

    Raised by the subscription's ``receive`` (and so ends its ``async for``)
    once the messages it had buffered before the overflow are consumed.

    Attributes:
        patterns: the topic patterns of the subscription.
        maxsize: its buffer's bound.
        lost: messages published to it that it will never see: the one that
            did not fit and every later one, until this was raised.
    """

    __match_args__ = ("patterns", "maxsize", "lost")

    def __init__(self, patterns: tuple[str, ...], maxsize: int, lost: int) -> None:
        super().__init__(
            f"subscriber to {', '.join(patterns)} disconnected: its queue of {maxsize} was "
            f"full; {lost} message{'s' if lost != 1 else ''} lost"
        )
        self.patterns = patterns
        self.maxsize = maxsize
        self.lost = lost


class SerializationError(EngineError):
    """An argument or a result of a process call could not be pickled.

    Attributes:
        direction: ``"argument"`` or ``"result"``.
    """

    __match_args__ = ("direction", "detail")

    def __init__(self, direction: str, detail: str) -> None:
        super().__init__(f"cannot pickle the {direction}: {detail}")
        self.direction = direction
        self.detail = detail


class WorkerCrashed(EngineError):
    """A worker process died while it ran a call: a signal, ``os._exit``, a segfault.

    Attributes:
        exit_code: its exit status, when it exited.
        signal: the number of the signal that killed it, when one did.
    """

    def __init__(self, what: str, *, exit_code: int | None, signal: int | None) -> None:
        if signal is not None:
            try:
                how = f"killed by {signal_module.Signals(signal).name}"
            except ValueError:
                how = f"killed by signal {signal}"
        elif exit_code is not None:
            how = f"exited with status {exit_code}"
        else:
            how = "died"
        super().__init__(f"worker process {how} while {what}")
        self.what = what
        self.exit_code = exit_code
        self.signal = signal

    def __reduce__(self) -> tuple[object, ...]:
        # Keyword-only arguments: rebuild through a helper that takes them positionally.
        return (_worker_crashed, (self.what, self.exit_code, self.signal))


def _worker_crashed(what: str, exit_code: int | None, signal: int | None) -> WorkerCrashed:
    return WorkerCrashed(what, exit_code=exit_code, signal=signal)
