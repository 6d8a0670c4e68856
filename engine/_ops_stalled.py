"""The ops port served from the loop watch thread while the event loop is stalled.

The ops server's listening socket is shared by two acceptors. While the loop
turns, hypercorn (in the loop) accepts every connection at once and the
thread never touches the socket. While the loop is stalled nobody in the
loop can accept, so the watch thread does: it takes each pending
connection, reads the request with the standard library's
:class:`http.server.BaseHTTPRequestHandler` (no hand-written HTTP), and
answers ``503`` with the stall in words and as JSON, whatever the path.
A probe therefore gets a truthful answer within ``threshold`` plus a poll
instead of timing out. Connections hypercorn had already accepted before
the stall wait for the loop, like every request on a stalled server: probes
open a new connection per request (the kubelet does).
"""

from __future__ import annotations

import contextlib
import http.server
import logging
import select
import socket
import socketserver
from collections.abc import Callable

from ._loopwatch import LoopStall, LoopWatch

logger = logging.getLogger("engine.ops")

# A client gets this long to send its request; the loop is stalled, so a slow
# client must not keep the next probe waiting for long.
_READ_TIMEOUT = 0.5


class _Server(socketserver.BaseServer):
    """What the request handler sees as its server: the body to answer with."""

    def __init__(self, address: tuple[str, int], body: bytes) -> None:
        super().__init__(address, _StalledHandler)
        self.body = body


class _StalledHandler(http.server.BaseHTTPRequestHandler):
    """Answers every GET or HEAD with 503 and the stall; other methods get 501."""

    protocol_version = "HTTP/1.0"  # one request per connection, then close
    # Not HTTP/0.9: a garbled request line still gets a status line and headers.
    default_request_version = "HTTP/1.0"
    server_version = "engine-ops"
    timeout = _READ_TIMEOUT

    def do_GET(self) -> None:
        self._answer(with_body=True)

    def do_HEAD(self) -> None:
        self._answer(with_body=False)

    def _answer(self, *, with_body: bool) -> None:
        assert isinstance(self.server, _Server)
        body = self.server.body
        self.send_response(503)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        if with_body:
            self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        # The stdlib writes to stderr; the engine logs instead, quietly.
        logger.debug("stall answer: " + format, *args)


class StallAnswerer:
    """The :attr:`LoopWatch.on_stalled` hook of an ops server.

    Args:
        sock: the ops server's listening socket (non-blocking).
        watch: the loop watch whose thread calls this.
        body: builds the JSON body for a stall.
    """

    def __init__(
        self, sock: socket.socket, watch: LoopWatch, body: Callable[[LoopStall], bytes]
    ) -> None:
        self._sock = sock
        self._watch = watch
        self._body = body
        self.answered = 0

    def __call__(self, wait: float) -> None:
        """Answer the connections pending now, or wait up to ``wait`` for one."""
        try:
            ready, _, _ = select.select([self._sock], [], [], wait)
        except (OSError, ValueError):
            return  # the socket was closed under us: the server is going away
        while ready:
            stall = self._watch.current_stall()
            if stall is None:
                return  # the loop turns again; hypercorn takes over
            try:
                conn, address = self._sock.accept()
            except OSError:  # BlockingIOError when the loop took it first
                return
            self.answered += 1
            self._answer(conn, address, stall)

    def _answer(self, conn: socket.socket, address: tuple[str, int], stall: LoopStall) -> None:
        server = _Server(self._sock.getsockname()[:2], self._body(stall))
        with conn:
            try:
                _StalledHandler(conn, address, server)
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_WR)
            except OSError as exc:  # the client went away: nothing to answer
                logger.debug("stall answer to %s failed: %s", address, exc)
