"""The subscriptions of the NATS bus: a local queue each, fed by core NATS or a pull consumer.

Each subscription has a private hub (its bounded queue, overflow policy and
counters). On core NATS, nats-py's callback feeds it, held back while a
``block`` queue is full (:class:`Room`); on JetStream a :class:`Puller`
fetches only what the queue has room for.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import nats.errors
import trio
import trio_asyncio
from nats.aio.msg import Msg

from .._hub import Hub, HubOverflow, SubscriptionStatistics
from .._hub import Subscription as HubSubscription
from .._names import describe_error
from ._base import BusMessage
from ._memory import MemorySubscription
from ._nats_connection import Link, Stream
from ._nats_jetstream import (
    Puller,
    consumer_config,
    durable_name,
    ensure_consumer,
    to_bus_message,
)

# How long ending a subscription may wait for nats-py to unsubscribe.
_UNSUBSCRIBE_GRACE = 5.0


class NatsSubscription(MemorySubscription):
    """A subscription of a :class:`NatsBus`: an async iterator of :class:`BusMessage`.

    Iteration ends when the bus closes; with ``overflow="disconnect"`` it
    ends with :class:`engine.SubscriberDisconnected`.
    """

    def __init__(self, inner: HubSubscription[BusMessage]) -> None:
        super().__init__(inner)
        self._statistics = inner.statistics
        # JetStream: tells the puller that the queue has room again.
        self._on_take: Callable[[], None] | None = None

    async def __anext__(self) -> BusMessage:
        message = await super().__anext__()
        if self._on_take is not None:
            self._on_take()
        return message

    async def receive_batch(self, max_items: int) -> list[BusMessage]:
        """Every queued message, up to ``max_items``; waits for at least one."""
        messages = await super().receive_batch(max_items)
        if self._on_take is not None:
            self._on_take()
        return messages

    def receive_batch_nowait(self, max_items: int) -> list[BusMessage]:
        """Every queued message, up to ``max_items``; ``trio.WouldBlock`` if none."""
        messages = super().receive_batch_nowait(max_items)
        if self._on_take is not None:
            self._on_take()
        return messages

    def statistics(self) -> SubscriptionStatistics:
        """A frozen snapshot of this subscription's queue."""
        return self._statistics()


class Room:
    """Holds nats-py's delivery task while a ``block`` subscription's queue is full.

    nats-py then keeps what arrives in its own buffer (up to its pending
    limits), and the server is not slowed: core NATS has no flow control.
    """

    def __init__(self, loop: trio_asyncio.TrioEventLoop) -> None:
        self._loop = loop
        self._waiter: Any = None  # an asyncio future, while a delivery waits

    def taken(self) -> None:
        """The reader took messages (trio side): wake the waiting delivery."""
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def publish(self, hub: Hub[BusMessage], topic: str, message: BusMessage) -> None:
        """Queue ``message`` once there is room (asyncio side)."""
        while True:
            self._waiter = self._loop.create_future()
            await self._waiter
            try:
                hub.publish_nowait(topic, message)
            except trio.WouldBlock:
                continue
            except trio.ClosedResourceError:
                pass
            return


