"""Fakes for work that takes (virtual) time: an async callable that follows a script.

``Scripted(Finish(after=0.25, value=1), Fail(ValueError, "bad", after=1), Hang())``
is an async callable. Each call plays the next step of the script; once the
script is exhausted the last step repeats (pass ``repeat_last=False`` to make
an extra call an error instead). Every delay is measured in trio time from the
start of the call, so under ``autojump_clock`` the fake "takes" exactly the
scripted time and tests assert it exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, Literal

import attrs
import trio

from .._validation import check_duration
from .._watchdog import heartbeat

CallStatus = Literal["running", "finished", "failed", "cancelled"]

# What a step calls when the scripted work reports that it is ready.
_Ready = Callable[[], None]


def _check_delay(_instance: object, attribute: attrs.Attribute[float], value: float) -> None:
    check_duration(attribute.name, value, allow_zero=True)


def _check_beat(
    _instance: object, attribute: attrs.Attribute[float | None], value: float | None
) -> None:
    if value is not None:
        check_duration(attribute.name, value)


async def _ready_then_end(start: float, ready_after: float, after: float, ready: _Ready) -> None:
    # Readiness only happens if it comes no later than the end: a step that
    # ends first fails (or returns) before it ever reported ready.
    if ready_after <= after:
        await trio.sleep_until(start + ready_after)
        ready()
    await trio.sleep_until(start + after)


@attrs.frozen
class Finish:
    """Return ``value`` once ``after`` seconds have passed since the call started.

    Attributes:
        value: what the call returns (the same object on every call).
        after: seconds the call takes; ``math.inf`` never returns.
        ready_after: seconds until ``task_status.started()``; see :class:`Scripted`.
    """

    value: object = None
    after: float = attrs.field(default=0.0, kw_only=True, validator=_check_delay)
    ready_after: float = attrs.field(default=0.0, kw_only=True, validator=_check_delay)

    async def _play(self, start: float, ready: _Ready) -> object:
        await _ready_then_end(start, self.ready_after, self.after, ready)
        return self.value


@attrs.frozen(init=False)
class Fail:
    """Raise a fresh exception once ``after`` seconds have passed since the call started.

    ``Fail(ValueError, "bad symbol", after=1)`` raises ``ValueError("bad
    symbol")`` one second into each call. A new exception is built per call,
    so tracebacks and ``__context__`` never pile up across calls.

    Attributes:
        error: an exception class, or any callable returning an exception.
        args: positional arguments for ``error``.
        after: seconds before the exception is raised.
        ready_after: seconds until ``task_status.started()``; see :class:`Scripted`.
    """

    error: Callable[..., BaseException]
    args: tuple[Any, ...]
    after: float = attrs.field(validator=_check_delay)
    ready_after: float = attrs.field(validator=_check_delay)

    def __init__(
        self,
        error: Callable[..., BaseException],
        *args: Any,
        after: float = 0.0,
        ready_after: float = 0.0,
    ) -> None:
        """Build the step; see the class docstring.

        Raises:
            TypeError: if ``error`` is an exception instance or not callable.
        """
        if isinstance(error, BaseException):
            raise TypeError(
                f"error must be an exception class or factory, not an instance ({error!r}): "
                f"write Fail({type(error).__name__}, *args) so each call raises a fresh one"
            )
        if not callable(error):
            raise TypeError(f"error must be an exception class or factory, got {error!r}")
        self.__attrs_init__(error, args, after, ready_after)

    def make_error(self) -> BaseException:
        """Build this step's exception.

        Raises:
            TypeError: if ``error`` returned something that is not an exception.
        """
        exc = self.error(*self.args)
        if not isinstance(exc, BaseException):
            raise TypeError(f"Fail's error factory returned {exc!r}, not an exception")
        return exc

    async def _play(self, start: float, ready: _Ready) -> object:
        await _ready_then_end(start, self.ready_after, self.after, ready)
        raise self.make_error()


@attrs.frozen
class Hang:
    """Never return: a stuck worker, or a live but slow one.

    With ``beat_every=None`` the call sleeps until cancelled and never calls
    ``engine.heartbeat()``: a stuck worker, for a stall watchdog to catch.
    With ``beat_every=S`` it beats at ``S``, ``2S``, ... seconds into the
    call: a slow worker that a watchdog must leave alone.

    Attributes:
        beat_every: seconds between heartbeats, or ``None`` for none.
        ready_after: seconds until ``task_status.started()``; ``math.inf``
            for a worker that hangs during startup. See :class:`Scripted`.
    """

    beat_every: float | None = attrs.field(default=None, kw_only=True, validator=_check_beat)
    ready_after: float = attrs.field(default=0.0, kw_only=True, validator=_check_delay)

    async def _play(self, start: float, ready: _Ready) -> object:
        period = math.inf if self.beat_every is None else self.beat_every
        ready_at = start + self.ready_after
        is_ready = False
        beats = 0
        while True:
            # Beats sit on the grid start + k * period, so none ever drifts.
            next_beat = start + (beats + 1) * period
            if not is_ready and ready_at <= next_beat:
                await trio.sleep_until(ready_at)
                ready()
                is_ready = True
            else:
                await trio.sleep_until(next_beat)
                heartbeat()
                beats += 1


Step = Finish | Fail | Hang


@attrs.frozen
class CallRecord:
    """What happened on one call of a :class:`Scripted`.

    Attributes:
        index: 0 for the first call, 1 for the second, ...
        step: the step the call played.
        args: the positional arguments it was called with.
        kwargs: the keyword arguments, without ``task_status``.
        started_at: trio time the call started.
        ready_at: trio time it called ``task_status.started()``, or ``None``.
        ended_at: trio time it returned or raised; ``None`` while running.
        status: ``"running"``, ``"finished"``, ``"failed"`` or ``"cancelled"``.
        value: what a finished call returned.
        error: what a failed call raised.
    """

    index: int
    step: Step
    args: tuple[Any, ...]
    kwargs: Mapping[str, Any]
    started_at: float
    ready_at: float | None = None
    ended_at: float | None = None
    status: CallStatus = "running"
    value: object = None
    error: BaseException | None = None


@attrs.define(init=False, eq=False)
class Scripted:
    """An async callable whose calls play a script of steps, and that records them.

    Use it wherever the code under test takes an async function: a fetcher,
    a batch item function, a supervised child. Each call takes the next step
    (:class:`Finish`, :class:`Fail` or :class:`Hang`); when the script runs
    out, the last step repeats, unless ``repeat_last=False``.

    Readiness: the call accepts ``task_status`` like any function run with
    ``nursery.start`` (or a supervisor's ``start``) and calls
    ``task_status.started()`` ``ready_after`` seconds into the call (default
    0: at once). A step that ends before its ``ready_after`` never reports
    ready, so ``nursery.start`` sees its error, or sees it exit early.

    Cancellation: a cancelled call re-raises ``trio.Cancelled`` and is
    recorded as ``"cancelled"``.

    Args:
        *steps: the script, at least one step.
        repeat_last: whether calls beyond the script replay the last step;
            if False they raise ``AssertionError``.

    Raises:
        ValueError: if no step is given.
        TypeError: if a step is not a Finish, Fail or Hang.
    """

    steps: tuple[Step, ...]
    repeat_last: bool
    _records: list[CallRecord] = attrs.field(init=False, factory=list)
    _in_flight: int = attrs.field(init=False, default=0)
    _max_in_flight: int = attrs.field(init=False, default=0)

    def __init__(self, *steps: Step, repeat_last: bool = True) -> None:
        if not steps:
            raise ValueError("steps must not be empty: give at least one Finish, Fail or Hang")
        for step in steps:
            if not isinstance(step, Finish | Fail | Hang):
                raise TypeError(f"steps must be Finish, Fail or Hang, got {step!r}")
        self.__attrs_init__(steps, repeat_last)

    # Any, not object: the fake must be accepted wherever a typed async
    # callable is expected, whatever its parameters and return type.
    async def __call__(
        self,
        *args: Any,
        task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED,
        **kwargs: Any,
    ) -> Any:
        """Play the next step of the script.

        Args:
            *args: recorded, otherwise ignored.
            task_status: reported ready at the step's ``ready_after``.
            **kwargs: recorded, otherwise ignored.

        Returns:
            The value of a :class:`Finish` step.

        Raises:
            BaseException: the exception of a :class:`Fail` step.
            AssertionError: when called past the script with ``repeat_last=False``.
        """
        index = len(self._records)
        step = self._step_for(index)
        start = trio.current_time()
        self._records.append(CallRecord(index, step, args, kwargs, started_at=start))
        self._in_flight += 1
        self._max_in_flight = max(self._max_in_flight, self._in_flight)

        def ready() -> None:
            self._update(index, ready_at=trio.current_time())
            task_status.started()

        try:
            value = await step._play(start, ready)
        except trio.Cancelled:
            self._update(index, ended_at=trio.current_time(), status="cancelled")
            raise
        except BaseException as exc:
            self._update(index, ended_at=trio.current_time(), status="failed", error=exc)
            raise
        else:
            self._update(index, ended_at=trio.current_time(), status="finished", value=value)
            return value
        finally:
            self._in_flight -= 1

    def _step_for(self, index: int) -> Step:
        if index < len(self.steps):
            return self.steps[index]
        if not self.repeat_last:
            raise AssertionError(
                f"Scripted called {index + 1} times, but its script has "
                f"{len(self.steps)} step(s) and repeat_last=False"
            )
        return self.steps[-1]

    def _update(self, index: int, **changes: Any) -> None:
        self._records[index] = attrs.evolve(self._records[index], **changes)

    @property
    def records(self) -> list[CallRecord]:
        """One record per call so far, in call order (a copy)."""
        return list(self._records)

    @property
    def calls(self) -> int:
        """How many calls have started."""
        return len(self._records)

    @property
    def started_at(self) -> list[float]:
        """Trio time each call started, in call order."""
        return [record.started_at for record in self._records]

    @property
    def ended_at(self) -> list[float | None]:
        """Trio time each call ended, in call order; ``None`` while it runs."""
        return [record.ended_at for record in self._records]

    @property
    def in_flight(self) -> int:
        """How many calls are running now."""
        return self._in_flight

    @property
    def max_in_flight(self) -> int:
        """The most calls that ran at the same time."""
        return self._max_in_flight
