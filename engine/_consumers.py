"""N consumers of one channel in one nursery, with a declared error policy and counters.

How many workers take from the channel is one argument, and what happens
when a handler raises is a choice, not an accident: count it and go on, or
fail the whole group.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Awaitable, Callable
from typing import Generic, Literal, TypeVar

import attrs
import trio

from ._counters import Tally, counter_metric, gauge_metric, metric_source
from ._names import callable_name, describe_error
from ._validation import check_choice, check_count, check_name
from ._watchdog import attach_statistics, heartbeat

logger = logging.getLogger("engine.consumers")

T = TypeVar("T")


class OnError(enum.StrEnum):
    """What a consumer group does when its handler raises."""

    CONTINUE = "continue"
    """Count the error, log it with its traceback, take the next message."""
    RAISE = "raise"
    """Cancel every worker and let the error out of :meth:`Consumers.run`."""


# The enum's values again as a Literal (a type checker cannot derive one from
# the other; tests/test_quality.py holds the two equal). Every option enum is
# declared with this shape.
OnErrorName = Literal["continue", "raise"]
"""The values of :class:`OnError`, as the strings ``Consumers`` also accepts."""


@metric_source(label="consumer")
@attrs.frozen
class ConsumerStatistics:
    """A snapshot of a consumer group, shaped for /status and /metrics.

    Attributes:
        name: the group's name.
        workers: how many workers it runs.
        on_error: ``continue`` or ``raise``.
        processed: messages the handler finished without raising.
        errors: messages the handler raised on.
        busy: workers inside the handler right now.
        processing_seconds_total: time spent in the handler, all messages.
        processing_seconds_max: the longest single call of the handler.
        last_error: ``"Type: message"`` of the latest error, or ``None``.
        last_error_at: ``trio.current_time()`` of the latest error.
    """

    name: str
    workers: int = attrs.field(metadata=gauge_metric("Workers in the group"))
    on_error: str
    processed: int = attrs.field(default=0, metadata=counter_metric("Messages handled"))
    errors: int = attrs.field(default=0, metadata=counter_metric("Messages the handler raised on"))
    busy: int = attrs.field(default=0, metadata=gauge_metric("Workers inside the handler now"))
    processing_seconds_total: float = attrs.field(
        default=0.0,
        metadata=counter_metric("Time spent in the handler", name="processing_seconds"),
    )
    processing_seconds_max: float = attrs.field(
        default=0.0, metadata=gauge_metric("Longest single call of the handler")
    )
    last_error: str | None = None
    last_error_at: float | None = None


class _Tally(Tally[ConsumerStatistics]):
    """The counters behind :meth:`Consumers.statistics`."""


@attrs.define(eq=False, init=False, on_setattr=attrs.setters.frozen)
class Consumers(Generic[T]):
    """A group of workers that take messages from one channel and handle them.

    Each message goes to exactly one worker. The group ends when the channel
    ends (every sender closed and the buffer drained); it beats
    :func:`engine.heartbeat` once per message, so a supervised child running
    it can use ``stall_after``.

    Args:
        handler: ``async def handler(message)``, called once per message.
        workers: how many messages may be handled at once; at least 1.
        on_error: ``"continue"`` (count and log, the default) or ``"raise"``
            (fail the group: cancel all workers, let the error out).
        name: for logs and statistics; defaults to the handler's name.

    Raises:
        ValueError: a bad ``workers``, ``on_error`` or ``name``, named.
        TypeError: ``handler`` is not callable.
    """

    handler: Callable[[T], Awaitable[object]]
    workers: int
    on_error: OnError
    name: str
    _tally: _Tally = attrs.field(factory=_Tally, init=False, repr=False)

    def __init__(
        self,
        handler: Callable[[T], Awaitable[object]],
        *,
        workers: int = 1,
        on_error: OnError | OnErrorName = "continue",
        name: str | None = None,
    ) -> None:
        if not callable(handler):
            raise TypeError(f"handler must be an async callable, got {handler!r}")
        self.__attrs_init__(
            handler=handler,
            workers=check_count("workers", workers, minimum=1),
            on_error=check_choice("on_error", on_error, OnError),
            name=check_name("name", callable_name(handler) if name is None else name),
        )

    def statistics(self) -> ConsumerStatistics:
        """A frozen snapshot of the group's counters."""
        return self._tally.snapshot(
            name=self.name, workers=self.workers, on_error=str(self.on_error)
        )

    async def run(
        self,
        channel: trio.abc.ReceiveChannel[T],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Handle messages from ``channel`` until it ends; then close it.

        Cancellation:
            Cancelling the caller cancels every worker; a message being
            handled is cut off mid-handler and counted neither way.

        Raises:
            BaseException: with ``on_error="raise"``, the handler's error,
                in the exception group of the workers' nursery.
        """
        with attach_statistics(self):
            async with channel, trio.open_nursery() as nursery:
                for index in range(self.workers):
                    nursery.start_soon(self._work, channel, name=f"{self.name}[{index}]")
                task_status.started()

    async def _work(self, channel: trio.abc.ReceiveChannel[T]) -> None:
        tally = self._tally
        handler = self.handler
        async for message in channel:
            started = trio.current_time()
            tally.busy += 1
            try:
                await handler(message)
            except Exception as exc:
                self._record_error(exc)
                if self.on_error is OnError.RAISE:
                    raise
            else:
                tally.processed += 1
            finally:
                tally.busy -= 1
                elapsed = trio.current_time() - started
                tally.processing_seconds_total += elapsed
                if elapsed > tally.processing_seconds_max:
                    tally.processing_seconds_max = elapsed
            heartbeat()

    def _record_error(self, exc: Exception) -> None:
        tally = self._tally
        tally.errors += 1
        tally.last_error = describe_error(exc)
        tally.last_error_at = trio.current_time()
        logger.error(
            "consumer group %r: handler failed (%d errors so far, on_error=%s): %s",
            self.name,
            tally.errors,
            self.on_error,
            tally.last_error,
            exc_info=exc if self.on_error is OnError.CONTINUE else None,
        )


async def consume(
    channel: trio.abc.ReceiveChannel[T],
    handler: Callable[[T], Awaitable[object]],
    *,
    workers: int = 1,
    on_error: OnError | OnErrorName = "continue",
    name: str | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Handle every message of ``channel`` with ``workers`` concurrent workers.

    Shorthand for ``await Consumers(handler, ...).run(channel)``; build the
    :class:`Consumers` yourself to read its statistics.
    """
    group = Consumers(handler, workers=workers, on_error=on_error, name=name)
    await group.run(channel, task_status=task_status)
