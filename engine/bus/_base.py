"""The Bus seam: what every bus adapter offers, and the message it carries."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from typing import Protocol

import attrs

from .._hub import HubOverflow, HubOverflowName


async def _no_ack() -> None:
    return None


@attrs.frozen
class BusMessage:
    """One message received from a bus.

    Payloads are bytes: a service encodes a message once and every hop, the
    bus and the WebSocket clients alike, passes the same bytes along.

    Attributes:
        topic: the topic it was published on (``trades.BTCUSDT``).
        data: the payload.
        msg_id: the publisher's de-duplication id, when it gave one.
    """

    topic: str
    data: bytes
    msg_id: str | None = None
    _ack: Callable[[], Awaitable[None]] = attrs.field(default=_no_ack, repr=False, alias="ack")

    async def ack(self) -> None:
        """Confirm the message was handled (at-least-once buses redeliver it otherwise).

        A no-op on buses that deliver at most once (memory, Redis pub/sub, core NATS).
        """
        await self._ack()


class Subscription(Protocol):
    """An async iterator of :class:`BusMessage` for one subscription."""

    def __aiter__(self) -> AsyncIterator[BusMessage]: ...


class Bus(Protocol):
    """Publish and subscribe by topic; implemented in memory, on Redis and on NATS.

    Topics are dot-separated tokens; patterns use ``*`` for one token and a
    final ``>`` for the rest, as NATS subjects do. Delivery guarantees are
    the adapter's: memory, Redis pub/sub and core NATS deliver at most once;
    Redis Streams and NATS JetStream at least once (call
    :meth:`BusMessage.ack`; compare ``msg_id``, which JetStream also uses to
    drop a replayed publish).
    """

    async def publish(self, topic: str, data: bytes, *, msg_id: str | None = None) -> None:
        """Publish ``data`` on ``topic``; ``msg_id`` names it for de-duplication."""
        ...

    def subscribe(
        self, pattern: str, *, maxsize: int, overflow: HubOverflow | HubOverflowName = "drop_oldest"
    ) -> AbstractAsyncContextManager[Subscription]:
        """Subscribe for the length of an ``async with`` block, with a bounded queue."""
        ...

    async def aclose(self) -> None:
        """Close the bus: subscriptions end, publishing fails."""
        ...

    def statistics(self) -> object:
        """A frozen snapshot of the bus's counters (an attrs class exports on /metrics)."""
        ...
