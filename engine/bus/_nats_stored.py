"""JetStream publishing: each message is sent until the stream acknowledges it.

A publish is a core publish with a reply subject under the bus's own inbox;
the stream's answer comes back on the bus's one reply subscription, which
settles the :class:`StoredPublish` waiting for it (no asyncio future per
message). Without an answer within ``retry_after`` the message is sent again
with the same ``Nats-Msg-Id``, so the server stores it once however often it
is sent.

With ``max_unconfirmed == 0`` the publishing task waits for each answer.
Otherwise up to that many publishes are in flight, and a confirming task
(in the bus's nursery) waits for their answers in order and sends again
what got none: publishing is then pipelined, as with nats-py's
``publish_async``, and a message sent again may be stored after later ones.
"""

from __future__ import annotations

import collections
import itertools
import json
from collections.abc import Awaitable, Callable

import nats.errors
import nats.js.errors
import trio
from nats.aio.msg import Msg
from nats.js.api import Header, PubAck

from .._names import describe_error
from ._nats_jetstream import TRANSIENT_ERRORS
from ._nats_outbox import Outbox, Pacer


class StoredPublish:
    """A JetStream publish on its way; the publishing task waits for :attr:`done`.

    Attributes:
        subject: where it is published.
        data: the payload.
        headers: its headers, ``Nats-Msg-Id`` among them.
        done: set once the stream answered.
        ack: the stream's answer, once stored.
        error: why it was refused, if it was.
        sent_at: ``trio.current_time()`` when it was queued.
        reply: the reply subject it was sent with.
    """

    __slots__ = ("ack", "data", "done", "error", "headers", "reply", "sent_at", "subject")

    def __init__(self, subject: str, data: bytes, headers: dict[str, str]) -> None:
        self.subject = subject
        self.data = data
        self.headers = headers
        self.done = trio.Event()
        self.ack: PubAck | None = None
        self.error: BaseException | None = None
        self.sent_at = 0.0
        self.reply = ""

    def again(self) -> StoredPublish:
        """A fresh copy to send again (same subject, data and msg_id)."""
        return StoredPublish(self.subject, self.data, self.headers)


class Replies:
    """The stream's answers to publishes, matched to them by the reply subject's last token.

    Args:
        prefix: a fresh inbox of the client; replies go to ``<prefix>.<token>``.
    """

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self._waiting: dict[str, StoredPublish] = {}
        self._tokens = itertools.count()

    def expect(self, item: StoredPublish) -> str:
        """Register ``item``; return the reply subject to publish it with."""
        token = str(next(self._tokens))
        self._waiting[token] = item
        return f"{self.prefix}.{token}"

    def forget(self, reply: str) -> None:
        """Stop waiting for the answer to ``reply`` (it is sent again, or abandoned)."""
        self._waiting.pop(reply.rpartition(".")[2], None)

    async def on_reply(self, msg: Msg) -> None:
        """The reply subscription's callback (asyncio side)."""
        item = self._waiting.pop(msg.subject.rpartition(".")[2], None)
        if item is None:
            return  # answered after its publisher gave up on it
        headers = msg.headers
        if headers and headers.get(Header.STATUS) == "503":
            item.error = nats.errors.NoRespondersError()
        else:
            try:
                answer = json.loads(msg.data)
                if "error" in answer:
                    item.error = nats.js.errors.APIError.from_error(answer["error"])
                else:
                    item.ack = PubAck.from_response(answer)
            except (ValueError, TypeError, KeyError) as exc:
                item.error = exc
        item.done.set()


