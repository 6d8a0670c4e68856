"""One WebSocket connection: paced data bursts out, commands and pings in.

wsproto does the protocol. The writer asks the :class:`Tape` for a burst of
messages, frames each with wsproto's frame layer, and hands the whole burst
to one ``send_all``: one socket write per burst, not per frame, because a
write per frame would cap what one core can send (``docs/simulator.md``,
"Speed, and how"). The reader answers
pings, the close handshake, and Binance's ``SUBSCRIBE`` /
``UNSUBSCRIBE`` / ``LIST_SUBSCRIPTIONS`` requests.
"""

from __future__ import annotations

import contextlib
import json
from typing import Any

import attrs
import trio
from wsproto import WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import CloseConnection, Event, Ping, TextMessage
from wsproto.frame_protocol import FrameProtocol
from wsproto.utilities import RemoteProtocolError

from ._encode import encode
from ._pacing import Pacer
from ._state import SharedState
from ._streams import StreamSpec, UnknownStream, parse_streams
from ._tape import Tape

# Frames per socket write at most: about 100-200 KB of JSON.
MAX_BURST = 512
_RECEIVE_SIZE = 65536
# RFC 6455: a close reason fits in 123 bytes.
_MAX_REASON = 123
_POLICY_VIOLATION = 1008
# Requests from clients are small JSON objects; a larger one ends the session.
MAX_REQUEST = 65536
_TOO_BIG = 1009
# How long a rejected client gets to answer the close frame.
CLOSE_DEADLINE = 1.0