class Subscriptions:
    """The live subscriptions of one NATS bus, and how each is opened and ended."""

    def __init__(self, link: Link) -> None:
        self._link = link
        # Set once a JetStream bus is bound to its stream.
        self.stream: Stream | None = None
        self._hubs: dict[Hub[BusMessage], NatsSubscription] = {}

    def statistics(self) -> tuple[SubscriptionStatistics, ...]:
        """One snapshot per live subscription."""
        return tuple(s.statistics() for s in self._hubs.values())

    def close(self) -> None:
        """End every subscription: each drains its queue, then its iteration ends."""
        for hub in list(self._hubs):
            hub.close()

    @asynccontextmanager
    async def core(
        self, pattern: str, maxsize: int, overflow: HubOverflow, queue: str | None
    ) -> AsyncIterator[NatsSubscription]:
        """A core NATS subscription, its arguments checked (see ``NatsBus.subscribe``)."""
        async with self._local_queue(pattern, maxsize, overflow) as (hub, subscription):
            room = Room(self._link.loop)
            subscription._on_take = room.taken
            nats_sub = await self._link.aio(self._link.client.subscribe)(
                pattern, queue=queue or "", cb=self._core_deliverer(hub, room)
            )
            try:
                yield subscription
            finally:
                room.taken()  # a delivery waiting for room finds the queue gone
                if not self._link.closed:
                    with trio.CancelScope(shield=True), trio.move_on_after(_UNSUBSCRIBE_GRACE):
                        await self._link.aio(nats_sub.unsubscribe)()

    def _core_deliverer(self, hub: Hub[BusMessage], room: Room) -> Callable[[Msg], Awaitable[None]]:
        tally = self._link.tally

        async def deliver(msg: Msg) -> None:  # runs in the asyncio loop, one message at a time
            message = to_bus_message(msg, _no_ack)
            tally.received += 1
            try:
                hub.publish_nowait(msg.subject, message)
            except trio.WouldBlock:  # "block", and the queue is full: hold nats-py back
                await room.publish(hub, msg.subject, message)
            except trio.ClosedResourceError:
                pass  # the bus closed while the message was on its way

        return deliver

    @asynccontextmanager
    async def stored(
        self, pattern: str, maxsize: int, queue: str | None
    ) -> AsyncIterator[NatsSubscription]:
        """A JetStream subscription: a durable pull consumer, bound or created.

        Raises:
            trio.ClosedResourceError: the bus is closed.
            trio.BrokenResourceError: the server refused the consumer.
        """
        assert self.stream is not None  # only called on a JetStream bus
        js = self.stream.js
        stream = self._link.settings.stream
        assert stream is not None  # so is this
        self._link.check_open()
        durable = queue or durable_name(self._link.settings.name, pattern)
        config = consumer_config(durable, pattern, self._link.settings.ack_wait)
        try:
            bound = await ensure_consumer(self._link.aio, js, stream, config)
        except nats.errors.Error as exc:
            raise trio.BrokenResourceError(
                f"cannot create or bind consumer {durable!r} of {pattern!r} on stream "
                f"{stream!r}: {describe_error(exc)}"
            ) from exc
        if bound != pattern:
            raise trio.BrokenResourceError(
                f"durable consumer {durable!r} on stream {stream!r} takes {bound!r}, "
                f"not {pattern!r}: name another queue"
            )
        async with (
            self._local_queue(pattern, maxsize, HubOverflow.BLOCK) as (hub, subscription),
            trio.open_nursery() as nursery,
        ):
            inbox = self._link.client.new_inbox()
            puller = Puller(
                outbox=self._link.outbox,
                hub=hub,
                room=lambda: maxsize - subscription.statistics().depth,
                next_subject=f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{durable}",
                inbox=inbox,
                make_ack=self._acker,
                on_message=self._count_fetched,
                loop=self._link.loop,
                batch=self._link.settings.fetch_batch,
                fetch_wait=self._link.settings.fetch_wait,
            )
            subscription._on_take = puller.taken
            deliveries = await self._link.aio(self._link.client.subscribe)(inbox, cb=puller.deliver)
            nursery.start_soon(puller.run, name=f"nats pull {pattern}")
            try:
                yield subscription
            finally:
                nursery.cancel_scope.cancel()
                if not self._link.closed:
                    with trio.CancelScope(shield=True), trio.move_on_after(_UNSUBSCRIBE_GRACE):
                        await self._link.aio(deliveries.unsubscribe)()

    @asynccontextmanager
    async def _local_queue(
        self, pattern: str, maxsize: int, overflow: HubOverflow
    ) -> AsyncIterator[tuple[Hub[BusMessage], NatsSubscription]]:
        self._link.check_open()
        # One private hub per subscription: its queue, policies and counters,
        # without routing one NATS message to a second subscription.
        hub: Hub[BusMessage] = Hub(name=self._link.settings.name)
        async with hub.subscribe(pattern, maxsize=maxsize, overflow=overflow) as inner:
            subscription = NatsSubscription(inner)
            self._hubs[hub] = subscription
            try:
                yield hub, subscription
            finally:
                final = self._hubs.pop(hub).statistics()
                self._link.tally.dropped += final.dropped + final.lost

    def _count_fetched(self, redelivered: bool) -> None:
        tally = self._link.tally
        tally.received += 1
        if redelivered:
            tally.redelivered += 1

    def _acker(self, msg: Msg) -> Callable[[], Awaitable[None]]:
        link = self._link
        acked = False

        async def ack() -> None:
            nonlocal acked
            await trio.lowlevel.checkpoint_if_cancelled()
            if acked or link.closed:
                return  # once is enough; after close the server redelivers it
            while link.outbox.full():
                await link.outbox.wait_for_room()
                link.pacer.reset()
            acked = True
            link.outbox.put(msg)
            link.tally.acked += 1
            await link.pacer.pace()

        return ack


async def _no_ack() -> None:
    return None
