"""Bounded channels with an explicit overflow policy and counters for every message.

The bound is mandatory, what happens when it is reached is a declared
policy, and every message is accounted for at all times::

    sent == delivered + dropped + depth

The channel behaves like trio's memory channels (clones, close, ``async for``,
``*_nowait``) and is built on the same low-level primitives, so it costs about
what they cost. On top it adds the overflow policies, statistics, and
:meth:`ReceiveChannel.receive_batch` for consumers that amortise per-message
work over a batch.
"""

from __future__ import annotations

import abc
import collections
import enum
from collections.abc import Callable, MutableMapping, Sequence
from typing import Any, Generic, Literal, Self, TypeVar, cast

import attrs
import outcome
import trio

from ._counters import Tally, counter_metric, gauge_metric, metric_source
from ._validation import check_choice, check_count

T = TypeVar("T")


class Overflow(enum.StrEnum):
    """What ``send`` does when the buffer is full."""

    BLOCK = "block"
    """Wait for room: backpressure on the sender. Nothing is lost."""
    DROP_NEWEST = "drop_newest"
    """Discard the message being sent; the buffer keeps the older ones."""
    DROP_OLDEST = "drop_oldest"
    """Discard the oldest buffered message to make room for the new one."""


# The enum's values again as a Literal (a type checker cannot derive one from
# the other; tests/test_quality.py holds the two equal). Every option enum is
# declared with this shape.
OverflowName = Literal["block", "drop_newest", "drop_oldest"]
"""The values of :class:`Overflow`, as the strings ``open_channel`` also accepts."""


@metric_source(label="channel")
@attrs.frozen
class ChannelStatistics:
    """A snapshot of one channel's counters.

    At every moment ``sent == delivered + dropped + depth``.

    Attributes:
        maxsize: the buffer's bound.
        overflow: the policy: ``block``, ``drop_newest`` or ``drop_oldest``.
        sent: messages accepted by ``send``/``send_nowait``, including the
            ones the policy dropped (a sender still waiting is not counted).
        delivered: messages handed to a receiver.
        dropped: messages discarded by the overflow policy.
        depth: messages in the buffer now (they stay counted here if every
            receiver closed before taking them).
        peak_depth: the highest ``depth`` seen.
        senders_waiting: tasks blocked in ``send`` (``block`` policy only).
        receivers_waiting: tasks blocked in ``receive``.
        open_send_channels: send handles not yet closed.
        open_receive_channels: receive handles not yet closed.
    """

    maxsize: int = attrs.field(metadata=gauge_metric("The buffer's bound", name="capacity"))
    overflow: str
    sent: int = attrs.field(default=0, metadata=counter_metric("Messages accepted by send"))
    delivered: int = attrs.field(
        default=0, metadata=counter_metric("Messages handed to a receiver")
    )
    dropped: int = attrs.field(
        default=0, metadata=counter_metric("Messages discarded by the overflow policy")
    )
    depth: int = attrs.field(default=0, metadata=gauge_metric("Messages buffered now"))
    peak_depth: int = attrs.field(default=0, metadata=gauge_metric("Highest depth seen"))
    senders_waiting: int = attrs.field(default=0, metadata=gauge_metric("Tasks blocked in send"))
    receivers_waiting: int = attrs.field(
        default=0, metadata=gauge_metric("Tasks blocked in receive")
    )
    open_send_channels: int = 0
    open_receive_channels: int = 0


class _State(Tally[ChannelStatistics], Generic[T]):
    """What all the clones of one channel share: the buffer, the parked tasks, the counters."""

    __slots__ = ("buffer", "maxsize", "overflow", "receive_waiters", "send_waiters")

    def __init__(self, maxsize: int, overflow: Overflow) -> None:
        super().__init__()
        self.maxsize = maxsize
        self.overflow = overflow
        self.buffer: collections.deque[T] = collections.deque()
        # Parked tasks, in arrival order; a sender parks with its message.
        self.send_waiters: collections.OrderedDict[trio.lowlevel.Task, T] = (
            collections.OrderedDict()
        )
        self.receive_waiters: collections.OrderedDict[trio.lowlevel.Task, int] = (
            collections.OrderedDict()
        )

    @property
    def depth(self) -> int:
        return len(self.buffer)

    @property
    def senders_waiting(self) -> int:
        return len(self.send_waiters)

    @property
    def receivers_waiting(self) -> int:
        return len(self.receive_waiters)

    def statistics(self) -> ChannelStatistics:
        return self.snapshot(overflow=str(self.overflow))


