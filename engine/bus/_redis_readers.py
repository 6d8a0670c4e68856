"""What runs behind one Redis subscription: a pub/sub reader or a stream consumer.

Both read with redis-py's synchronous client in worker threads, never on
the event loop, and hand what they read to the subscription's own
:class:`engine.Hub`, which filters by topic pattern (the exact ``*`` / ``>``
match) and applies the subscription's overflow policy. A reader that loses
its connection reconnects with the bus's :class:`engine.Backoff` and
subscribes again; the bus counts it and shows ``state="reconnecting"``
meanwhile.
"""

from __future__ import annotations

import collections
import functools
import logging
import math
import os
import re
import socket
import threading
import time
import uuid
from typing import TYPE_CHECKING, Any

import attrs
import redis
import trio

from .._hub import Hub
from .._threads import iterate_in_thread, to_thread
from ._base import BusMessage

if TYPE_CHECKING:
    from ._redis import RedisBus

logger = logging.getLogger("engine.bus.redis")

# Errors after which a reader connects again: the server went away, is
# still loading its data after a restart, or lost the stream's group.
_NOT_OPEN = object()  # a reader with no first connection in hand

CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    redis.ConnectionError,
    redis.TimeoutError,
    OSError,
)

# Errors that leave acks unsent when a subscription ends.
_ACK_ERRORS: tuple[type[BaseException], ...] = (*CONNECTION_ERRORS, redis.ResponseError)

# Seconds a pub/sub thread waits for a message per poll: bounds how long
# closing a subscription waits for its thread.
_POLL_INTERVAL = 0.05
# Milliseconds an XREADGROUP blocks: bounds the latency of batched acks and
# of closing a stream subscription.
_BLOCK_MS = 100
# Seconds a stream's thread waits before reading again after a read that
# brought entries: a busy stream is read in batches, not entry by entry.
_LINGER = 0.002
# Entries per XREADGROUP / XAUTOCLAIM and messages per pub/sub hand-over.
_BATCH = 1000
# Seconds the first PSUBSCRIBE may wait for its confirmation.
_CONFIRM_WAIT = 5.0

_GLOB_SPECIAL = re.compile(r"([\\*?\[\]])")


def glob_escape(text: str) -> str:
    """``text`` with the metacharacters of Redis glob patterns (``\\ * ? [ ]``) escaped."""
    return _GLOB_SPECIAL.sub(r"\\\1", text)


def pattern_glob(prefix: str, tokens: tuple[str, ...]) -> str:
    """The PSUBSCRIBE glob that over-approximates a topic pattern.

    ``*`` and a final ``>`` both become ``*``, which also matches across
    dots; every other character is literal. The subscription's hub then
    keeps exactly the topics that match (``tokens_match``).
    """
    parts = ("*" if token in ("*", ">") else glob_escape(token) for token in tokens)
    return glob_escape(prefix) + ".".join(parts)