class StreamPublisher:
    """Sends JetStream publishes until stored, one at a time or pipelined.

    Args:
        outbox: the bus's outbox to nats-py.
        stream: the stream's name, for messages.
        retry_after: seconds without an answer before sending again.
        max_unconfirmed: publishes in flight at once; 0 waits for each.
        wait_connected: returns once connected; raises ``trio.ClosedResourceError``
            if the bus closes first.
        on_stored: called with each acknowledgement.
        on_retry: called each time a publish is sent again.
        pacer: the bus's pacer (pipelined publishes yield through it).
        replies: where the stream's answers arrive.
    """

    def __init__(
        self,
        *,
        outbox: Outbox,
        stream: str,
        retry_after: float,
        max_unconfirmed: int,
        wait_connected: Callable[[], Awaitable[None]],
        on_stored: Callable[[PubAck], None],
        on_retry: Callable[[], None],
        pacer: Pacer,
        replies: Replies,
    ) -> None:
        self._replies = replies
        self._outbox = outbox
        self._stream = stream
        self._retry_after = retry_after
        self._max_unconfirmed = max_unconfirmed
        self._wait_connected = wait_connected
        self._on_stored = on_stored
        self._on_retry = on_retry
        self._pacer = pacer
        self._window: collections.deque[StoredPublish] = collections.deque()
        self._room = trio.Event()
        self._arrived = trio.Event()
        self._closing = False
        self._confirmed_all = trio.Event()
        if not max_unconfirmed:
            self._confirmed_all.set()
        self.unsent = 0

    @property
    def unconfirmed(self) -> int:
        """Publishes sent and not yet acknowledged (pipelined mode)."""
        return len(self._window)

    async def publish(self, topic: str, data: bytes, headers: dict[str, str]) -> None:
        """Send one message; wait for its acknowledgement unless pipelined.

        Raises:
            trio.ClosedResourceError: the bus closed first.
            trio.BrokenResourceError: the stream refused the message.
        """
        item = StoredPublish(topic, data, headers)
        if not self._max_unconfirmed:
            await self._put(item)
            self._on_stored(await self._confirm(item))
            return
        while len(self._window) >= self._max_unconfirmed:
            if self._room.is_set():
                self._room = trio.Event()
            await self._room.wait()
            self._pacer.reset()
        if self._closing:
            raise trio.ClosedResourceError("the bus is closed")
        # Sent first, then in the window: run() times each item's answer from
        # when it was sent, so an item waiting for room must not be in it.
        await self._put(item)
        self._window.append(item)
        self._arrived.set()
        await self._pacer.pace()

    async def run(self) -> None:
        """Confirm pipelined publishes in order until :meth:`close` (a task of the bus)."""
        window = self._window
        try:
            while True:
                if not window:
                    if self._closing:
                        return
                    self._arrived = trio.Event()
                    await self._arrived.wait()
                    continue
                try:
                    ack = await self._confirm(window[0])
                except trio.ClosedResourceError:
                    self.unsent += len(window)
                    window.clear()
                    return
                window.popleft()
                self._room.set()
                self._on_stored(ack)
        finally:
            self._room.set()  # a publisher waiting for room hears of the close
            self._confirmed_all.set()

    def close(self) -> None:
        """Take no more publishes; :meth:`run` confirms those in flight and ends."""
        self._closing = True
        self._arrived.set()

    async def wait_confirmed(self) -> None:
        """Wait until :meth:`run` ended (after :meth:`close`)."""
        await self._confirmed_all.wait()

    async def _put(self, item: StoredPublish) -> None:
        while self._outbox.full():
            await self._outbox.wait_for_room()
        item.sent_at = trio.current_time()
        item.reply = self._replies.expect(item)
        self._outbox.put((item.subject, item.data, item.headers, item.reply))

    async def _confirm(self, item: StoredPublish) -> PubAck:
        while True:
            if not item.done.is_set():
                try:
                    # From when it was sent: after an outage, every publish in
                    # flight then is overdue at once, not one retry_after apiece.
                    with trio.move_on_at(item.sent_at + self._retry_after):
                        await item.done.wait()
                finally:
                    if not item.done.is_set():
                        self._replies.forget(item.reply)
            if item.ack is not None:
                return item.ack
            error = item.error
            if error is None or isinstance(error, TRANSIENT_ERRORS):
                self._on_retry()  # the same msg_id: stored at most once
                await self._wait_connected()
                item = item.again()
                await self._put(item)
            elif isinstance(error, nats.errors.ConnectionClosedError):
                raise trio.ClosedResourceError("the bus closed before the stream answered")
            else:
                raise trio.BrokenResourceError(
                    f"stream {self._stream!r} refused a publish on {item.subject!r}: "
                    f"{describe_error(error)}"
                ) from error
