"""Bounded channels with an explicit overflow policy and counters for every message.

Seed 003's queue held 1,000 messages, dropped 20,563 of them when its one
consumer fell behind, and said so in a log line nobody read. Here the bound is
mandatory, what happens when it is reached is a declared policy, and every
message is accounted for at all times::

    sent == delivered + dropped + depth

The channel behaves like trio's memory channels (clones, close, ``async for``,
``*_nowait``) and is built on the same low-level primitives, so it costs about
what they cost. On top it adds the overflow policies, statistics, and
:meth:`ReceiveChannel.receive_batch` for consumers that amortise per-message
work over a batch.
"""

from __future__ import annotations

import collections
import enum
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar, cast

import attrs
import outcome
import trio

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

    maxsize: int
    overflow: str
    sent: int
    delivered: int
    dropped: int
    depth: int
    peak_depth: int
    senders_waiting: int
    receivers_waiting: int
    open_send_channels: int
    open_receive_channels: int


class _State(Generic[T]):
    """What all the clones of one channel share."""

    __slots__ = (
        "buffer",
        "delivered",
        "dropped",
        "maxsize",
        "open_receive",
        "open_send",
        "overflow",
        "peak",
        "receive_waiters",
        "send_waiters",
        "sent",
    )

    def __init__(self, maxsize: int, overflow: Overflow) -> None:
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
        self.sent = 0
        self.delivered = 0
        self.dropped = 0
        self.peak = 0
        self.open_send = 0
        self.open_receive = 0

    def statistics(self) -> ChannelStatistics:
        return ChannelStatistics(
            maxsize=self.maxsize,
            overflow=str(self.overflow),
            sent=self.sent,
            delivered=self.delivered,
            dropped=self.dropped,
            depth=len(self.buffer),
            peak_depth=self.peak,
            senders_waiting=len(self.send_waiters),
            receivers_waiting=len(self.receive_waiters),
            open_send_channels=self.open_send,
            open_receive_channels=self.open_receive,
        )

    def take(self, max_items: int) -> list[T]:
        """Up to ``max_items`` buffered messages, refilled from parked senders."""
        buffer = self.buffer
        count = min(max_items, len(buffer))
        batch = [buffer.popleft() for _ in range(count)]
        self.delivered += count
        self.admit_waiting_senders()
        return batch

    def admit_waiting_senders(self) -> None:
        while self.send_waiters and len(self.buffer) < self.maxsize:
            task, value = self.send_waiters.popitem(last=False)
            task.custom_sleep_data._parked.remove(task)
            self.buffer.append(value)
            self.sent += 1
            trio.lowlevel.reschedule(task)
        if len(self.buffer) > self.peak:
            self.peak = len(self.buffer)


class SendChannel(trio.abc.SendChannel[T]):
    """The sending end of a channel from :func:`open_channel`.

    Like ``trio.MemorySendChannel``: clone it to give each producer its own
    handle; the receivers see ``EndOfChannel`` once every clone is closed and
    the buffer is drained.
    """

    __slots__ = ("_closed", "_parked", "_state")

    def __init__(self, state: _State[T]) -> None:
        self._state = state
        self._closed = False
        self._parked: set[trio.lowlevel.Task] = set()
        state.open_send += 1

    def __repr__(self) -> str:
        state = self._state
        return f"<engine.SendChannel maxsize={state.maxsize} overflow={state.overflow!s}>"

    def statistics(self) -> ChannelStatistics:
        """The channel's counters (shared by all clones of both ends)."""
        return self._state.statistics()

    def _open_state(self) -> _State[T]:
        """The shared state, once sure this handle may send."""
        if self._closed:
            raise trio.ClosedResourceError
        if not self._state.open_receive:
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
            if len(buffer) > state.peak:
                state.peak = len(buffer)
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
        if len(buffer) > state.peak:
            state.peak = len(buffer)

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
        task = trio.lowlevel.current_task()
        self._parked.add(task)
        self._state.send_waiters[task] = value
        task.custom_sleep_data = self

        def abort(_: Callable[[], object]) -> trio.lowlevel.Abort:
            self._parked.remove(task)
            del self._state.send_waiters[task]
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)

    def clone(self) -> SendChannel[T]:
        """Another handle on the same channel, closed independently.

        Raises:
            trio.ClosedResourceError: this handle was closed.
        """
        if self._closed:
            raise trio.ClosedResourceError
        return SendChannel(self._state)

    def close(self) -> None:
        """Close this handle; idempotent. Senders parked on it get ``ClosedResourceError``."""
        if self._closed:
            return
        self._closed = True
        state = self._state
        for task in self._parked:
            del state.send_waiters[task]
            trio.lowlevel.reschedule(task, outcome.Error(trio.ClosedResourceError()))
        self._parked.clear()
        state.open_send -= 1
        if state.open_send == 0:
            for task in state.receive_waiters:
                task.custom_sleep_data._parked.remove(task)
                trio.lowlevel.reschedule(task, outcome.Error(trio.EndOfChannel()))
            state.receive_waiters.clear()

    async def aclose(self) -> None:
        """Close this handle, then checkpoint."""
        self.close()
        await trio.lowlevel.checkpoint()


