"""In-process publish/subscribe by topic, where a slow subscriber only hurts itself.

Every subscription has its own bounded queue and its own overflow policy.
Publishing hands one shared ``(topic, message)`` tuple to each matching
subscription without waiting, unless a subscription asked for ``block``;
so one slow WebSocket client never delays the feed or the other clients.

Topics are dot-separated tokens (``trades.BTCUSDT``). A subscription pattern
may use ``*`` for exactly one token and a final ``>`` for one or more tokens,
as NATS subjects do, so the bus adapters map onto it one to one.
"""

from __future__ import annotations

import contextlib
import enum
from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Generic, Literal, TypeVar

import attrs
import trio

from ._asyncwith import async_with_only
from ._channels import Overflow, ReceiveChannel, SendChannel, open_channel
from ._counters import counter_metric, metric_source
from ._exceptions import SubscriberDisconnected
from ._validation import check_choice, check_count, check_name

T = TypeVar("T")

# Distinct topics whose routes are remembered; past this the memo starts over,
# so a stream of one-off topics cannot grow it without bound.
_ROUTE_CACHE_SIZE = 10_000


class HubOverflow(enum.StrEnum):
    """What a subscription does when its queue is full."""

    DROP_OLDEST = "drop_oldest"
    """Discard its oldest queued message (count it); keep up with the newest."""
    DROP_NEWEST = "drop_newest"
    """Discard the new message (count it); keep the backlog in order."""
    DISCONNECT = "disconnect"
    """Stop receiving: deliver what is queued, then raise ``SubscriberDisconnected``."""
    BLOCK = "block"
    """Make every publisher wait for room: lossless, and slows the whole hub."""


# The enum's values again as a Literal (a type checker cannot derive one from
# the other; tests/test_quality.py holds the two equal). Every option enum is
# declared with this shape.
HubOverflowName = Literal["drop_oldest", "drop_newest", "disconnect", "block"]
"""The values of :class:`HubOverflow`, as the strings ``Hub.subscribe`` also accepts."""


@attrs.frozen
class SubscriptionStatistics:
    """A snapshot of one subscription.

    At every moment ``offered == delivered + dropped + lost + depth``.

    Attributes:
        patterns: the topic patterns it receives.
        maxsize: its queue's bound.
        overflow: its policy.
        offered: messages published to a matching topic while it was subscribed.
        delivered: messages it received.
        dropped: messages its ``drop_*`` policy discarded.
        lost: messages it missed after it was disconnected.
        depth: messages queued now.
        peak_depth: the highest depth seen.
        disconnected: whether the ``disconnect`` policy cut it off.
    """

    patterns: tuple[str, ...]
    maxsize: int
    overflow: str
    offered: int
    delivered: int
    dropped: int
    lost: int
    depth: int
    peak_depth: int
    disconnected: bool


@metric_source(label="hub")
@attrs.frozen
class HubStatistics:
    """A snapshot of a hub and all its subscriptions.

    Attributes:
        name: the hub's name.
        published: messages published, whether or not anyone received them.
        subscriptions: one snapshot per live subscription.
    """

    name: str
    published: int = attrs.field(metadata=counter_metric("Messages published"))
    subscriptions: tuple[SubscriptionStatistics, ...]


def _split(text: str, what: str, *, wildcards: bool) -> tuple[str, ...]:
    if not isinstance(text, str) or not text:
        raise ValueError(f"{what} must be a non-empty string, got {text!r}")
    tokens = tuple(text.split("."))
    for index, token in enumerate(tokens):
        if not token:
            raise ValueError(f"{what} {text!r} has an empty token")
        if token in ("*", ">") and wildcards:
            if token == ">" and index != len(tokens) - 1:
                raise ValueError(f"{what} {text!r}: '>' may only be the last token")
        elif "*" in token or ">" in token:
            kind = "wildcards must be whole tokens" if wildcards else "no wildcards allowed"
            raise ValueError(f"{what} {text!r}: {kind}")
    return tokens


def tokens_match(pattern: tuple[str, ...], topic: tuple[str, ...]) -> bool:
    """Whether ``topic`` matches ``pattern``, both split at dots.

    ``*`` matches exactly one token; a final ``>`` matches one or more, as in
    NATS subjects. Split once, match many times: this is the hot path of
    every router built on topics (the hub, the market broadcast).
    """
    for index, token in enumerate(pattern):
        if token == ">":
            return len(topic) > index
        if index >= len(topic) or (token != "*" and token != topic[index]):
            return False
    return len(topic) == len(pattern)


