"""The broadcast server: one bus subscription, many WebSocket clients."""

from __future__ import annotations

import collections
import contextlib
import itertools
import logging
import math

import attrs
import trio

from .._channels import open_channel
from .._health import SourceHealth
from .._runtime import Shutdown
from .._stopping import child_stop
from ..bus import Bus, BusMessage, Subscription
from ._client import Client
from ._config import CLOSE_GOING_AWAY, BroadcastConfig, FrameType
from ._fanout import Fanout
from ._handshake import (
    Rejection,
    accept_bytes,
    admit_client,
    receive_request,
    refusal_at_accept,
    refuse_at_once,
    reject_bytes,
)
from ._pump import INBOX_SIZE, MAX_DISPATCH, Drain, dispatch, intake
from ._server_stats import BroadcastStatistics, ServerCounts

logger = logging.getLogger("engine.broadcast")


MAX_REFUSING = 64
"""Connections refused at accept being answered at once; past that, closed unanswered."""


def lag_check_period(max_lag: float) -> float:
    """Seconds between two checks of the clients' lag: a quarter of ``max_lag``, at most 1."""
    return min(1.0, max_lag / 4)


@attrs.define(eq=False)
class BroadcastServer:
    """What ``await nursery.start(serve_broadcast, bus, config)`` returns.

    Attributes:
        config: its settings.
        host: the bound address.
        port: the bound port (the real one when 0 was asked for).
    """

    config: BroadcastConfig
    host: str
    port: int
    _fanout: Fanout[Client] = attrs.field(init=False)
    _connections: set[Client] = attrs.field(factory=set, init=False)
    _ids: itertools.count[int] = attrs.field(factory=lambda: itertools.count(1), init=False)
    _closing: bool = attrs.field(default=False, init=False)
    _all_gone: trio.Event = attrs.field(factory=trio.Event, init=False)
    _counts: ServerCounts = attrs.field(factory=ServerCounts, init=False)
    _refusing: int = attrs.field(default=0, init=False)  # 503s at accept under way
    # Connections per IP address, from accept to close, open or still in the
    # upgrade (an address leaves when its count is 0).
    _per_ip: collections.Counter[str] = attrs.field(factory=collections.Counter, init=False)

    # Cancelled by abort(): the bus intake and the accept loop stop at once.
    _serving: trio.CancelScope = attrs.field(factory=trio.CancelScope, init=False)
    # close() cancels the intake's waits: it hands on what the subscriptions
    # already hold, then ends, and the clients are closed after it.
    _drain: Drain = attrs.field(factory=Drain, init=False)

    def __attrs_post_init__(self) -> None:
        self._fanout = Fanout(text=self.config.frame == FrameType.TEXT)

    @property
    def name(self) -> str:
        """The configured name (for the ops server's listings)."""
        return self.config.name

    @property
    def url(self) -> str:
        """The WebSocket URL clients connect to, such as ``ws://127.0.0.1:54321/ws``."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"ws://{host}:{self.port}{self.config.path}"

    def statistics(self) -> BroadcastStatistics:
        """A frozen snapshot of the server and each connected client."""
        return self._counts.snapshot(
            self.name,
            self.url,
            self._fanout,
            handshaking=len(self._connections) - len(self._fanout.clients),
        )

    def health(self) -> SourceHealth:
        """``serving``, or ``closing`` once closed; with the open connections."""
        state = "closing" if self._closing else "serving"
        return SourceHealth(state, detail={"connections": len(self._fanout.clients)})

    def close(self) -> None:
        """Close every client with 1001 "going away", after what it is owed.

        The server stops reading the bus: what its subscriptions already
        hold is handed to the clients' queues, and what is queued for a
        client goes out before its close frame. Each connection gets
        ``close_timeout`` for that and its close handshake. New connections
        are refused meanwhile. :meth:`wait_closed` waits for the last one,
        and :func:`serve_broadcast` returns then. (Cancelling the server
        closes the clients the same way but drops what the bus still held.)
        """
        self._closing = True
        self._drain.start()

    async def wait_closed(self) -> None:
        """Wait until :meth:`close` (or a cancel) has ended every connection."""
        await self._all_gone.wait()

    def abort(self) -> None:
        """Drop every connection now, without a close handshake: for a forced stop."""
        self._closing = True
        self._serving.cancel()
        for client in list(self._connections):
            client.scope.cancel()
        self._check_all_gone()

    def _check_all_gone(self) -> None:
        if self._closing and not self._connections:
            self._all_gone.set()

    # -- serving --------------------------------------------------------------

    async def _serve(
        self,
        listeners: list[trio.SocketListener],
        subscriptions: list[Subscription],
        task_status: trio.TaskStatus[BroadcastServer],
    ) -> None:
        async with trio.open_nursery() as nursery:
            accepting = trio.CancelScope()

            async def accept() -> None:
                with accepting:
                    await trio.serve_listeners(self._handle, listeners, handler_nursery=nursery)

            nursery.start_soon(accept)
            watching = trio.CancelScope()
            if math.isfinite(self.config.max_lag):
                nursery.start_soon(self._watch_lag, watching)
            stop = child_stop()  # a supervised child drains when asked to stop
            stopping = trio.CancelScope()
            if stop is not None:
                nursery.start_soon(self._close_on, stop, stopping)
            try:
                inbox, outbox = open_channel[BusMessage](INBOX_SIZE)
                with self._serving:
                    async with trio.open_nursery() as pumps, inbox:
                        limit = self.config.bus_queue_size
                        for subscription in subscriptions:
                            pumps.start_soon(
                                intake, subscription, inbox.clone(), self._drain, limit
                            )
                        # A dispatch larger than a client's queue would make even a
                        # client that keeps up lose messages: its writer runs after it.
                        dispatch_limit = min(MAX_DISPATCH, self.config.queue_size)
                        pumps.start_soon(dispatch, outbox, self._fanout, dispatch_limit)
                        task_status.started(self)
                    if not self._drain.draining:
                        logger.info("%s: the bus closed; closing every client", self.name)
            finally:
                accepting.cancel()
                watching.cancel()
                stopping.cancel()
                self._shut_down()

    def _shut_down(self) -> None:
        self._closing = True
        self._check_all_gone()
        for client in list(self._connections):
            if client.is_open:
                # What is queued still goes out first, within close_timeout.
                client.request_close(
                    CLOSE_GOING_AWAY, "server shutting down", "shutdown", flush=True
                )
            else:
                client.scope.cancel()

    async def _close_on(self, stop: Shutdown, scope: trio.CancelScope) -> None:
        with scope:
            await stop.wait()
            logger.info("%s: asked to stop (%s); closing every client", self.name, stop.reason)
            self.close()

    async def _watch_lag(self, scope: trio.CancelScope) -> None:
        """Close each client whose oldest unwritten frame is older than ``max_lag``."""
        max_lag = self.config.max_lag
        with scope:
            while True:
                await trio.sleep(lag_check_period(max_lag))
                now = trio.current_time()
                for client in self._fanout.clients:
                    client.check_lag(now)

    async def _handle(self, stream: trio.SocketStream) -> None:
        if self._closing:
            await trio.aclose_forcefully(stream)
            return
        client = Client(stream, self.config, next(self._ids), self._fanout.update)
        same_address = None if client.host is None else self._per_ip[client.host]
        handshaking = len(self._connections) - len(self._fanout)
        refused = refusal_at_accept(self.config, handshaking, same_address)
        if refused is not None:
            await self._answer_at_accept(stream, refused)
            return
        self._connections.add(client)
        if client.host is not None:
            self._per_ip[client.host] += 1
        try:
            with client.scope:
                client.scope.deadline = trio.current_time() + self.config.handshake_timeout
                await self._upgrade(client)
            if client.scope.cancelled_caught:
                if client.is_open:
                    client.aborted = True
                elif not self._closing and client.cause is None:
                    self._counts.rejected["handshake_timeout"] += 1
        finally:
            self._connections.discard(client)
            if client.host is not None:
                self._per_ip[client.host] -= 1
                if not self._per_ip[client.host]:
                    del self._per_ip[client.host]
            if client.is_open:
                self._retire(client)
            await trio.aclose_forcefully(stream)
            self._check_all_gone()

    async def _answer_at_accept(self, stream: trio.SocketStream, rejection: Rejection) -> None:
        """Count a refusal at accept, answer it unless too many are under way, and close.

        Answered before its request is read, it holds nothing for
        ``handshake_timeout``; the answers under way are bounded too.
        """
        self._counts.rejected[rejection.reason] += 1
        try:
            if self._refusing < MAX_REFUSING:
                self._refusing += 1
                try:
                    await refuse_at_once(stream, rejection)
                finally:
                    self._refusing -= 1
        finally:
            await trio.aclose_forcefully(stream)

    async def _upgrade(self, client: Client) -> None:
        request = await receive_request(client.stream, client.ws)
        if request is None:
            return
        verdict = (
            request
            if isinstance(request, Rejection)
            else admit_client(request, self.config, self._closing, len(self._fanout))
        )
        if isinstance(verdict, Rejection):
            self._counts.rejected[verdict.reason] += 1
            client.cause = "rejected"
            logger.debug("%s: refused %s: %s", self.name, client.peer, verdict.message)
            response = reject_bytes(client.ws, verdict)
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await client.stream.send_all(response)
            return
        client.open(verdict)
        self._fanout.add(client)
        self._counts.accepted += 1
        self._counts.peak = max(self._counts.peak, len(self._fanout))
        try:
            await client.stream.send_all(accept_bytes(client.ws))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            client.cause = "connection_lost"
            return
        await client.run()

    def _retire(self, client: Client) -> None:
        self._fanout.remove(client)
        client.discard()  # what was still queued is dropped, as "closed"
        stats = self._counts.retire(client)
        if client.cause == "too_slow":
            logger.info(
                "%s: closed slow client %s (%d dropped)", self.name, client.peer, stats.dropped
            )


async def serve_broadcast(
    bus: Bus,
    config: BroadcastConfig | None = None,
    *,
    task_status: trio.TaskStatus[BroadcastServer] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve bus messages to WebSocket clients until cancelled or the bus closes.

    Start it with ``server = await nursery.start(serve_broadcast, bus, config)``.
    The server subscribes to ``config.bus_topics`` once; each client chooses
    among those topics with the query string (``/ws?topics=trades``,
    ``/ws?topics=book&symbols=BTCUSDT``) or with subscribe messages
    (``{"op": "subscribe", "topics": ["trades.ETHUSDT"]}``).

    Each client has its own bounded queue; a client whose oldest unwritten
    message is more than ``max_lag`` seconds old is closed with
    ``CLOSE_TOO_SLOW``, and a full queue drops its oldest messages.
    Publishing on the bus never waits for a client.

    Cancellation:
        Cancelling it, the bus closing, or ``server.close()`` closes every
        client with 1001 "going away"; it returns once they have answered,
        or ``close_timeout`` has passed. After ``server.abort()`` it
        returns at once.

    Args:
        bus: where the messages come from (``engine.bus.MemoryBus`` or an adapter).
        config: the settings; the defaults serve ``/ws`` on 127.0.0.1, a free port.
        task_status: reports the :class:`BroadcastServer` once it listens.

    Raises:
        OSError: the address cannot be bound.
    """
    config = config if config is not None else BroadcastConfig()
    async with contextlib.AsyncExitStack() as stack:
        subscriptions = [
            await stack.enter_async_context(
                bus.subscribe(pattern, maxsize=config.bus_queue_size, overflow="drop_oldest")
            )
            for pattern in config.bus_topics
        ]
        listeners = await trio.open_tcp_listeners(config.port, host=config.host)
        for listener in listeners:
            stack.push_async_callback(listener.aclose)
        host, port = listeners[0].socket.getsockname()[:2]
        server = BroadcastServer(config, host, port)
        await server._serve(listeners, subscriptions, task_status)