class _Handle(Generic[T], metaclass=abc.ABCMeta):
    """What both ends of a channel do alike: report, clone, park a task, close."""

    __slots__ = ("_closed", "_parked", "_state")

    def __init__(self, state: _State[T]) -> None:
        self._state = state
        self._closed = False
        # Tasks parked on this handle: they fail when it closes.
        self._parked: set[trio.lowlevel.Task] = set()

    def __repr__(self) -> str:
        state = self._state
        kind = type(self).__name__
        return f"<engine.{kind} maxsize={state.maxsize} overflow={state.overflow!s}>"

    def statistics(self) -> ChannelStatistics:
        """The channel's counters (shared by all clones of both ends)."""
        return self._state.statistics()

    def clone(self) -> Self:
        """Another handle on the same channel, closed independently.

        Raises:
            trio.ClosedResourceError: this handle was closed.
        """
        if self._closed:
            raise trio.ClosedResourceError
        return type(self)(self._state)

    @abc.abstractmethod
    def close(self) -> None:
        """Close this handle; idempotent."""

    async def aclose(self) -> None:
        """Close this handle, then checkpoint."""
        self.close()
        await trio.lowlevel.checkpoint()

    async def _wait(self, waiters: MutableMapping[trio.lowlevel.Task, Any], item: object) -> object:
        """Park in ``waiters`` with ``item`` until the other end reschedules us."""
        task = trio.lowlevel.current_task()
        self._parked.add(task)
        waiters[task] = item
        task.custom_sleep_data = self

        def abort(_: Callable[[], object]) -> trio.lowlevel.Abort:
            self._parked.remove(task)
            del waiters[task]
            return trio.lowlevel.Abort.SUCCEEDED

        return await trio.lowlevel.wait_task_rescheduled(abort)

    def _release(self, waiters: MutableMapping[trio.lowlevel.Task, Any]) -> bool:
        """Mark the handle closed and fail the tasks parked on it; ``False`` if it was closed."""
        if self._closed:
            return False
        self._closed = True
        for task in self._parked:
            del waiters[task]
            trio.lowlevel.reschedule(task, outcome.Error(trio.ClosedResourceError()))
        self._parked.clear()
        return True


def _wake_all(waiters: MutableMapping[trio.lowlevel.Task, Any], error: type[BaseException]) -> None:
    """Fail every task parked on the other end (its last handle closed) with ``error``."""
    for task in waiters:
        task.custom_sleep_data._parked.remove(task)
        trio.lowlevel.reschedule(task, outcome.Error(error()))
    waiters.clear()


