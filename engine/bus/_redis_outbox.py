"""The Redis publisher: trio tasks queue commands, one thread sends them in pipelines.

A worker-thread call per publish costs a trip through trio's thread
machinery each time and sends one command per round trip. Instead, trio
tasks append their ``PUBLISH`` / ``XADD`` to this outbox, and one thread,
which lives as long as the bus, takes everything queued at once and sends
it as one pipeline: a burst costs a round trip per batch, not per message.

Two kinds of item:

* fire and forget (pub/sub, at most once): the caller returns once its
  command is queued; the thread counts it sent or lost;
* confirmed (streams, at least once): the caller waits on a :class:`Slot`
  until the server's reply to its own command came back (a pipelined batch
  confirms all of its commands at once).

When a pipeline fails on the connection, every command of it is reported
lost (fire and forget) or failed (confirmed), the bus is told it is down,
and the thread pings the server with the bus's backoff until it answers.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import redis
import trio

from .._backoff import Backoff
from .._threads import to_thread
from ._redis_readers import CONNECTION_ERRORS

if TYPE_CHECKING:
    from ._redis import RedisBus

# Commands per pipeline (a bigger batch waits for the next round trip).
BATCH = 1000
# Seconds the idle thread sleeps between checks that it should stop (a
# safety net: stop() wakes it at once).
_IDLE_WAIT = 0.5


class Slot:
    """Where the thread puts the outcome of one confirmed command.

    Attributes:
        done: set (in trio) once :attr:`reply` or :attr:`error` is known.
        reply: the server's reply.
        error: why it was not confirmed (a connection error, or the
            server's error reply).
    """

    __slots__ = ("done", "error", "reply")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.reply: Any = None
        self.error: BaseException | None = None


# One queued command: redis-py's command arguments, and the slot to confirm
# it in (None: fire and forget).
Item = tuple[tuple[Any, ...], Slot | None]


def xadd_command(bus: RedisBus, topic: str, data: bytes, msg_id: str | None) -> tuple[Any, ...]:
    """The ``XADD`` of one message to ``bus``'s stream, trimmed to about ``bus.maxlen``.

    The entry holds ``topic``, ``data`` and, when given, ``id`` (the ``msg_id``).
    """
    command: tuple[Any, ...] = (
        "XADD",
        bus.stream,
        "MAXLEN",
        "~",
        bus.maxlen,
        "*",
        b"topic",
        topic,
        b"data",
        data,
    )
    return command if msg_id is None else (*command, b"id", msg_id)


class Outbox:
    """Commands on their way to Redis, sent in order by one thread.

    Args:
        client: the redis-py client (its pool gives the thread a connection).
        maxsize: how many commands may wait; :meth:`put` waits past it.
        backoff: the delays between pings while the server is unreachable.
        on_sent: called in trio with how many fire-and-forget commands the
            server accepted, and the confirmed ones' count.
        on_lost: called in trio when a broken connection took a batch, with
            how many fire-and-forget commands it took (the confirmed ones
            fail in their callers), and the error.
        on_up: called in trio once the server answers again after a failure.
    """

    def __init__(
        self,
        client: redis.Redis,
        *,
        maxsize: int,
        backoff: Backoff,
        on_sent: Callable[[int], None],
        on_lost: Callable[[int, BaseException], None],
        on_up: Callable[[], None],
    ) -> None:
        self._client = client
        self._maxsize = maxsize
        self._backoff = backoff
        self._on_sent = on_sent
        self._on_lost = on_lost
        self._on_up = on_up
        self._items: collections.deque[Item] = collections.deque()
        self._lock = threading.Lock()
        self._wakeup = threading.Condition(self._lock)
        self._stopping = False
        self._running = False  # the thread is between taking a batch and reporting it
        self._token = trio.lowlevel.current_trio_token()
        self._room = trio.Event()
        self._room.set()
        self._ended = trio.Event()

    def __len__(self) -> int:
        return len(self._items)

    async def put(self, command: tuple[Any, ...], slot: Slot | None = None) -> None:
        """Queue ``command`` (waiting while the outbox is full).

        Raises:
            trio.ClosedResourceError: the outbox stopped.
        """
        while len(self._items) >= self._maxsize:
            if self._stopping:
                raise trio.ClosedResourceError("the redis outbox is stopped")
            if self._room.is_set():
                self._room = trio.Event()
            await self._room.wait()
        if self._stopping:
            raise trio.ClosedResourceError("the redis outbox is stopped")
        with self._wakeup:
            self._items.append((command, slot))
            if not self._running:
                self._wakeup.notify()

    def stop(self) -> None:
        """Let the thread send what is queued and end; later :meth:`put` calls fail."""
        with self._wakeup:
            self._stopping = True
            self._wakeup.notify()
        self._room.set()

    async def wait_ended(self) -> None:
        """Wait until :meth:`run` has ended."""
        await self._ended.wait()

    async def run(self) -> None:
        """Run the sending thread until :meth:`stop` (a task of the bus's nursery).

        Cancellation:
            Cancelling it stops the outbox; the thread, abandoned, ends after
            its current pipeline. Commands never sent then count as lost.
        """
        try:
            await to_thread(self._thread)
        finally:
            self.stop()
            with self._lock:
                left = list(self._items)
                self._items.clear()
            if left:
                self._report_lost(left, trio.ClosedResourceError("the redis bus closed"))
            self._ended.set()

    # -- in the thread ---------------------------------------------------------

    def _thread(self) -> None:
        rng = self._backoff.new_random()
        while (batch := self._take()) is not None:
            try:
                replies = self._send(batch)
            except CONNECTION_ERRORS as exc:
                if not self._call_soon(self._report_lost, batch, exc):
                    return
                if not self._reconnect(rng):
                    return
                continue
            if not self._call_soon(self._report_sent, batch, replies):
                return

    def _take(self) -> list[Item] | None:
        """The next batch, waiting for one; None once stopped with nothing queued."""
        items = self._items
        with self._wakeup:
            self._running = False
            while not items:
                if self._stopping:
                    return None
                self._wakeup.wait(_IDLE_WAIT)
            self._running = True
            return [items.popleft() for _ in range(min(len(items), BATCH))]

    def _send(self, batch: list[Item]) -> list[Any]:
        pipe = self._client.pipeline(transaction=False)
        for command, _ in batch:
            pipe.execute_command(*command)  # type: ignore[no-untyped-call]  # redis-py leaves it untyped
        replies: list[Any] = pipe.execute(raise_on_error=False)
        return replies

    def _reconnect(self, rng: Any) -> bool:
        """Ping with backoff until the server answers (True) or the outbox stops (False)."""
        attempt = 0
        while True:
            with self._wakeup:
                if self._stopping:
                    return False
                self._wakeup.wait(self._backoff.delay(attempt, rng))
                if self._stopping:
                    return False
            attempt += 1
            try:
                self._client.ping()
            except CONNECTION_ERRORS:
                continue
            return self._call_soon(self._on_up)

    def _call_soon(self, fn: Callable[..., object], *args: Any) -> bool:
        """``fn(*args)`` in trio; False if trio's run is over (the thread should end)."""
        try:
            self._token.run_sync_soon(fn, *args)
        except trio.RunFinishedError:
            return False
        return True

    # -- in trio ---------------------------------------------------------------

    def _report_sent(self, batch: list[Item], replies: list[Any]) -> None:
        forgotten = 0
        for (_, slot), reply in zip(batch, replies, strict=True):
            if slot is None:
                forgotten += 1
            else:
                if isinstance(reply, redis.RedisError):
                    slot.error = reply
                else:
                    slot.reply = reply
                slot.done.set()
        self._on_sent(forgotten)
        self._room.set()

    def _report_lost(self, batch: list[Item], error: BaseException) -> None:
        forgotten = 0
        for _, slot in batch:
            if slot is None:
                forgotten += 1
            else:
                slot.error = error
                slot.done.set()
        self._on_lost(forgotten, error)
        self._room.set()