class Reader:
    """One subscription's connection to Redis, kept up until cancelled.

    Args:
        bus: the bus it reads for (its client, settings and counters).
        hub: the subscription's hub; the reader publishes into it.
        pattern: the subscription's topic pattern.
        tokens: the pattern split at dots.
    """

    kind = "reader"

    def __init__(self, bus: RedisBus, hub: Hub[BusMessage], pattern: str, tokens: tuple[str, ...]):
        self.bus = bus
        self.hub = hub
        self.pattern = pattern
        self.tokens = tokens
        self.scope = trio.CancelScope()
        self.limiter = trio.CapacityLimiter(1)
        # What open() connected, for run() to read first; _NOT_OPEN once used
        # (a connection may be None: a streams reader's is its consumer group).
        self._first: Any = _NOT_OPEN

    async def open(self) -> None:
        """Make the first connection, before :meth:`run` starts.

        Raises:
            trio.BrokenResourceError: the server cannot be reached.
        """
        try:
            self._first = await self.connect()
        except CONNECTION_ERRORS as exc:
            raise trio.BrokenResourceError(
                f"redis bus {self.bus.name!r}: cannot subscribe to {self.pattern!r} "
                f"at {self.bus.address.display}: {exc}"
            ) from exc

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Read, and reconnect with backoff, until :attr:`scope` is cancelled or the hub closes."""
        bus = self.bus
        rng = bus.backoff.new_random()
        attempt = 0
        task_status.started()
        with self.scope:
            while True:
                try:
                    if self._first is _NOT_OPEN:
                        handle = await self.connect()
                        attempt = 0
                        bus._came_up(self)
                    else:
                        handle, self._first = self._first, _NOT_OPEN
                    await self.read(handle)
                    return
                except CONNECTION_ERRORS as exc:
                    bus._went_down(self)
                    delay = bus.backoff.delay(attempt, rng)
                    attempt += 1
                    logger.warning(
                        "redis bus %r: %s for %r lost its connection to %s (%s); "
                        "reconnecting in %.2f s",
                        bus.name,
                        self.kind,
                        self.pattern,
                        bus.address.display,
                        exc,
                        delay,
                    )
                    await trio.sleep(delay)
                except trio.ClosedResourceError:
                    return  # the subscription's hub closed while we offered to it

    async def connect(self) -> Any:
        """Connect and subscribe; what :meth:`read` needs."""
        raise NotImplementedError

    async def read(self, handle: Any) -> None:
        """Read until the connection fails (raises) or the hub closes (returns)."""
        raise NotImplementedError

    async def finish(self) -> None:
        """Called once the reader has stopped: release what it holds."""
        await trio.lowlevel.checkpoint()

    async def offer(self, topic: str, message: BusMessage) -> int:
        """Hand ``message`` to the hub; how many subscriptions took it (0: no match)."""
        try:
            taken = self.hub.publish_nowait(topic, message)
        except trio.WouldBlock:  # "block" and full: wait for the consumer
            taken = await self.hub.publish(topic, message)
        except ValueError as exc:
            # Not a topic this bus could have published (another client wrote
            # it): never ours, but not silently. Counted as dropped.
            self.bus._tally.dropped += 1
            if self.bus._tally.dropped == 1 or self.bus._tally.dropped % 1000 == 0:
                logger.warning(
                    "redis bus %r: skipped a message with a bad topic %r (%s); %d so far",
                    self.bus.name,
                    topic[:100],
                    exc,
                    self.bus._tally.dropped,
                )
            return 0
        self.bus._tally.received += taken
        return taken


class PubSubReader(Reader):
    """A PSUBSCRIBE on its own connection, drained by a thread in batches."""

    kind = "pub/sub reader"

    async def connect(self) -> Any:
        pubsub = self.bus.client.pubsub()
        glob = pattern_glob(self.bus.prefix, self.tokens)
        try:
            await to_thread(_psubscribe, pubsub, glob, limiter=self.limiter)
        except BaseException:
            pubsub.close()  # closes a socket: does not block
            raise
        return pubsub

    async def read(self, handle: Any) -> None:
        pubsub = handle
        try:
            async with iterate_in_thread(
                poll=functools.partial(_drain, pubsub),
                poll_interval=_POLL_INTERVAL,
                max_batch=16,
                buffer=16,
            ) as reads:
                while True:
                    for replies in await reads.receive_batch():
                        await self._offer_replies(replies)
        finally:
            pubsub.close()

    async def _offer_replies(self, replies: list[Any]) -> None:
        """Hand one read's messages to the hub: at once if it takes them all, else one by one."""
        skip = len(self.bus.prefix)
        items = [
            (reply[2][skip:].decode("utf-8", "replace"), reply[3])
            for reply in replies
            # Not a PONG or a confirmation; hiredis gives RESP3 pushes as a list subclass.
            if isinstance(reply, list) and reply[0] == b"pmessage"
        ]
        batch = [(topic, BusMessage(topic, data)) for topic, data in items]
        try:
            self.bus._tally.received += self.hub._publish_batch_nowait(batch)
        except (trio.WouldBlock, ValueError):
            for topic, message in batch:  # waits for room, or counts a bad topic
                await self.offer(topic, message)
        else:
            await trio.lowlevel.checkpoint()

    async def finish(self) -> None:
        if self._first is not _NOT_OPEN:  # connected, never read: the reader did not start
            self._first.close()
            self._first = _NOT_OPEN
        await trio.lowlevel.checkpoint()