@attrs.define(eq=False)
class Session:
    """A live WebSocket connection of the simulator (private)."""

    state: SharedState
    stream: trio.SocketStream
    ws: WSConnection
    tape: Tape
    pacer: Pacer
    # wsproto's frame layer on its own: data frames are complete, unmasked
    # text frames without extensions, so framing them needs no connection
    # state, and skipping WSConnection.send's event dispatch saves about a
    # third of the per-frame cost.
    frames: FrameProtocol = attrs.Factory(lambda: FrameProtocol(client=False, extensions=[]))
    scope: trio.CancelScope = attrs.Factory(trio.CancelScope)
    lock: trio.StrictFIFOLock = attrs.Factory(trio.StrictFIFOLock)
    streams_changed: trio.Event = attrs.Factory(trio.Event)
    malformed_pending: int = 0
    # Messages owed by Simulator.burst beyond the pace; cancelling
    # ``pace_wait`` wakes a writer that sleeps until its next paced message.
    burst_pending: int = 0
    pace_wait: trio.CancelScope = attrs.Factory(trio.CancelScope)
    _partial: list[str] = attrs.Factory(list)
    _partial_size: int = 0

    @property
    def skipped(self) -> int:
        """Messages skipped because the connection fell behind its schedule."""
        return self.pacer.skipped

    def drop(self) -> None:
        """Cut the connection without a close frame (fault injection)."""
        self.state.counters.connections_dropped += 1
        self.scope.cancel()

    def corrupt_next(self) -> None:
        """Send a truncated, unparseable frame before the next message."""
        self.malformed_pending += 1

    def burst(self, count: int) -> None:
        """Send ``count`` messages beyond the pace, as fast as the socket takes them."""
        self.burst_pending += count
        self.pace_wait.cancel()

    async def run(self) -> None:
        """Serve the connection until the client leaves, a drop, or cancellation."""
        self.state.sessions.add(self)
        try:
            with self.scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._read, nursery.cancel_scope)
                    await self._write()
                    nursery.cancel_scope.cancel()
        finally:
            self.state.sessions.discard(self)
            self.state.counters.messages_skipped += self.pacer.skipped

    async def _write(self) -> None:
        try:
            await self._write_forever()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return  # the client went away; the reader sees it too

    async def _write_forever(self) -> None:
        counters = self.state.counters
        self.pacer.restart()
        while True:
            if await self.state.wait_stall():
                self.pacer.restart()
            if not self.tape.specs:
                await self.streams_changed.wait()
                self.pacer.restart()
                continue
            count = await self._next_count()
            if not count:
                continue  # a burst() woke the wait: count again
            async with self.lock:
                # Checked once the lock is ours (taking it is a checkpoint): a
                # stall, drop or stream change that came while this task
                # waited holds the burst too. It is counted before it is
                # written, with no checkpoint in between, so ``messages_sent``
                # is never behind what a client can have received (a drop may
                # cut the last burst short).
                if self.state.stalled() or not self.tape.specs:
                    continue
                payload = self._burst(count)
                self._count_sent(count)
                counters.messages_sent += count
                counters.bytes_sent += len(payload)
                await self.stream.send_all(payload)

    async def _next_count(self) -> int:
        """How many messages to write next: the paced ones due, then any burst owed.

        Returns 0 when :meth:`burst` interrupted the wait for the pace.
        """
        if self.burst_pending:
            # No waiting for the pace, but a checkpoint: one write at a time,
            # and the reader (pings, requests) takes the lock in between.
            await trio.lowlevel.checkpoint()
            return min(self.pacer.due() + self.burst_pending, MAX_BURST)
        # A scope is entered once only: a fresh one for each wait.
        self.pace_wait = trio.CancelScope()
        with self.pace_wait:
            return await self.pacer.next_burst()
        return 0

    def _count_sent(self, count: int) -> None:
        """Book ``count`` messages: first against the pace, the rest against a burst."""
        if not self.burst_pending:
            self.pacer.sent(count)
            return
        # The paced messages go first, so a burst never delays the pace.
        extra = min(max(count - self.pacer.due(), 0), self.burst_pending)
        self.pacer.sent(count - extra)
        self.burst_pending -= extra
        self.state.counters.burst_messages += extra

    def _burst(self, count: int) -> bytes:
        texts = self.tape.texts(count)
        send_data = self.frames.send_data
        chunks = []
        if self.malformed_pending:
            self.malformed_pending -= 1
            self.state.counters.malformed_sent += 1
            chunks.append(send_data(texts[0][: len(texts[0]) // 2]))
        chunks.extend([send_data(text) for text in texts])
        return b"".join(chunks)

    async def _send(self, data: bytes) -> None:
        async with self.lock:
            await self.stream.send_all(data)

    async def _read(self, done: trio.CancelScope) -> None:
        # A vanished or misbehaving client ends its own session, nothing else.
        with contextlib.suppress(
            trio.BrokenResourceError, trio.ClosedResourceError, RemoteProtocolError
        ):
            await self._read_until_closed()
        done.cancel()

    async def _read_until_closed(self) -> None:
        # Events first: bytes that came with the handshake may hold a request.
        while True:
            for event in self.ws.events():
                if not await self._on_event(event):
                    return
            if self.ws.state is ConnectionState.CLOSED:
                return
            data = await self.stream.receive_some(_RECEIVE_SIZE)
            if not data:
                return  # the client left without a close frame
            self.ws.receive_data(data)

    async def _on_event(self, event: Event) -> bool:
        """Handle one event from the client; return whether to go on reading."""
        if isinstance(event, Ping):
            await self._send(self.ws.send(event.response()))
        elif isinstance(event, CloseConnection):
            if self.ws.state is ConnectionState.REMOTE_CLOSING:
                await self._send(self.ws.send(event.response()))
            return False
        elif isinstance(event, TextMessage):
            self._partial.append(event.data)
            self._partial_size += len(event.data)
            if self._partial_size > MAX_REQUEST:
                reason = f"requests are limited to {MAX_REQUEST} characters"
                await self._send(self.ws.send(CloseConnection(code=_TOO_BIG, reason=reason)))
                return False
            if event.message_finished:
                request, self._partial, self._partial_size = "".join(self._partial), [], 0
                await self._send(self.ws.send(TextMessage(data=encode(self._command(request)))))
        return True

    def _command(self, text: str) -> dict[str, Any]:
        """Binance's answer to one JSON request sent on the stream connection."""
        try:
            request = json.loads(text)
        except ValueError as exc:
            return {"error": {"code": 3, "msg": f"Invalid JSON: {exc}"}}
        if not isinstance(request, dict):
            return {"error": {"code": 2, "msg": "Invalid request: expected an object"}}
        ident, method, params = request.get("id"), request.get("method"), request.get("params", [])
        if not isinstance(params, list) or not all(isinstance(p, str) for p in params):
            return _error(ident, "params must be a list of stream names")
        names = [spec.name for spec in self.tape.specs]
        if method == "LIST_SUBSCRIPTIONS":
            return {"result": names, "id": ident}
        if method == "SUBSCRIBE":
            names += params
        elif method == "UNSUBSCRIBE":
            names = [name for name in names if name not in params]
        else:
            return _error(ident, f"unknown method {method!r}")
        try:
            self._set_streams(parse_streams(names, self.state.instruments))
        except UnknownStream as exc:
            return _error(ident, str(exc))
        return {"result": None, "id": ident}

    def _set_streams(self, specs: list[StreamSpec]) -> None:
        # Safe without the lock: the writer makes a burst (texts and frames)
        # without awaiting in between, so this lands between two bursts.
        self.tape.set_streams(specs)
        self.streams_changed.set()
        self.streams_changed = trio.Event()


def _error(ident: object, message: str) -> dict[str, Any]:
    return {"error": {"code": 2, "msg": f"Invalid request: {message}"}, "id": ident}


async def reject(
    state: SharedState, stream: trio.SocketStream, ws: WSConnection, reason: str
) -> None:
    """Close an accepted connection with code 1008 and ``reason`` (an unknown stream).

    The close handshake is completed (for up to :data:`CLOSE_DEADLINE`
    seconds) before the caller closes the socket, as RFC 6455 asks of a
    server; clients that see the socket vanish mid-handshake may report an
    abnormal closure instead of the reason.
    """
    state.counters.streams_rejected += 1
    reason = reason.encode()[:_MAX_REASON].decode(errors="ignore")
    await stream.send_all(ws.send(CloseConnection(code=_POLICY_VIOLATION, reason=reason)))
    with trio.move_on_after(CLOSE_DEADLINE):
        while ws.state is not ConnectionState.CLOSED:
            data = await stream.receive_some(_RECEIVE_SIZE)
            ws.receive_data(data or None)
            for _ in ws.events():
                pass  # only the state matters: CLOSED once the client's close arrives
            if not data:
                return