class Subscription(Generic[T]):
    """What :meth:`Hub.subscribe` yields: an async iterator of ``(topic, message)``.

    Iteration ends when the hub closes and the queue is drained; with the
    ``disconnect`` policy it ends with :class:`SubscriberDisconnected`.
    """

    def __init__(
        self, hub: Hub[T], patterns: tuple[str, ...], maxsize: int, overflow: HubOverflow
    ) -> None:
        self._hub = hub
        self._patterns = patterns
        self._overflow = overflow
        # "disconnect" detects a full queue itself, on a channel that would block.
        blocks = overflow in (HubOverflow.BLOCK, HubOverflow.DISCONNECT)
        policy = Overflow.BLOCK if blocks else Overflow(overflow.value)
        self._send: SendChannel[tuple[str, T]]
        self._receive: ReceiveChannel[tuple[str, T]]
        self._send, self._receive = open_channel(maxsize, overflow=policy)
        self._blocking = overflow is HubOverflow.BLOCK
        self._disconnected = False
        self._lost = 0

    @property
    def patterns(self) -> tuple[str, ...]:
        """The topic patterns this subscription receives."""
        return self._patterns

    def statistics(self) -> SubscriptionStatistics:
        """A frozen snapshot of this subscription's counters."""
        channel = self._send.statistics()
        return SubscriptionStatistics(
            patterns=self._patterns,
            maxsize=channel.maxsize,
            overflow=str(self._overflow),
            offered=channel.sent + self._lost,
            delivered=channel.delivered,
            dropped=channel.dropped,
            lost=self._lost,
            depth=channel.depth,
            peak_depth=channel.peak_depth,
            disconnected=self._disconnected,
        )

    async def receive(self) -> tuple[str, T]:
        """The next ``(topic, message)``, waiting for one if need be.

        Raises:
            trio.EndOfChannel: the hub closed and the queue is drained.
            SubscriberDisconnected: the ``disconnect`` policy cut it off and
                the queue is drained; it says how many messages were lost.
        """
        try:
            return await self._receive.receive()
        except trio.EndOfChannel:
            self._raise_if_disconnected()
            raise

    async def receive_batch(self, max_items: int) -> list[tuple[str, T]]:
        """Every queued ``(topic, message)``, up to ``max_items``; waits for at least one.

        Raises: as :meth:`receive`, and ``ValueError`` for ``max_items < 1``.
        """
        try:
            return await self._receive.receive_batch(max_items)
        except trio.EndOfChannel:
            self._raise_if_disconnected()
            raise

    def receive_batch_nowait(self, max_items: int) -> list[tuple[str, T]]:
        """Every queued ``(topic, message)``, up to ``max_items``, without waiting.

        Raises:
            trio.WouldBlock: nothing is queued.
            trio.EndOfChannel, SubscriberDisconnected: as :meth:`receive`.
            ValueError: ``max_items < 1``.
        """
        try:
            return self._receive.receive_batch_nowait(max_items)
        except trio.EndOfChannel:
            self._raise_if_disconnected()
            raise

    def __aiter__(self) -> AsyncIterator[tuple[str, T]]:
        return self

    async def __anext__(self) -> tuple[str, T]:
        try:
            return await self.receive()
        except trio.EndOfChannel:
            raise StopAsyncIteration from None

    def _raise_if_disconnected(self) -> None:
        if self._disconnected:
            self._hub._unroute(self)  # the count below is final
            raise SubscriberDisconnected(
                self._patterns, self._send.statistics().maxsize, self._lost
            )

    def _offer_nowait(self, item: tuple[str, T]) -> None:
        if self._disconnected:
            self._lost += 1
            return
        try:
            self._send.send_nowait(item)
        except trio.WouldBlock:  # only "disconnect" gets here: the others drop or block
            self._disconnected = True
            self._lost = 1
            self._send.close()  # the receiver drains what is queued, then hears why
        except trio.BrokenResourceError:
            pass  # the subscriber left while the message was on its way

    def _offer_batch_nowait(self, items: list[tuple[str, T]]) -> None:
        """``_offer_nowait`` for each item, in one call where the policy allows.

        A ``block`` subscription must have room for all of them (the hub checks).
        """
        if self._overflow is HubOverflow.DISCONNECT or self._disconnected:
            for item in items:  # "disconnect" must see the item that found it full
                self._offer_nowait(item)
            return
        with contextlib.suppress(trio.BrokenResourceError):  # the subscriber left meanwhile
            self._send.send_batch_nowait(items)

    def _room(self) -> int:
        # What send_batch_nowait takes at once: the buffer's room, the parked receivers'.
        state = self._send._state
        room = state.maxsize - len(state.buffer)
        return room + sum(max_items or 1 for max_items in state.receive_waiters.values())

    def _full(self) -> bool:
        # Called per subscription per publish_nowait: read the state, build no snapshot.
        state = self._send._state
        return len(state.buffer) >= state.maxsize

    def _close(self) -> None:
        self._send.close()
        self._receive.close()