def _psubscribe(pubsub: Any, glob: str) -> None:
    pubsub.psubscribe(glob)
    deadline = _CONFIRM_WAIT
    while deadline > 0:
        reply = pubsub.get_message(timeout=_POLL_INTERVAL)
        if reply is not None and reply["type"] == "psubscribe":
            return
        deadline -= _POLL_INTERVAL
    raise redis.TimeoutError(f"no confirmation of PSUBSCRIBE {glob!r}")


def _drain(pubsub: Any, timeout: float) -> list[Any] | None:
    """In the thread: the replies that arrived, up to ``_BATCH``; ``None`` if none in ``timeout``.

    Each reply is ``[kind, pattern, channel, data]`` (bytes; a RESP3 push
    has the same shape). They are read from the connection directly, one
    ``can_read`` and one ``read_response`` each, as ``PubSub.parse_response``
    reads them: its ``get_message`` adds, per message, a retry wrapper, a
    health check, a dict and a telemetry hook.
    """
    connection = pubsub.connection
    if connection is None:
        raise redis.ConnectionError("the pub/sub connection is closed")
    if not connection.can_read(timeout=timeout):
        return None
    replies = [connection.read_response(push_request=True)]
    while len(replies) < _BATCH and connection.can_read(timeout=0):
        replies.append(connection.read_response(push_request=True))
    return replies