class SendChannel(_Handle[T], trio.abc.SendChannel[T]):
    """The sending end of a channel from :func:`open_channel`.

    Like ``trio.MemorySendChannel``: clone it to give each producer its own
    handle; the receivers see ``EndOfChannel`` once every clone is closed and
    the buffer is drained.
    """

    __slots__ = ()

    def __init__(self, state: _State[T]) -> None:
        super().__init__(state)
        state.open_send_channels += 1

    def _open_state(self) -> _State[T]:
        """The shared state, once sure this handle may send."""
        if self._closed:
            raise trio.ClosedResourceError
        if not self._state.open_receive_channels:
            raise trio.BrokenResourceError
        return self._state

    def send_nowait(self, value: T) -> None:
        """Send without waiting; a full buffer is handled by the policy.

        Raises:
            trio.WouldBlock: the buffer is full and the policy is ``block``.
            trio.ClosedResourceError: this handle was closed.
            trio.BrokenResourceError: every receive handle was closed.
        """
        state = self._open_state()
        if state.receive_waiters:
            # A receiver is parked, so the buffer is empty: hand it over.
            task, max_items = state.receive_waiters.popitem(last=False)
            task.custom_sleep_data._parked.remove(task)
            state.sent += 1
            state.delivered += 1
            trio.lowlevel.reschedule(task, outcome.Value([value] if max_items else value))
            return
        buffer = state.buffer
        if len(buffer) < state.maxsize:
            buffer.append(value)
            state.sent += 1
            if len(buffer) > state.peak_depth:
                state.peak_depth = len(buffer)
            return
        overflow = state.overflow
        if overflow is Overflow.BLOCK:
            raise trio.WouldBlock
        state.sent += 1
        state.dropped += 1
        if overflow is Overflow.DROP_OLDEST:
            buffer.popleft()
            buffer.append(value)

    def send_batch_nowait(self, values: Sequence[T]) -> None:
        """Send several messages without waiting: ``send_nowait`` for each, in one call.

        The messages go in order: first to receivers parked in ``receive``
        (one each) or ``receive_batch`` (up to its ``max_items`` each), then
        into the buffer. A producer that has many messages at once pays for
        one call, not one per message.

        Under ``block`` it is all or nothing: if the parked receivers and the
        buffer's room cannot take every message, none is sent. Under the
        drop policies each message beyond the room is handled as
        ``send_nowait`` would handle it.

        Raises:
            trio.WouldBlock: under ``block``, not all of them fit; none was sent.
            trio.ClosedResourceError: this handle was closed.
            trio.BrokenResourceError: every receive handle was closed.
        """
        state = self._open_state()
        total = len(values)
        if state.overflow is Overflow.BLOCK:
            room = state.maxsize - len(state.buffer)
            room += sum(max_items or 1 for max_items in state.receive_waiters.values())
            if total > room:
                raise trio.WouldBlock
        position = 0
        # Parked receivers mean an empty buffer: hand over first, in order.
        while state.receive_waiters and position < total:
            task, max_items = state.receive_waiters.popitem(last=False)
            task.custom_sleep_data._parked.remove(task)
            count = min(max_items or 1, total - position)
            given = values[position : position + count]
            # As ``receive_batch`` asked: a list; as ``receive`` asked: the message.
            handed: object = list(given) if max_items else given[0]
            position += count
            state.sent += count
            state.delivered += count
            trio.lowlevel.reschedule(task, outcome.Value(handed))
        if position == total:
            return
        rest = values[position:] if position else values
        buffer = state.buffer
        room = state.maxsize - len(buffer)
        buffer.extend(rest[:room] if len(rest) > room else rest)
        state.sent += len(rest)
        if len(rest) > room:
            # Only the drop policies get here (``block`` checked the room above).
            beyond = rest[room:]
            state.dropped += len(beyond)
            if state.overflow is Overflow.DROP_OLDEST:
                buffer.extend(beyond)
                for _ in beyond:
                    buffer.popleft()
        if len(buffer) > state.peak_depth:
            state.peak_depth = len(buffer)

    async def send(self, value: T) -> None:
        """Send, waiting for room only under the ``block`` policy.

        Cancellation:
            If cancelled, the message was not sent (and is not counted).

        Raises:
            trio.ClosedResourceError: this handle was closed, before or while waiting.
            trio.BrokenResourceError: every receive handle was closed.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        try:
            self.send_nowait(value)
        except trio.WouldBlock:
            pass
        else:
            await trio.lowlevel.cancel_shielded_checkpoint()
            return
        await self._wait(self._state.send_waiters, value)

    def close(self) -> None:
        """Close this handle; idempotent. Senders parked on it get ``ClosedResourceError``."""
        state = self._state
        if self._release(state.send_waiters):
            state.open_send_channels -= 1
            if state.open_send_channels == 0:
                _wake_all(state.receive_waiters, trio.EndOfChannel)


class ReceiveChannel(_Handle[T], trio.abc.ReceiveChannel[T]):
    """The receiving end of a channel from :func:`open_channel`.

    Several tasks may receive from one handle or from clones: each message
    goes to exactly one of them. ``async for message in channel`` ends when
    every send handle is closed and the buffer is drained.
    """

    __slots__ = ()

    def __init__(self, state: _State[T]) -> None:
        super().__init__(state)
        state.open_receive_channels += 1

    def receive_nowait(self) -> T:
        """Take the oldest message without waiting.

        Raises:
            trio.WouldBlock: nothing to take.
            trio.EndOfChannel: every send handle is closed and nothing is left.
            trio.ClosedResourceError: this handle was closed.
        """
        if self._closed:
            raise trio.ClosedResourceError
        state = self._state
        if state.buffer:
            value = state.buffer.popleft()
            state.delivered += 1
            if state.send_waiters:
                self._admit_waiting_senders()
            return value
        if not state.open_send_channels:
            raise trio.EndOfChannel
        raise trio.WouldBlock

    def receive_batch_nowait(self, max_items: int) -> list[T]:
        """Take every buffered message, up to ``max_items``, without waiting.

        Raises:
            ValueError: ``max_items`` is below 1.
            trio.WouldBlock: nothing to take.
            trio.EndOfChannel: every send handle is closed and nothing is left.
            trio.ClosedResourceError: this handle was closed.
        """
        if max_items < 1:
            raise ValueError(f"max_items must be >= 1, got {max_items!r}")
        if self._closed:
            raise trio.ClosedResourceError
        state = self._state
        buffer = state.buffer
        if buffer:
            count = min(max_items, len(buffer))
            batch = [buffer.popleft() for _ in range(count)]
            state.delivered += count
            self._admit_waiting_senders()
            return batch
        if not state.open_send_channels:
            raise trio.EndOfChannel
        raise trio.WouldBlock

    def _admit_waiting_senders(self) -> None:
        """Move parked senders' messages into the room taking some made."""
        state = self._state
        buffer = state.buffer
        while state.send_waiters and len(buffer) < state.maxsize:
            task, value = state.send_waiters.popitem(last=False)
            task.custom_sleep_data._parked.remove(task)
            buffer.append(value)
            state.sent += 1
            trio.lowlevel.reschedule(task)
        if len(buffer) > state.peak_depth:
            state.peak_depth = len(buffer)

    async def receive(self) -> T:
        """Take the oldest message, waiting for one if there is none.

        Cancellation:
            If cancelled, no message was taken.

        Raises:
            trio.EndOfChannel: every send handle is closed and nothing is left.
            trio.ClosedResourceError: this handle was closed, before or while waiting.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        try:
            value = self.receive_nowait()
        except trio.WouldBlock:
            pass
        else:
            await trio.lowlevel.cancel_shielded_checkpoint()
            return value
        # The sender that wakes us passes its message (a T) as our result.
        return cast(T, await self._park(0))

    async def receive_batch(self, max_items: int) -> list[T]:
        """Take every buffered message, up to ``max_items``; wait if there is none.

        Returns at least one message. One call replaces up to ``max_items``
        calls to :meth:`receive`, each of which costs a trip through the
        scheduler.

        Cancellation:
            If cancelled, no message was taken.

        Raises:
            ValueError: ``max_items`` is below 1.
            trio.EndOfChannel: every send handle is closed and nothing is left.
            trio.ClosedResourceError: this handle was closed, before or while waiting.
        """
        if max_items < 1:
            raise ValueError(f"max_items must be >= 1, got {max_items!r}")
        await trio.lowlevel.checkpoint_if_cancelled()
        try:
            batch = self.receive_batch_nowait(max_items)
        except trio.WouldBlock:
            pass
        else:
            await trio.lowlevel.cancel_shielded_checkpoint()
            return batch
        return cast(list[T], await self._park(max_items))

    async def _park(self, max_items: int) -> object:
        # Only reached with an empty buffer, hence no parked sender (senders
        # park only on a full one): the next send hands its message straight
        # to us, as a list if we asked for a batch.
        return await self._wait(self._state.receive_waiters, max_items)

    def close(self) -> None:
        """Close this handle; idempotent.

        Receivers parked on it get ``ClosedResourceError``. When the last
        receive handle closes, parked senders get ``BrokenResourceError``;
        buffered messages stay counted in ``depth``, undelivered.
        """
        state = self._state
        if self._release(state.receive_waiters):
            state.open_receive_channels -= 1
            if state.open_receive_channels == 0:
                _wake_all(state.send_waiters, trio.BrokenResourceError)


class open_channel(tuple[SendChannel[T], ReceiveChannel[T]]):  # a function in use
    """Open a bounded channel: ``send, receive = engine.open_channel[int](1000)``.

    Call it like a function; it is a class only so that, like
    ``trio.open_memory_channel``, it can be subscripted with the message type.

    Args:
        maxsize: how many messages the buffer holds; at least 1. There is
            no unbounded option: pick the bound and the policy on purpose.
        overflow: what ``send`` does when the buffer is full: ``"block"``
            (wait, the default), ``"drop_newest"`` or ``"drop_oldest"``.

    Returns:
        The send and receive ends, sharing one buffer and one set of counters.

    Raises:
        ValueError: ``maxsize`` below 1, or an unknown ``overflow``.
        TypeError: ``maxsize`` is not an int.
    """

    def __new__(  # type: ignore[misc]  # returns a plain tuple, as trio's open_memory_channel does
        cls, maxsize: int, *, overflow: Overflow | OverflowName = "block"
    ) -> tuple[SendChannel[T], ReceiveChannel[T]]:
        state: _State[T] = _State(
            check_count("maxsize", maxsize, minimum=1),
            check_choice("overflow", overflow, Overflow),
        )
        return SendChannel(state), ReceiveChannel(state)

    def __init__(self, maxsize: int, *, overflow: Overflow | OverflowName = "block") -> None: ...