def _valid_name(instance: object, attribute: attrs.Attribute[str], value: str) -> None:
    check_name(attribute.name, value)


# No setattr hooks: ``name`` is checked when the hub is built. With attrs'
# default hooks, its validator would put a Python-level ``__setattr__`` in
# front of every ``_published += 1``, on the hot path of every publish.
@attrs.define(eq=False, on_setattr=attrs.setters.NO_OP)
class Hub(Generic[T]):
    """In-process publish/subscribe by topic, with a bounded queue per subscriber.

    Args:
        name: for statistics and logs.

    Example::

        hub = engine.Hub[Trade]()
        async with hub.subscribe("trades.>", maxsize=1000, overflow="drop_oldest") as sub:
            async for topic, trade in sub:
                ...
        # elsewhere
        await hub.publish("trades.BTCUSDT", trade)
    """

    name: str = attrs.field(default="hub", validator=_valid_name)
    _exact: dict[tuple[str, ...], list[Subscription[T]]] = attrs.field(factory=dict, init=False)
    _wild: list[tuple[tuple[str, ...], Subscription[T]]] = attrs.field(factory=list, init=False)
    _routes: dict[str, tuple[Subscription[T], ...]] = attrs.field(factory=dict, init=False)
    _subscriptions: list[Subscription[T]] = attrs.field(factory=list, init=False)
    _published: int = attrs.field(default=0, init=False)
    _closed: bool = attrs.field(default=False, init=False)

    def subscribe(
        self,
        *patterns: str,
        maxsize: int,
        overflow: HubOverflow | HubOverflowName = "drop_oldest",
    ) -> AbstractAsyncContextManager[Subscription[T]]:
        """Subscribe for the length of an ``async with`` block.

        Args:
            *patterns: one or more topic patterns (``trades.BTCUSDT``,
                ``trades.*``, ``trades.>``); a message matching several is
                received once.
            maxsize: the subscription's queue bound; at least 1.
            overflow: ``"drop_oldest"`` (default), ``"drop_newest"``,
                ``"disconnect"`` or ``"block"``.

        Returns:
            An async context manager yielding the :class:`Subscription`.

        Raises:
            ValueError: at call time, for a bad pattern, bound or policy.
            trio.ClosedResourceError: on entering, if the hub is closed.
        """
        if not patterns:
            raise ValueError("patterns must name at least one topic pattern")
        split = tuple(_split(p, "pattern", wildcards=True) for p in patterns)
        bound = check_count("maxsize", maxsize, minimum=1)
        policy = check_choice("overflow", overflow, HubOverflow)
        return async_with_only(
            self._subscribed(tuple(patterns), split, bound, policy),
            call="hub.subscribe",
            target="sub",
            loop="topic, message",
        )

    @asynccontextmanager
    async def _subscribed(
        self,
        patterns: tuple[str, ...],
        split: tuple[tuple[str, ...], ...],
        maxsize: int,
        overflow: HubOverflow,
    ) -> AsyncIterator[Subscription[T]]:
        if self._closed:
            raise trio.ClosedResourceError(f"hub {self.name!r} is closed")
        subscription = Subscription(self, patterns, maxsize, overflow)
        for tokens in split:
            if "*" in tokens or ">" in tokens:
                self._wild.append((tokens, subscription))
            else:
                self._exact.setdefault(tokens, []).append(subscription)
        self._subscriptions.append(subscription)
        self._routes.clear()
        try:
            yield subscription
        finally:
            self._unroute(subscription)
            subscription._close()
            self._subscriptions.remove(subscription)

    async def publish(self, topic: str, message: T) -> int:
        """Publish ``message`` on ``topic`` to every matching subscription.

        Never waits, except for subscriptions with ``overflow="block"``
        whose queue is full.

        Cancellation:
            If cancelled before it starts, nothing was published. If
            cancelled while waiting for a full ``block`` subscription, every
            other subscription already has the message and that one does not.

        Returns:
            How many subscriptions it was offered to.

        Raises:
            ValueError: ``topic`` is empty, has an empty token or a wildcard.
            trio.ClosedResourceError: the hub is closed.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        routes = self._route(topic)
        item = (topic, message)
        self._published += 1
        blocking: list[Subscription[T]] = []
        for subscription in routes:
            if subscription._blocking:
                blocking.append(subscription)
            else:
                subscription._offer_nowait(item)
        for subscription in blocking:
            # It may unsubscribe, or the hub close, while we wait.
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await subscription._send.send(item)
        if not blocking:
            await trio.lowlevel.cancel_shielded_checkpoint()
        return len(routes)

    def publish_nowait(self, topic: str, message: T) -> int:
        """Publish without waiting; all or nothing.

        Returns:
            How many subscriptions it was offered to.

        Raises:
            trio.WouldBlock: a ``block`` subscription is full; nobody got it.
            ValueError: ``topic`` is empty, has an empty token or a wildcard.
            trio.ClosedResourceError: the hub is closed.
        """
        routes = self._route(topic)
        for subscription in routes:  # a loop, not any(): no generator per publish
            if subscription._blocking and subscription._full():
                raise trio.WouldBlock
        item = (topic, message)
        self._published += 1
        for subscription in routes:
            if subscription._blocking:
                subscription._send.send_nowait(item)
            else:
                subscription._offer_nowait(item)
        return len(routes)

    def _publish_batch_nowait(self, items: Sequence[tuple[str, T]]) -> int:
        """``publish_nowait`` for each ``(topic, message)`` in order, all or nothing.

        Each subscription gets its messages in one channel operation: the
        path of the bus readers, which hand over what one read brought.

        Returns:
            How many offers were made (a message to two subscriptions is two).

        Raises:
            trio.WouldBlock: a ``block`` subscription lacks room for its share; nobody got any.
            ValueError: a topic is empty, has an empty token or a wildcard; nobody got any.
            trio.ClosedResourceError: the hub is closed.
        """
        shares: dict[Subscription[T], list[tuple[str, T]]] = {}
        offered = 0
        for item in items:
            routes = self._route(item[0])
            offered += len(routes)
            for subscription in routes:
                share = shares.get(subscription)
                if share is None:
                    shares[subscription] = [item]
                else:
                    share.append(item)
        for subscription, share in shares.items():
            if subscription._blocking and subscription._room() < len(share):
                raise trio.WouldBlock
        self._published += len(items)
        for subscription, share in shares.items():
            subscription._offer_batch_nowait(share)
        return offered

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` has been called."""
        return self._closed

    def close(self) -> None:
        """Close the hub: publishing fails; subscribers drain their queues, then end."""
        self._closed = True
        for subscription in self._subscriptions:
            subscription._send.close()
        self._exact.clear()
        self._wild.clear()
        self._routes.clear()

    def statistics(self) -> HubStatistics:
        """A frozen snapshot of the hub and its subscriptions."""
        return HubStatistics(
            name=self.name,
            published=self._published,
            subscriptions=tuple(s.statistics() for s in self._subscriptions),
        )

    def _route(self, topic: str) -> tuple[Subscription[T], ...]:
        try:
            return self._routes[topic]
        except (KeyError, TypeError):
            pass
        if self._closed:
            raise trio.ClosedResourceError(f"hub {self.name!r} is closed")
        tokens = _split(topic, "topic", wildcards=False)
        found = dict.fromkeys(self._exact.get(tokens, ()))
        for pattern, subscription in self._wild:
            if tokens_match(pattern, tokens):
                found[subscription] = None
        routes = tuple(found)
        if len(self._routes) >= _ROUTE_CACHE_SIZE:
            self._routes.clear()
        self._routes[topic] = routes
        return routes

    def _unroute(self, subscription: Subscription[T]) -> None:
        for tokens in list(self._exact):
            members = self._exact[tokens]
            if subscription in members:
                members.remove(subscription)
                if not members:
                    del self._exact[tokens]
        self._wild = [(p, s) for p, s in self._wild if s is not subscription]
        self._routes.clear()
