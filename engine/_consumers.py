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
from ._runtime import Shutdown
from ._stopping import child_stop
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

        Draining:
            In a supervised child, once the supervisor's
            :meth:`~engine.Supervisor.shutdown` asks the child to stop
            (:func:`engine.current_stop`), the workers stop waiting for new
            messages, handle every message already queued, and return. The
            queue is emptied with ``channel.receive_nowait()``; a channel
            without that method is not emptied (the workers finish the
            messages in hand and return). Outside a supervised child the
            group runs until the channel ends, as before.

        Cancellation:
            Cancelling the caller cancels every worker; a message being
            handled is cut off mid-handler and counted neither way.

        Raises:
            BaseException: with ``on_error="raise"``, the handler's error,
                in the exception group of the workers' nursery.
        """
        stop = child_stop()
        with attach_statistics(self):
            async with channel, trio.open_nursery() as nursery:
                waits = _Waits(watched=stop is not None, workers=self.workers)
                if stop is not None:
                    nursery.start_soon(waits.cancel_on, stop, name=f"{self.name} stop")
                for index in range(self.workers):
                    nursery.start_soon(self._work, channel, waits, name=f"{self.name}[{index}]")
                task_status.started()

    async def _work(self, channel: trio.abc.ReceiveChannel[T], waits: _Waits) -> None:
        try:
            await self._handle_all(channel, waits)
        finally:
            waits.worker_done()

    async def _handle_all(self, channel: trio.abc.ReceiveChannel[T], waits: _Waits) -> None:
        tally = self._tally
        handler = self.handler
        while True:
            try:
                message = await waits.receive(channel)
            except (trio.EndOfChannel, trio.WouldBlock):
                return  # the channel ended, or it is empty and we are draining
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


class _Waits:
    """The workers' waits for a message, which a stop request cuts short (private).

    Once stopping, a worker takes only what is already queued: a receive
    that would wait raises ``trio.WouldBlock`` instead, and a cancelled wait
    gives up nothing, as trio's channels guarantee.
    """

    def __init__(self, *, watched: bool, workers: int) -> None:
        self.stopping = False
        self._watched = watched  # False: nothing will cut a wait short
        self._scopes: set[trio.CancelScope] = set()
        self._workers = workers
        self._watch = trio.CancelScope()

    async def cancel_on(self, stop: Shutdown) -> None:
        """Cut every wait short once ``stop`` is requested; ends with the last worker."""
        with self._watch:
            await stop.wait()
            self.stopping = True
            for scope in self._scopes:
                scope.cancel()

    def worker_done(self) -> None:
        self._workers -= 1
        if not self._workers:
            self._watch.cancel()

    async def receive(self, channel: trio.abc.ReceiveChannel[T]) -> T:
        if not self._watched:
            return await channel.receive()
        while not self.stopping:
            with trio.CancelScope() as scope:
                self._scopes.add(scope)
                try:
                    return await channel.receive()
                finally:
                    self._scopes.discard(scope)
        receive_nowait: Callable[[], T] | None = getattr(channel, "receive_nowait", None)
        if receive_nowait is None:
            raise trio.WouldBlock
        return receive_nowait()


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
