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

How far behind a client is, and how every frame is accounted for, is
``_client_queue``'s part (:class:`FrameQueue`); its requests (subscribe,
unsubscribe) are ``_client_requests``'s. :class:`Client` extends both.
"""

from __future__ import annotations

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

from ._client_requests import ClientRequests
from ._config import (
    CLOSE_PING_TIMEOUT,
    BroadcastConfig,
)
from ._handshake import RECEIVE_SIZE

logger = logging.getLogger("engine.broadcast")

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


class Client(ClientRequests):
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
        super().__init__(config)
        self.stream = stream
        self.ws = WSConnection(ConnectionType.SERVER)
        self._close: CloseConnection | None = None
        self.client_id = client_id
        self.host, self.peer = _peer(stream)  # the host is None if unknown
        self._on_topics = on_topics
        # Shielded so that a server shutdown can still say goodbye (1001);
        # every way of closing puts a deadline on it.
        self.scope = trio.CancelScope(shield=True)
        self.is_open = False
        self.cause: str | None = None  # why it closed, for the statistics
        self.aborted = False  # the close handshake did not finish in time
        self._writes = 0
        self._bytes = 0
        self._pong: bytes | None = None
        self._flush = False  # write what is queued before the close frame
        self._await_reply = True  # wait for the client's close frame
        self._tasks: trio.CancelScope | None = None
        self._peer_closed = trio.Event()
        self._pong_seen = trio.Event()

    # -- called by the server (and offer(), lag(), check_lag(), discard()) ------

    def open(self, topics: tuple[str, ...]) -> None:
        """Mark the upgrade accepted, with its initial topics."""
        self.is_open = True
        self._set_topics(topics)
        self.scope.deadline = math.inf

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
            batch = self._take_batch()
            frames = self._take_control()
            frames += batch
            data = frames[0] if len(frames) == 1 else b"".join(frames)
            if not await self._write(data):
                return
            self._written()
        await self._finish_close()

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

    def _topics_changed(self) -> None:
        self._on_topics(self)

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
