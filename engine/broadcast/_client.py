"""One connected client: its bounded queue, a writer that coalesces frames, a reader.

The server frames each bus message once and offers the same bytes to every
client that wants it (server frames are unmasked, so they are identical on
every connection). A client's queue holds those frames; its writer takes
everything queued and writes it with one ``send_all``, so a client that
keeps up costs one system call per batch, not one per message. A client
that does not keep up fills only its own queue: past ``queue_size`` the
oldest frames are dropped and counted, and a client whose oldest unwritten
frame is older than ``max_lag`` seconds (or, if set, that lost more than
``max_lost`` frames) is closed with ``CLOSE_TOO_SLOW``. Nothing here ever
makes the publisher or another client wait.

How far behind a client is comes from marks, not from a time per frame
(which would cost a clock read per frame per client): frames leave the queue
oldest first, whether written or dropped, so each has a place in the order
frames were queued, and a mark ``(place, time)`` says that the frames from
that place on arrived no earlier than that time. A mark is made when a frame
wakes the idle writer, and when a write begins with frames queued since the
last mark. The oldest frame not written yet has waited at most ``now`` minus
the time of the last mark at or before its place: never less than its real
age, and more by at most the length of the write under way when it arrived.

Every frame offered is accounted for at every moment:
``offered == sent + dropped + queued``, where ``dropped`` is by reason:
``overflow`` (the full queue discarded its oldest) or ``closed`` (still
queued, or in a write that never finished, when the connection ended).

The queue is a ``collections.deque`` bounded by ``maxlen``, not an
``engine`` channel, because offering a frame is the broadcast's hot path
(once per frame per client) and the deque makes it cheaper:

- the deque pushes out its oldest item in C as it appends, where the
  channel's ``send_nowait`` runs Python for every frame (parked
  receivers, its counters, its peak);
- a loss must be seen as it happens (``max_lost``), and the channel only
  says so in a statistics snapshot, too dear per frame: the client would
  keep a mirror of the channel's depth, which a frame handed straight to
  the parked writer (never in the buffer) puts out of step. Here the depth
  is ``len(queue)`` itself and the write under way is ``_in_hand``;
- the writer waits on an event that a frame, a reply or a close sets,
  where a writer parked in the channel's ``receive_batch`` can only be
  woken for a reply or a close by cancelling the wait.

``docs/broadcast.md`` ("Measured") compares the two.
"""

from __future__ import annotations

import collections
import json
import logging
import math
from collections.abc import Callable

import attrs
import trio
from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import (
    BytesMessage,
    CloseConnection,
    Event,
    Ping,
    Pong,
    TextMessage,
)

from ._config import (
    CLOSE_PING_TIMEOUT,
    CLOSE_POLICY,
    CLOSE_TOO_BIG,
    CLOSE_TOO_SLOW,
    BroadcastConfig,
)
from ._handshake import RECEIVE_SIZE
from ._ratelimit import TokenBucket, Verdict
from ._topics import BadRequest, Tokens, parse_request, split

logger = logging.getLogger("engine.broadcast")

WRITE_BATCH = 1024
"""Frames joined into one socket write at most (a backlog goes out in a few writes)."""
MAX_REPLIES = 32
"""Replies (acks, errors) waiting for a client that sends requests but does not read."""
DROP_REASONS = ("overflow", "closed")
"""Why a frame offered to a client was never sent: the keys of ``dropped_by_reason``."""


@attrs.frozen
class ClientStatistics:
    """A snapshot of one connected client.

    Attributes:
        client_id: the server's number for it.
        peer: its address.
        topics: the patterns it receives.
        offered: frames handed to it: at every moment
            ``offered == sent + dropped + queued``.
        queued: frames not written yet: waiting in its queue, or taken by
            the writer for the write under way.
        peak_queued: the most frames that ever waited in the queue itself.
        sent: frames written to its socket.
        dropped: frames it will never get, ``sum(dropped_by_reason.values())``.
        dropped_by_reason: ``overflow``: discarded by its full queue, oldest
            first; ``closed``: still queued, or in a write that did not
            finish, when the connection ended.
        writes: socket writes; ``sent / writes`` is the coalescing factor.
        bytes_sent: bytes written, frames and control.
    """

    client_id: int
    peer: str
    topics: tuple[str, ...]
    offered: int
    queued: int
    peak_queued: int
    sent: int
    dropped: int
    dropped_by_reason: dict[str, int]
    writes: int
    bytes_sent: int


def _peer(stream: trio.SocketStream) -> tuple[str | None, str]:
    try:
        host, port, *_ = stream.socket.getpeername()
    except (OSError, ValueError):  # already reset, or not an IP socket
        return None, "?"
    return str(host), f"{host}:{port}"


