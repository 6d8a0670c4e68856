"""JetStream pieces of the NATS bus: the stream, the durable pull consumers, pulling."""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import nats.errors
import nats.js.errors
import trio
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    Header,
    StorageType,
    StreamConfig,
)

from .._hub import Hub
from ._base import BusMessage
from ._nats_outbox import Outbox

MSG_ID_HEADER = "Nats-Msg-Id"

# The errors a JetStream call can meet while the server is away or restarting:
# worth retrying once the connection is back.
TRANSIENT_ERRORS: tuple[type[Exception], ...] = (
    TimeoutError,  # nats.errors.TimeoutError and asyncio's
    nats.errors.NoRespondersError,
    nats.errors.ConnectionReconnectingError,
    nats.errors.OutboundBufferLimitError,
    nats.errors.StaleConnectionError,
    nats.js.errors.ServiceUnavailableError,
    nats.js.errors.NoStreamResponseError,  # no responders: the stream is not back yet
)

Aio = Callable[[Callable[..., Awaitable[Any]]], Callable[..., Awaitable[Any]]]


async def ensure_stream(
    aio: Aio, js: JetStreamContext, name: str, subjects: Sequence[str], duplicate_window: float
) -> tuple[str, ...]:
    """Bind to stream ``name`` or create it; return the subjects it captures.

    An existing stream is used as it is (its subjects, window and storage).
    """
    try:
        info = await aio(js.stream_info)(name)
    except nats.js.errors.NotFoundError:
        config = StreamConfig(
            name=name,
            subjects=list(subjects),
            storage=StorageType.FILE,
            duplicate_window=duplicate_window,
        )
        info = await aio(js.add_stream)(config)
    return tuple(info.config.subjects or ())


def pattern_within(pattern: tuple[str, ...], subject: tuple[str, ...]) -> bool:
    """Whether every topic ``pattern`` matches is also matched by ``subject`` (both split)."""
    for index, token in enumerate(subject):
        if token == ">":
            return len(pattern) > index
        if index >= len(pattern) or pattern[index] == ">":
            return False
        if token != "*" and pattern[index] != token:
            return False
    return len(pattern) == len(subject)


def durable_name(bus: str, pattern: str) -> str:
    """The default durable consumer of a bus name and a pattern (NATS forbids ``.*>``)."""
    # Both in the digest: two buses whose names share their first 60
    # characters must not share (and split) one consumer.
    digest = hashlib.blake2s(f"{bus}\0{pattern}".encode(), digest_size=6).hexdigest()
    readable = "".join(c if c.isalnum() or c in "-_" else "_" for c in f"{bus}_{pattern}")
    return f"{readable[:60]}_{digest}"


async def ensure_consumer(
    aio: Aio, js: JetStreamContext, stream: str, config: ConsumerConfig
) -> str | None:
    """Bind to the durable consumer ``config`` names, or create it.

    Returns:
        The subject filter of the consumer bound to (an existing one keeps its own).
    """
    assert config.durable_name is not None  # consumer_config names it
    try:
        info = await aio(js.consumer_info)(stream, config.durable_name)
    except nats.js.errors.NotFoundError:
        info = await aio(js.add_consumer)(stream, config)
    return info.config.filter_subject  # type: ignore[no-any-return]  # nats-py: ConsumerInfo


def consumer_config(durable: str, pattern: str, ack_wait: float) -> ConsumerConfig:
    """An explicit-ack durable pull consumer of ``pattern``, from the start of the stream."""
    return ConsumerConfig(
        durable_name=durable,
        filter_subject=pattern,
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=ack_wait,
        deliver_policy=DeliverPolicy.ALL,
    )


def to_bus_message(msg: Msg, ack: Callable[[], Awaitable[None]]) -> BusMessage:
    """A received nats-py message as a :class:`BusMessage`, with its id and ack."""
    headers = msg.headers
    msg_id = headers.get(MSG_ID_HEADER) if headers else None
    return BusMessage(msg.subject, msg.data, msg_id, ack=ack)


async def publish_quietly(hub: Hub[BusMessage], topic: str, message: BusMessage) -> None:
    """Queue ``message``, waiting for room; nothing if the subscription ended meanwhile."""
    with contextlib.suppress(trio.ClosedResourceError):
        await hub.publish(topic, message)


class Puller:
    """Pulls batches from one durable consumer into one subscription's queue.

    One pull request at a time, each for no more than the queue has room
    for, so nothing is dropped before it is acked: the backlog stays on the
    server, in the stream. Messages arrive on a plain subscription of the
    puller's inbox (:meth:`deliver`), in bursts, without an asyncio future
    per message.

    Args:
        outbox: the bus's outbox to nats-py.
        hub: the subscription's private hub (one subscriber, ``block``).
        room: how many more messages the queue holds now.
        next_subject: the consumer's ``$JS.API.CONSUMER.MSG.NEXT`` subject.
        inbox: where the server delivers (the inbox subscription's subject).
        make_ack: builds the ack of one message.
        on_message: called per message, with whether it is a redelivery.
        loop: the bus's asyncio loop.
        batch: the most messages to ask for at once.
        fetch_wait: how long one pull request lingers on the server.
    """

    def __init__(
        self,
        *,
        outbox: Outbox,
        hub: Hub[BusMessage],
        room: Callable[[], int],
        next_subject: str,
        inbox: str,
        make_ack: Callable[[Msg], Callable[[], Awaitable[None]]],
        on_message: Callable[[bool], None],
        loop: Any,
        batch: int,
        fetch_wait: float,
    ) -> None:
        self._outbox = outbox
        self._hub = hub
        self._room = room
        self._next_subject = next_subject
        self._inbox = inbox
        self._make_ack = make_ack
        self._on_message = on_message
        self._loop = loop
        self._batch = batch
        self._fetch_wait = fetch_wait
        self._outstanding = 0
        self._ended = trio.Event()
        self._taken = trio.Event()

    def taken(self) -> None:
        """The subscriber took messages from the queue: there may be room for more."""
        self._taken.set()

    async def run(self) -> None:
        """Send pull requests as room allows, until cancelled (a trio task)."""
        expires = int(self._fetch_wait * 1e9)
        while True:
            if self._room() <= 0:
                self._taken = trio.Event()
                if self._room() <= 0:
                    await self._taken.wait()
                continue
            want = min(self._batch, self._room())
            self._outstanding = want
            self._ended = trio.Event()
            while self._outbox.full():
                await self._outbox.wait_for_room()
            request = json.dumps({"batch": want, "expires": expires}).encode()
            self._outbox.put((self._next_subject, request, None, self._inbox))
            # The server ends a request when it is filled or expires; one lost
            # with a restarted server ends here, a little after it would have.
            with trio.move_on_after(self._fetch_wait * 1.5):
                await self._ended.wait()

    async def deliver(self, msg: Msg) -> None:
        """The inbox subscription's callback (asyncio side)."""
        headers = msg.headers
        if headers and Header.STATUS in headers and not msg.data:
            if headers[Header.STATUS] != "100":  # 404, 408, 409: the request is over
                self._ended.set()
            return  # 100: an idle heartbeat
        self._outstanding -= 1
        self._on_message(msg.metadata.num_delivered > 1)
        message = to_bus_message(msg, self._make_ack(msg))
        try:
            self._hub.publish_nowait(msg.subject, message)
        except trio.WouldBlock:  # a request given up on answered after all
            await self._loop.trio_as_future(publish_quietly, self._hub, msg.subject, message)
        except trio.ClosedResourceError:
            pass  # unacked: the server redelivers it after ack_wait
        if self._outstanding <= 0:
            self._ended.set()
