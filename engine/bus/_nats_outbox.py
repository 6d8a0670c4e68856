"""The hand-over from trio tasks to nats-py: a bounded outbox drained by one asyncio task.

Crossing from trio into asyncio costs an asyncio task per call
(``trio_asyncio.aio_as_trio``), and trio-asyncio runs each asyncio callback
in a turn of trio's scheduler of its own: far more than nats-py's core
publish, which only appends to a buffer. So trio tasks append publishes
(core ones, JetStream ones with a reply inbox, pull requests) and acks to
this outbox, and one asyncio task hands them to nats-py in whole batches,
as a plain asyncio program would.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Callable

import nats.errors
import trio
from nats.aio.client import Client
from nats.aio.msg import Msg

logger = logging.getLogger("engine.bus.nats")

# A publish: subject, payload, headers (or None), reply subject (or "").
Publish = tuple[str, bytes, dict[str, str] | None, str]


class Pacer:
    """Yields to the scheduler once per ``every`` calls of :meth:`pace`.

    The outbox's callers check for cancellation on every call, before they
    act, and call :meth:`pace` after: yielding on every call would hand
    nats-py one item per turn of the loop instead of whole batches.
    """

    __slots__ = ("_count", "_every")

    def __init__(self, every: int) -> None:
        self._every = every
        self._count = 0

    def reset(self) -> None:
        """The caller just yielded anyway (it waited for room)."""
        self._count = 0

    async def pace(self) -> None:
        """A schedule point on every ``every``-th call; never raises ``Cancelled``."""
        self._count += 1
        if self._count >= self._every:
            self._count = 0
            await trio.lowlevel.cancel_shielded_checkpoint()


class Outbox:
    """Publishes and acks on their way to nats-py, in order.

    Args:
        client: the nats-py client.
        maxsize: how many items may wait; :meth:`wait_for_room` blocks past it.
        on_unsent: called once per publish nats-py refused (its reconnect
            buffer is full, or the connection closed).
    """

    def __init__(self, client: Client, maxsize: int, on_unsent: Callable[[], None]) -> None:
        self._client = client
        self._maxsize = maxsize
        self._on_unsent = on_unsent
        self._ended = False  # run() has ended: nothing is handed on any more
        self._items: collections.deque[Publish | Msg] = collections.deque()
        self._wakeup: asyncio.Future[None] | None = None
        self._room = trio.Event()
        self._room.set()
        self._drained = trio.Event()
        self._drained.set()

    def full(self) -> bool:
        """Whether :meth:`put` must wait for room first."""
        return len(self._items) >= self._maxsize

    async def wait_for_room(self) -> None:
        """Wait until the drain task took what was queued (trio side).

        Raises:
            trio.ClosedResourceError: the drain task has ended (the bus closed).
        """
        if self._ended:
            raise trio.ClosedResourceError("the nats bus is closed")
        if self._room.is_set():
            self._room = trio.Event()
        await self._room.wait()
        if self._ended:
            raise trio.ClosedResourceError("the nats bus is closed")

    async def wait_drained(self) -> None:
        """Wait until every queued item went to nats-py (trio side)."""
        while self._items:
            if self._drained.is_set():
                self._drained = trio.Event()
            await self._drained.wait()

    def put(self, item: Publish | Msg) -> None:
        """Queue a publish or a message to ack; wake the drain task if it sleeps."""
        self._items.append(item)
        wakeup = self._wakeup
        if wakeup is not None:
            self._wakeup = None
            if not wakeup.done():
                wakeup.set_result(None)

    async def run(self) -> None:
        """Hand every queued item to nats-py, until cancelled (an asyncio task).

        When it ends, whoever waits for room or for the drain is released, and
        the publishes still queued count as unsent.
        """
        try:
            await self._run()
        finally:
            self._ended = True
            for item in self._items:
                if isinstance(item, tuple):
                    self._on_unsent()
            self._items.clear()
            self._room.set()
            self._drained.set()

    async def _run(self) -> None:
        items = self._items
        publish = self._client.publish
        while True:
            while items:
                item = items.popleft()
                try:
                    if isinstance(item, tuple):
                        await publish(item[0], item[1], item[3], item[2])
                    else:
                        await item.ack()
                except (nats.errors.OutboundBufferLimitError, nats.errors.ConnectionClosedError):
                    self._on_unsent()
                except nats.errors.MsgAlreadyAckdError:
                    pass
                except nats.errors.Error as exc:
                    # Checked before queueing; anything else is nats-py's to report.
                    logger.warning("nats: publish failed: %s: %s", type(exc).__name__, exc)
                    self._on_unsent()
            self._room.set()
            self._drained.set()
            self._wakeup = asyncio.get_running_loop().create_future()
            await self._wakeup