class Client:
    """One client connection, from accept to close (private to the server).

    Args:
        stream: the accepted TCP stream.
        config: the server's settings.
        client_id: the server's number for it.
        on_topics: called when a subscribe or unsubscribe message changes its topics.
    """

    def __init__(
        self,
        stream: trio.SocketStream,
        config: BroadcastConfig,
        client_id: int,
        on_topics: Callable[[Client], None],
    ) -> None:
        self.stream = stream
        self.ws = WSConnection(ConnectionType.SERVER)
        self.config = config
        self.client_id = client_id
        self.host, self.peer = _peer(stream)  # the host is None if unknown
        self._on_topics = on_topics
        # Shielded so that a server shutdown can still say goodbye (1001);
        # every way of closing puts a deadline on it.
        self.scope = trio.CancelScope(shield=True)
        self.topics: tuple[str, ...] = ()
        self.patterns: tuple[Tokens, ...] = ()
        self.is_open = False
        self.cause: str | None = None  # why it closed, for the statistics
        self.aborted = False  # the close handshake did not finish in time
        self._queue: collections.deque[bytes] = collections.deque(maxlen=config.queue_size)
        self._maxsize = config.queue_size
        self._accepting = True  # until a close starts: then nothing more is offered
        self._offered = 0
        self._peak = 0
        self._in_hand = 0  # frames taken by the writer, not written yet
        # How far behind it is (see the module's docstring): marks, the place
        # of the oldest frame in hand, frames taken by the writer in total.
        self._marks: collections.deque[tuple[int, float]] = collections.deque()
        self._first_in_hand = 0
        self._taken = 0
        self._sent = 0
        self._overflow = 0
        self._discarded = 0  # frames that never went out because the connection ended
        self._writes = 0
        self._bytes = 0
        self._replies: list[bytes] = []
        self._pong: bytes | None = None
        self._close: CloseConnection | None = None
        self._flush = False  # write what is queued before the close frame
        self._await_reply = True  # wait for the client's close frame
        self._waiting = False  # the writer waits for work
        self._work = trio.Event()
        self._requests = TokenBucket(config.request_rate, config.request_burst)
        self._tasks: trio.CancelScope | None = None
        self._peer_closed = trio.Event()
        self._pong_seen = trio.Event()
        self._inbound: list[bytes] = []
        self._inbound_size = 0

    # -- called by the server -------------------------------------------------

    def open(self, topics: tuple[str, ...]) -> None:
        """Mark the upgrade accepted, with its initial topics."""
        self.is_open = True
        self._set_topics(topics)
        self.scope.deadline = math.inf

    def offer(self, frame: bytes) -> None:
        """Queue one frame; never waits. A full queue drops its oldest frame.

        Once a close has started nothing more is offered (or counted).
        """
        if not self._accepting:
            return
        queue = self._queue
        self._offered += 1
        if len(queue) == self._maxsize:
            self._overflow += 1
            queue.append(frame)  # the deque's bound pushes out the oldest
            max_lost = self.config.max_lost
            if max_lost is not None and self._overflow > max_lost:
                reason = f"too slow: lost {self._overflow} messages"
                self.request_close(CLOSE_TOO_SLOW, reason, "too_slow")
            return
        queue.append(frame)
        if len(queue) > self._peak:
            self._peak = len(queue)
        if self._waiting:
            self._mark(trio.current_time())
            self._wake_writer()

    def _mark(self, now: float) -> None:
        """Note that the frames queued from now on arrive no earlier than ``now``."""
        place = self._offered - 1 if self._waiting else self._offered
        marks = self._marks
        if marks and marks[-1][0] == place:  # no frame since: the later time is the closer
            marks[-1] = (place, now)
        else:
            marks.append((place, now))

    def lag(self, now: float) -> float:
        """How long the oldest frame not written yet has waited, at most; 0 if none.

        Never less than the real age; more by at most the length of the
        write under way when that frame arrived.
        """
        if not (self._in_hand or self._queue):
            return 0.0
        self._forget_marks()
        return now - self._marks[0][1] if self._marks else 0.0

    def _forget_marks(self) -> None:
        """Drop the marks that no frame still waiting needs: all of them if none waits."""
        marks = self._marks
        if not (self._in_hand or self._queue):
            marks.clear()
            return
        oldest = self._first_in_hand if self._in_hand else self._taken + self._overflow
        while len(marks) > 1 and marks[1][0] <= oldest:
            marks.popleft()

    def check_lag(self, now: float) -> None:
        """Close the client with ``CLOSE_TOO_SLOW`` if it is more than ``max_lag`` behind."""
        max_lag = self.config.max_lag
        if self.lag(now) > max_lag:
            reason = f"too slow: more than {max_lag:g} s behind"
            self.request_close(CLOSE_TOO_SLOW, reason, "too_slow")

    def discard(self) -> None:
        """Count every frame not written as dropped (``closed``) and let them go.

        The server calls it once the connection has ended, the writer with it.
        """
        self._accepting = False
        self._discarded += len(self._queue) + self._in_hand
        self._queue.clear()
        self._in_hand = 0

    def request_close(self, code: int, reason: str, cause: str, *, flush: bool = False) -> None:
        """Start the close handshake; the connection ends within ``close_timeout``.

        The writer finishes the write in progress (and, with ``flush``, writes
        what is still queued), sends the close frame and waits for the
        client's; if the deadline passes first, the TCP connection is dropped.
        """
        if self._close is not None:
            return
        self._accepting = False
        self._close = CloseConnection(code=code, reason=reason)
        self._flush = flush
        self.cause = cause
        self.scope.deadline = min(self.scope.deadline, trio.current_time() + self._close_timeout)
        self._wake_writer()

    def statistics(self) -> ClientStatistics:
        """A frozen snapshot of this client's counters."""
        return ClientStatistics(
            client_id=self.client_id,
            peer=self.peer,
            topics=self.topics,
            offered=self._offered,
            # Not just the queue: a frame in the write under way is not sent yet.
            queued=len(self._queue) + self._in_hand,
            peak_queued=self._peak,
            sent=self._sent,
            dropped=self._overflow + self._discarded,
            dropped_by_reason={"overflow": self._overflow, "closed": self._discarded},
            writes=self._writes,
            bytes_sent=self._bytes,
        )

    async def run(self) -> None:
        """Serve the open connection until it closes, one way or another."""
        async with trio.open_nursery() as nursery:
            self._tasks = nursery.cancel_scope
            nursery.start_soon(self._read_loop)
            if math.isfinite(self.config.ping_interval):
                nursery.start_soon(self._keepalive)
            await self._write_loop()
            nursery.cancel_scope.cancel()

    @property
    def _close_timeout(self) -> float:
        return self.config.close_timeout

    # -- writing --------------------------------------------------------------

    def _wake_writer(self) -> None:
        if self._waiting:
            self._waiting = False
            self._work.set()

    def _take_control(self) -> list[bytes]:
        control = self._replies
        self._replies = []
        if self._pong is not None:
            control.append(self._pong)
            self._pong = None
        return control

    async def _write_loop(self) -> None:
        queue = self._queue
        while self._close is None or (self._flush and queue):
            if not queue and self._close is None and not self._replies and self._pong is None:
                await self._wait_for_work()
                continue
            # Everything queued (up to a batch) in one write, replies first.
            self._mark(trio.current_time())  # what is queued from now on arrives later
            self._first_in_hand = self._taken + self._overflow
            if len(queue) <= WRITE_BATCH:
                batch = list(queue)
                queue.clear()
            else:
                batch = [queue.popleft() for _ in range(WRITE_BATCH)]
            self._taken += len(batch)
            self._in_hand = len(batch)
            frames = self._take_control()
            frames += batch
            data = frames[0] if len(frames) == 1 else b"".join(frames)
            if not await self._write(data):
                return
            self._sent += len(batch)
            self._in_hand = 0
            self._forget_marks()
        await self._finish_close()

    async def _wait_for_work(self) -> None:
        # A frame, a reply or a close request sets the event. The frames
        # offered before the writer runs again are all queued by then.
        self._work = trio.Event()
        self._waiting = True
        try:
            await self._work.wait()
        finally:
            self._waiting = False

    async def _write(self, data: bytes) -> bool:
        try:
            await self.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self._connection_lost()
            return False
        self._writes += 1
        self._bytes += len(data)
        return True

    async def _finish_close(self) -> None:
        assert self._close is not None
        frames = self._take_control()
        if self.ws.state in (ConnectionState.OPEN, ConnectionState.REMOTE_CLOSING):
            frames.append(self.ws.send(self._close))
        if frames and not await self._write(b"".join(frames)):
            return
        if self.ws.state is ConnectionState.LOCAL_CLOSING and self._await_reply:
            await self._peer_closed.wait()

    def _connection_lost(self) -> None:
        self._accepting = False
        if self.cause is None:
            self.cause = "connection_lost"
        self._peer_closed.set()
        if self._tasks is not None:
            self._tasks.cancel()

    # -- reading --------------------------------------------------------------

    async def _read_loop(self) -> None:
        ws = self.ws
        while not self._close_complete():
            try:
                data = await self.stream.receive_some(RECEIVE_SIZE)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                data = b""
            if not data:
                self._connection_lost()
                return
            if self._close_complete():  # we answered the client's close meanwhile
                break
            ws.receive_data(bytes(data))
            for event in ws.events():
                self._handle(event)
        self._peer_closed.set()

    def _close_complete(self) -> bool:
        return self.ws.state is ConnectionState.CLOSED

    def _handle(self, event: Event) -> None:
        state = self.ws.state
        if isinstance(event, TextMessage | BytesMessage):
            self._message_part(event.data, event.message_finished)
        elif isinstance(event, Ping):
            if state is ConnectionState.OPEN:
                self._pong = self.ws.send(event.response())  # only the latest needs an answer
                self._wake_writer()
        elif isinstance(event, Pong):
            self._pong_seen.set()
        elif isinstance(event, CloseConnection):
            if state is ConnectionState.REMOTE_CLOSING:  # the client closes: answer in kind
                if self._close is None:
                    self.cause = "client_closed"
                    self._accepting = False
                    self._close = event.response()
                    self.scope.deadline = min(
                        self.scope.deadline, trio.current_time() + self._close_timeout
                    )
                self._wake_writer()
            elif state is ConnectionState.CLOSED:  # the answer to our close
                self._peer_closed.set()
            else:  # wsproto could not parse a frame: fail the connection
                self._await_reply = False  # the rest of the stream cannot be read
                self._peer_closed.set()
                self.request_close(event.code, event.reason or "", "protocol_error")

    def _message_part(self, data: str | bytes | bytearray, finished: bool) -> None:
        if self._close is not None:
            return
        part = data.encode() if isinstance(data, str) else bytes(data)
        self._inbound_size += len(part)
        if self._inbound_size > self.config.max_inbound_size:
            limit = self.config.max_inbound_size
            self.request_close(CLOSE_TOO_BIG, f"message over {limit} bytes", "message_too_big")
            return
        self._inbound.append(part)
        if finished:
            message = b"".join(self._inbound)
            self._inbound, self._inbound_size = [], 0
            self._on_request(message)

    def _on_request(self, message: str | bytes) -> None:
        verdict = self._requests.take(trio.current_time())
        if verdict is Verdict.CLOSE:
            self.request_close(CLOSE_POLICY, "too many requests", "rate_limited")
            return
        if verdict is Verdict.REFUSE:
            rate, burst = self.config.request_rate, self.config.request_burst
            limit = f"rate limited: at most {rate:g} requests per second, {burst} at once"
            self._reply({"op": "error", "error": limit})
            return
        try:
            request = parse_request(message, self.config.topic_rules)
            topics = self._apply(request.op, request.patterns)
        except BadRequest as exc:
            self._reply({"op": "error", "id": exc.request_id, "error": str(exc)})
            return
        self._reply({"op": f"{request.op}d", "id": request.request_id, "topics": list(topics)})

    def _apply(self, op: str, patterns: tuple[str, ...]) -> tuple[str, ...]:
        if op == "subscribe":
            topics = tuple(dict.fromkeys(self.topics + patterns))
            if len(topics) > self.config.max_topics:
                raise BadRequest(f"at most {self.config.max_topics} topics per client")
        else:
            topics = tuple(t for t in self.topics if t not in patterns)
        if topics != self.topics:  # a request that changes nothing costs nothing more
            self._set_topics(topics)
            self._on_topics(self)
        return topics

    def _set_topics(self, topics: tuple[str, ...]) -> None:
        self.topics = topics
        self.patterns = tuple(split(t) for t in topics)

    def _reply(self, body: dict[str, object]) -> None:
        if len(self._replies) >= MAX_REPLIES:
            self.request_close(CLOSE_POLICY, "too many unread replies", "policy")
            return
        if body.get("id") is None:
            body.pop("id", None)
        self._replies.append(self.ws.send(TextMessage(data=json.dumps(body))))
        self._wake_writer()

    async def _keepalive(self) -> None:
        interval, timeout = self.config.ping_interval, self.config.ping_timeout
        count = 0
        while True:
            await trio.sleep(interval)
            if self.ws.state is not ConnectionState.OPEN or self._close is not None:
                return
            count += 1
            self._pong_seen = trio.Event()
            self._replies.append(self.ws.send(Ping(payload=b"%d" % count)))
            self._wake_writer()
            with trio.move_on_after(timeout):
                await self._pong_seen.wait()
                continue
            self.request_close(CLOSE_PING_TIMEOUT, "keepalive ping timeout", "ping_timeout")
            return