def consumer_name() -> str:
    """A consumer name unique to this process and subscription."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:12]}"


@attrs.frozen
class _Batch:
    """What one poll of a stream brought: entries to deliver."""

    entries: list[Any]
    redelivered: bool


class StreamReader(Reader):
    """A consumer in a consumer group of the bus's stream.

    The group is ``<group>:<pattern>``: every entry of the stream reaches
    each group once, and a group only keeps the entries of its pattern (it
    acknowledges the others at once). Processes subscribing to the same
    pattern with the same ``group`` share its entries.

    One thread per session polls the stream: it sends the acks queued since
    its last poll, claims entries idle for ``claim_idle`` every half of it,
    and blocks in ``XREADGROUP`` for at most ``_BLOCK_MS``.
    """

    kind = "stream consumer"

    def __init__(self, bus: RedisBus, hub: Hub[BusMessage], pattern: str, tokens: tuple[str, ...]):
        super().__init__(bus, hub, pattern, tokens)
        self.group = f"{bus.group}:{pattern}"
        self.consumer = consumer_name()
        # Appended in trio, taken by the polling thread: a deque is thread-safe.
        self._acks: collections.deque[bytes] = collections.deque()
        # Read and written by the polling thread only.
        self._pending: str | None = "0"
        self._claim_cursor = "0-0"
        self._claimed_at = -math.inf
        self._streaming = False
        self._token = trio.lowlevel.current_trio_token()
        # Set once the subscription ends: a poll lingering for a burst stops at once.
        self._ending = threading.Event()

    async def connect(self) -> Any:
        await to_thread(self._create_group, limiter=self.limiter)
        # First what this consumer was given and never acknowledged (after a
        # reconnect: what was in flight), then new entries.
        self._pending = "0"
        return None

    async def read(self, handle: Any) -> None:
        async with iterate_in_thread(
            poll=self._poll, poll_interval=_BLOCK_MS / 1000, max_batch=16, buffer=4
        ) as batches:
            while True:
                for batch in await batches.receive_batch():
                    for entry_id, fields in batch.entries:
                        if fields:  # a claimed entry trimmed meanwhile has none
                            await self._deliver(entry_id, fields, redelivered=batch.redelivered)

    def _create_group(self) -> None:
        try:
            self.bus.client.xgroup_create(self.bus.stream, self.group, id="$", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def _poll(self, timeout: float) -> _Batch | None:
        """In the thread: send the acks, then claim what idled too long or read a batch.

        One round trip: a pipeline of ``XACK`` (if acks are queued) and either
        ``XAUTOCLAIM`` (every half ``claim_idle``) or ``XREADGROUP``.
        """
        if self._streaming:
            self._ending.wait(_LINGER)  # let a burst gather into one read
        acks = [self._acks.popleft() for _ in range(len(self._acks))]
        pipe = self.bus.client.pipeline(transaction=False)
        if acks:
            pipe.xack(self.bus.stream, self.group, *acks)
        claiming = self._claim_due()
        pending = self._pending
        if claiming:
            pipe.xautoclaim(
                self.bus.stream,
                self.group,
                self.consumer,
                min_idle_time=int(self.bus.claim_idle * 1000),
                start_id=self._claim_cursor,
                count=_BATCH,
            )
        else:
            pipe.xreadgroup(
                self.group,
                self.consumer,
                {self.bus.stream: ">" if pending is None else pending},
                count=_BATCH,
                block=None if pending is not None else max(1, int(timeout * 1000)),
            )
        try:
            replies: list[Any] = pipe.execute()
        except redis.ResponseError as exc:
            self._acks.extendleft(reversed(acks))
            if "NOGROUP" in str(exc):  # the server came back without our group
                raise redis.ConnectionError(f"group {self.group!r} is gone") from exc
            raise
        except BaseException:
            self._acks.extendleft(reversed(acks))  # not confirmed: send them again
            raise
        acked = int(replies[0]) if acks else 0
        if claiming:
            cursor = replies[-1][0]
            self._claim_cursor = cursor.decode() if isinstance(cursor, bytes) else cursor
            entries = list(replies[-1][1])
            redelivered = True
        else:
            entries = replies[-1][0][1] if replies[-1] else []
            if pending is not None:  # paging through our own pending entries
                self._pending = entries[-1][0].decode() if entries else None
            redelivered = pending is not None
        self._streaming = bool(entries)
        if acked:
            self._token.run_sync_soon(self._count_acked, acked)
        return _Batch(entries, redelivered=redelivered) if entries else None

    def _count_acked(self, acked: int) -> None:
        self.bus._tally.acked += acked

    def _claim_due(self) -> bool:
        now = time.monotonic()
        if now - self._claimed_at < self.bus.claim_idle / 2:
            return False
        self._claimed_at = now
        return True

    async def _deliver(
        self, entry_id: bytes, fields: dict[bytes, bytes], *, redelivered: bool
    ) -> None:
        topic = fields.get(b"topic", b"").decode("utf-8", "replace")
        raw_id = fields.get(b"id")
        msg_id = raw_id.decode("utf-8", "replace") if raw_id is not None else None
        ack = functools.partial(self._ack, entry_id)
        message = BusMessage(topic, fields.get(b"data", b""), msg_id, ack=ack)
        if await self.offer(topic, message):
            if redelivered:
                self.bus._tally.redelivered += 1
        else:
            self._acks.append(entry_id)  # another pattern's entry: this group skips it

    async def _ack(self, entry_id: bytes) -> None:
        self._acks.append(entry_id)
        await trio.lowlevel.checkpoint()

    async def finish(self) -> None:
        """Send the acks still held back; leave the group if nothing is pending.

        Bounded and shielded. Acks that cannot be sent mean redelivery; a
        consumer with entries still pending stays in the group, so that
        another consumer can claim them.
        """
        self._ending.set()
        acks = [self._acks.popleft() for _ in range(len(self._acks))]
        with trio.CancelScope(shield=True), trio.move_on_after(_CONFIRM_WAIT):
            try:
                acked = await to_thread(self._leave, acks)
            except _ACK_ERRORS as exc:
                logger.warning(
                    "redis bus %r: %d acks for %r not sent (%s); they will be redelivered",
                    self.bus.name,
                    len(acks),
                    self.pattern,
                    exc,
                )
            else:
                self.bus._tally.acked += acked
        await trio.lowlevel.checkpoint()

    def _leave(self, acks: list[bytes]) -> int:
        """In a thread: send ``acks``; delete this consumer if it has nothing pending."""
        client = self.bus.client
        acked = int(client.xack(self.bus.stream, self.group, *acks)) if acks else 0
        pending = client.xpending_range(
            self.bus.stream, self.group, min="-", max="+", count=1, consumername=self.consumer
        )
        if not pending:
            client.xgroup_delconsumer(self.bus.stream, self.group, self.consumer)
        return acked
