"""The in-process bus, on :class:`engine.Hub` (the default)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager

import trio

from .._asyncwith import async_with_only
from .._health import SourceHealth
from .._hub import Hub, HubOverflow, HubOverflowName, HubStatistics
from .._hub import Subscription as HubSubscription
from ._base import BusMessage


class MemorySubscription:
    """A subscription of a :class:`MemoryBus`: an async iterator of :class:`BusMessage`."""

    def __init__(self, inner: HubSubscription[BusMessage]) -> None:
        self._inner = inner

    def __aiter__(self) -> AsyncIterator[BusMessage]:
        return self

    async def __anext__(self) -> BusMessage:
        _, message = await self._inner.__anext__()
        return message

    async def receive_batch(self, max_items: int) -> list[BusMessage]:
        """Every queued message, up to ``max_items``; waits for at least one."""
        return [message for _, message in await self._inner.receive_batch(max_items)]

    def receive_batch_nowait(self, max_items: int) -> list[BusMessage]:
        """Every queued message, up to ``max_items``; ``trio.WouldBlock`` if none."""
        return [message for _, message in self._inner.receive_batch_nowait(max_items)]


class MemoryBus:
    """A :class:`~engine.bus.Bus` inside one process: at most once, no copies.

    Each subscription has its own bounded queue and overflow policy
    (``drop_oldest``, ``drop_newest``, ``disconnect``, ``block``), exactly as
    :meth:`engine.Hub.subscribe`; publishing never waits for a slow
    subscriber unless it chose ``block``.
    """

    def __init__(self, name: str = "bus") -> None:
        self._hub: Hub[BusMessage] = Hub(name=name)

    async def publish(self, topic: str, data: bytes, *, msg_id: str | None = None) -> None:
        """Publish ``data`` on ``topic`` to every matching subscription.

        Raises:
            TypeError: ``data`` is not bytes.
            ValueError: a bad topic.
            trio.ClosedResourceError: the bus is closed.
        """
        if not isinstance(data, bytes | bytearray | memoryview):
            raise TypeError(f"data must be bytes, got {type(data).__name__}")
        await self._hub.publish(topic, BusMessage(topic, bytes(data), msg_id))

    def publish_nowait(self, topic: str, data: bytes, *, msg_id: str | None = None) -> None:
        """Publish without waiting; raises ``trio.WouldBlock`` if a ``block`` subscriber is full."""
        self._hub.publish_nowait(topic, BusMessage(topic, bytes(data), msg_id))

    def subscribe(
        self, pattern: str, *, maxsize: int, overflow: HubOverflow | HubOverflowName = "drop_oldest"
    ) -> AbstractAsyncContextManager[MemorySubscription]:
        """Subscribe to ``pattern`` for the length of an ``async with`` block.

        Raises:
            ValueError: at call time, for a bad pattern, bound or policy.
        """
        inner = self._hub.subscribe(pattern, maxsize=maxsize, overflow=overflow)
        return async_with_only(
            self._subscribed(inner), call="bus.subscribe", target="sub", loop="message"
        )

    @asynccontextmanager
    async def _subscribed(
        self, inner: AbstractAsyncContextManager[HubSubscription[BusMessage]]
    ) -> AsyncIterator[MemorySubscription]:
        async with inner as subscription:
            yield MemorySubscription(subscription)

    async def aclose(self) -> None:
        """Close the bus: subscribers drain what is queued, then their iteration ends."""
        self._hub.close()
        await trio.lowlevel.checkpoint()

    def statistics(self) -> HubStatistics:
        """The underlying hub's statistics (per subscription: offered, dropped, lost, depth)."""
        return self._hub.statistics()

    @property
    def at_least_once(self) -> bool:
        """False: what is published reaches the subscriptions of this moment, once."""
        return False

    def health(self) -> SourceHealth:
        """``open`` (ready) until :meth:`aclose`, then ``closed`` (not ready)."""
        closed = self._hub.closed
        return SourceHealth("closed" if closed else "open", ready=not closed)
