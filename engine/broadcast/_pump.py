"""From the bus to the clients' queues: the intake tasks and the dispatcher.

One intake task per bus subscription forwards what it reads into the
server's inbox; one dispatcher takes the inbox in batches and hands each
batch to the fanout, which frames every message once and offers the frame
to each client that wants it. :class:`Drain` is how the server's ``close()``
stops the intakes: they hand on what their subscriptions already hold, then
end.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Protocol, runtime_checkable

import trio

from .._channels import ReceiveChannel, SendChannel
from ..bus import BusMessage, Subscription
from ._client import Client
from ._fanout import Fanout

INBOX_SIZE = 4096
"""Bus messages between the bus subscriptions and the dispatcher (which never waits)."""
MAX_DISPATCH = 1024
"""Bus messages framed and handed to the clients in one go at most."""
LINGER = 0.0005
"""Seconds a dispatch may wait for more messages while they keep arriving."""


class Drain:
    """Whether the intakes should stop reading the bus, and their waits to cancel."""

    def __init__(self) -> None:
        self.draining = False
        self.waits: set[trio.CancelScope] = set()

    def start(self) -> None:
        """Stop every intake's wait: each hands on what its subscription holds, then ends."""
        self.draining = True
        for scope in self.waits:
            scope.cancel()


async def _forward_all(inbox: SendChannel[BusMessage], batch: list[BusMessage]) -> None:
    try:
        inbox.send_batch_nowait(batch)  # all of them in one call when they fit
    except trio.WouldBlock:
        pass
    else:
        return
    for message in batch:
        try:
            inbox.send_nowait(message)  # no coroutine per message
        except trio.WouldBlock:
            await inbox.send(message)


@runtime_checkable
class _Batched(Protocol):
    def receive_batch(self, max_items: int) -> Awaitable[list[BusMessage]]: ...


def _batch_receiver(subscription: Subscription) -> Callable[[], Awaitable[list[BusMessage]]]:
    """A call that waits for the next messages of ``subscription``, in batches when it can."""
    if isinstance(subscription, _Batched):
        batched = subscription

        async def receive_batch() -> list[BusMessage]:
            return await batched.receive_batch(INBOX_SIZE)

        return receive_batch
    iterator = aiter(subscription)

    async def receive_one() -> list[BusMessage]:
        return [await anext(iterator)]

    return receive_one


async def intake(
    subscription: Subscription, inbox: SendChannel[BusMessage], drain: Drain, drain_limit: int
) -> None:
    """Forward the subscription's messages until it ends or ``drain`` starts.

    Draining, it hands on what the subscription already holds, at most
    ``drain_limit`` messages: on a bus others still publish to (a relay),
    the queue refills as it is read, and the drain must end.
    """
    async with inbox:
        receive = _batch_receiver(subscription)
        while not drain.draining:
            with trio.CancelScope() as wait:
                drain.waits.add(wait)
                try:
                    batch = await receive()
                except (trio.EndOfChannel, StopAsyncIteration):
                    return
                finally:
                    drain.waits.discard(wait)
            if wait.cancelled_caught:
                break  # drain started: nothing was taken by the cancelled wait
            await _forward_all(inbox, batch)
        take_nowait = getattr(subscription, "receive_batch_nowait", None)
        left = drain_limit
        while take_nowait is not None and left > 0:
            try:
                batch = take_nowait(min(INBOX_SIZE, left))
            except (trio.WouldBlock, trio.EndOfChannel):
                return
            left -= len(batch)
            await _forward_all(inbox, batch)


async def dispatch(inbox: ReceiveChannel[BusMessage], fanout: Fanout[Client], limit: int) -> None:
    """Hand the inbox's messages to ``fanout`` in batches of at most ``limit``, until it ends.

    Each message is acked once handed on: delivery to the clients is at most once.
    """
    while True:
        try:
            batch = await inbox.receive_batch(limit)
        except trio.EndOfChannel:
            return
        if len(batch) < limit:
            await _linger(inbox, batch, limit)
        fanout.dispatch(batch)
        for message in batch:
            await message.ack()


async def _linger(inbox: ReceiveChannel[BusMessage], batch: list[BusMessage], limit: int) -> None:
    """Add to ``batch`` the messages that arrive while they keep arriving.

    A publisher that yields after every message would otherwise wake every
    client's writer, and cost a socket write per client, once per message.
    Each round here lets the producers run once (microseconds); it stops
    after two rounds that bring nothing, at ``MAX_DISPATCH`` messages, or
    after ``LINGER`` seconds, so a lone message is delayed by two rounds.
    """
    give_up = trio.current_time() + LINGER
    empty = 0
    while empty < 2 and len(batch) < limit and trio.current_time() < give_up:
        await trio.lowlevel.checkpoint()
        try:
            batch += inbox.receive_batch_nowait(limit - len(batch))
        except trio.WouldBlock:
            empty += 1
        except trio.EndOfChannel:  # the bus closed: hand out what we have
            return
        else:
            empty = 0