class ReceiveChannel(trio.abc.ReceiveChannel[T]):
    """The receiving end of a channel from :func:`open_channel`.

    Several tasks may receive from one handle or from clones: each message
    goes to exactly one of them. ``async for message in channel`` ends when
    every send handle is closed and the buffer is drained.
    """

    __slots__ = ("_closed", "_parked", "_state")

    def __init__(self, state: _State[T]) -> None:
        self._state = state
        self._closed = False
        self._parked: set[trio.lowlevel.Task] = set()
        state.open_receive += 1

    def __repr__(self) -> str:
        state = self._state
        return f"<engine.ReceiveChannel maxsize={state.maxsize} overflow={state.overflow!s}>"

    def statistics(self) -> ChannelStatistics:
        """The channel's counters (shared by all clones of both ends)."""
        return self._state.statistics()

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
                state.admit_waiting_senders()
            return value
        if not state.open_send:
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
        if state.buffer:
            return state.take(max_items)
        if not state.open_send:
            raise trio.EndOfChannel
        raise trio.WouldBlock

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
        task = trio.lowlevel.current_task()
        self._parked.add(task)
        self._state.receive_waiters[task] = max_items
        task.custom_sleep_data = self

        def abort(_: Callable[[], object]) -> trio.lowlevel.Abort:
            self._parked.remove(task)
            del self._state.receive_waiters[task]
            return trio.lowlevel.Abort.SUCCEEDED

        return await trio.lowlevel.wait_task_rescheduled(abort)

    def clone(self) -> ReceiveChannel[T]:
        """Another handle on the same channel, closed independently.

        Raises:
            trio.ClosedResourceError: this handle was closed.
        """
        if self._closed:
            raise trio.ClosedResourceError
        return ReceiveChannel(self._state)

    def close(self) -> None:
        """Close this handle; idempotent.

        Receivers parked on it get ``ClosedResourceError``. When the last
        receive handle closes, parked senders get ``BrokenResourceError``;
        buffered messages stay counted in ``depth``, undelivered.
        """
        if self._closed:
            return
        self._closed = True
        state = self._state
        for task in self._parked:
            del state.receive_waiters[task]
            trio.lowlevel.reschedule(task, outcome.Error(trio.ClosedResourceError()))
        self._parked.clear()
        state.open_receive -= 1
        if state.open_receive == 0:
            for task in state.send_waiters:
                task.custom_sleep_data._parked.remove(task)
                trio.lowlevel.reschedule(task, outcome.Error(trio.BrokenResourceError()))
            state.send_waiters.clear()

    async def aclose(self) -> None:
        """Close this handle, then checkpoint."""
        self.close()
        await trio.lowlevel.checkpoint()


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
        cls, maxsize: int, *, overflow: str = "block"
    ) -> tuple[SendChannel[T], ReceiveChannel[T]]:
        state: _State[T] = _State(
            check_count("maxsize", maxsize, minimum=1),
            check_choice("overflow", overflow, Overflow),
        )
        return SendChannel(state), ReceiveChannel(state)

    def __init__(self, maxsize: int, *, overflow: str = "block") -> None: ...
