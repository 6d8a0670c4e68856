"""The broadcast server: one bus subscription, many WebSocket clients."""

from __future__ import annotations

import collections
import contextlib
import itertools
import logging
import math
from collections.abc import Awaitable, Callable
from typing import Protocol, runtime_checkable

import attrs
import trio
from wsproto.events import Request

from .._channels import ReceiveChannel, SendChannel, open_channel
from .._counters import counter_metric, gauge_metric
from .._health import SourceHealth
from .._runtime import Shutdown
from .._stopping import child_stop
from ..bus import Bus, BusMessage, Subscription
from ._client import DROP_REASONS, Client, ClientStatistics
from ._config import CLOSE_GOING_AWAY, BroadcastConfig, FrameType
from ._fanout import Fanout
from ._handshake import (
    Rejection,
    accept_bytes,
    admit,
    receive_request,
    refuse_at_once,
    reject_bytes,
)

logger = logging.getLogger("engine.broadcast")


INBOX_SIZE = 4096
"""Bus messages between the bus subscriptions and the dispatcher (which never waits)."""
MAX_DISPATCH = 1024
"""Bus messages framed and handed to the clients in one go at most."""
LINGER = 0.0005
"""Seconds a dispatch may wait for more messages while they keep arriving."""
MAX_REFUSING = 64
"""Connections refused at accept being answered at once; past that, closed unanswered."""
RETRY_AFTER = ((b"retry-after", b"5"),)


def lag_check_period(max_lag: float) -> float:
    """Seconds between two checks of the clients' lag: a quarter of ``max_lag``, at most 1."""
    return min(1.0, max_lag / 4)


async def _forward_all(inbox: SendChannel[BusMessage], batch: list[BusMessage]) -> None:
    for message in batch:
        try:
            inbox.send_nowait(message)  # no coroutine per message
        except trio.WouldBlock:
            await inbox.send(message)


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


@runtime_checkable
class _Batched(Protocol):
    def receive_batch(self, max_items: int) -> Awaitable[list[BusMessage]]: ...


@attrs.frozen
class BroadcastStatistics:
    """A snapshot of a broadcast server. Totals include clients already gone.

    Attributes:
        name: the server's name.
        url: where clients connect.
        clients: clients connected now.
        peak_clients: the most ever connected at once.
        handshaking: connections still in the HTTP upgrade.
        accepted: upgrades accepted.
        rejected: refused connections by reason (``unauthorized``,
            ``origin``, ``full``, ``bad_topics``, ``too_many_topics``,
            ``unknown_topics``, ``not_found``, ``bad_request``, ...; and
            ``per_ip`` and ``busy``, answered as soon as they were accepted).
        disconnected: closes by cause (``client_closed``, ``too_slow``,
            ``message_too_big``, ``ping_timeout``, ``protocol_error``,
            ``policy``, ``rate_limited``, ``shutdown``, ``connection_lost``),
            counted when the close starts; the client stays in ``clients``
            until it is gone.
        slow_disconnects: clients closed for falling more than ``max_lag``
            behind (or losing more than ``max_lost``).
        aborted: closes whose handshake did not finish within
            ``close_timeout`` (the TCP connection was dropped).
        received: bus messages the server took.
        unrouted: of those, messages no client wanted.
        invalid: of those, payloads that could not be framed (not UTF-8).
        offered: frames offered to clients; at every moment
            ``offered == sent + dropped + queued``.
        queued: frames the connected clients have not been sent yet.
        sent: frames written to clients.
        dropped_by_reason: frames clients will never get, by reason:
            ``overflow`` (a full client queue discarded its oldest) and
            ``closed`` (still queued when a connection ended). Their sum is
            the property ``dropped``.
        writes: socket writes; ``sent / writes`` is the coalescing factor.
        bytes_sent: bytes written to clients.
        connections: one snapshot per connected client.
    """

    name: str
    url: str
    clients: int = attrs.field(metadata=gauge_metric("Clients connected now"))
    peak_clients: int = attrs.field(metadata=gauge_metric("Most clients at once"))
    handshaking: int = attrs.field(metadata=gauge_metric("Connections in the upgrade"))
    accepted: int = attrs.field(metadata=counter_metric("Upgrades accepted"))
    rejected: dict[str, int] = attrs.field(
        metadata=counter_metric("Connections refused, by reason", label="reason")
    )
    disconnected: dict[str, int] = attrs.field(
        metadata=counter_metric("Clients closed, by cause", label="cause")
    )
    slow_disconnects: int = attrs.field(
        metadata=counter_metric("Clients closed for falling behind")
    )
    aborted: int = attrs.field(
        metadata=counter_metric("Closes whose handshake did not finish in time")
    )
    received: int = attrs.field(metadata=counter_metric("Bus messages taken"))
    unrouted: int = attrs.field(metadata=counter_metric("Bus messages no client wanted"))
    invalid: int = attrs.field(metadata=counter_metric("Payloads that could not be framed"))
    offered: int = attrs.field(metadata=counter_metric("Frames offered to clients"))
    queued: int = attrs.field(metadata=gauge_metric("Frames offered and not written yet"))
    sent: int = attrs.field(metadata=counter_metric("Frames written to clients"))
    dropped_by_reason: dict[str, int] = attrs.field(
        metadata=counter_metric("Frames never sent, by reason", label="reason", name="dropped")
    )
    writes: int = attrs.field(metadata=counter_metric("Socket writes to clients"))
    bytes_sent: int = attrs.field(
        metadata=counter_metric("Bytes written to clients", name="sent_bytes")
    )
    connections: tuple[ClientStatistics, ...]

    @property
    def dropped(self) -> int:
        """Frames clients will never get, for every reason: ``offered - sent - queued``."""
        return sum(self.dropped_by_reason.values())


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
    _accepted: int = attrs.field(default=0, init=False)
    _refusing: int = attrs.field(default=0, init=False)  # 503s at accept under way
    _peak: int = attrs.field(default=0, init=False)
    _aborted: int = attrs.field(default=0, init=False)
    _rejected: collections.Counter[str] = attrs.field(factory=collections.Counter, init=False)
    _disconnected: collections.Counter[str] = attrs.field(factory=collections.Counter, init=False)
    # Connections per IP address, from accept to close, open or still in the
    # upgrade (an address leaves when its count is 0).
    _per_ip: collections.Counter[str] = attrs.field(factory=collections.Counter, init=False)
    # Counters of clients already gone, so totals survive them.
    _gone: collections.Counter[str] = attrs.field(factory=collections.Counter, init=False)

    # Cancelled by abort(): the bus intake and the accept loop stop at once.
    _serving: trio.CancelScope = attrs.field(factory=trio.CancelScope, init=False)
    # close() cancels the intake's waits: it hands on what the subscriptions
    # already hold, then ends, and the clients are closed after it.
    _draining: bool = attrs.field(default=False, init=False)
    _intake_waits: set[trio.CancelScope] = attrs.field(factory=set, init=False)

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
        connections = tuple(client.statistics() for client in self._fanout.clients)
        fanout = self._fanout
        # A close is counted from the moment it starts: it is decided, and
        # the client gets nothing more, though the handshake may still run.
        disconnected = self._disconnected.copy()
        disconnected.update(c.cause for c in self._fanout.clients if c.cause is not None)

        def total(field: str) -> int:
            return self._gone[field] + sum(int(getattr(c, field)) for c in connections)

        dropped = {
            reason: self._gone[f"dropped_{reason}"]
            + sum(c.dropped_by_reason[reason] for c in connections)
            for reason in DROP_REASONS
        }

        return BroadcastStatistics(
            name=self.name,
            url=self.url,
            clients=len(connections),
            peak_clients=self._peak,
            handshaking=len(self._connections) - len(connections),
            accepted=self._accepted,
            rejected=dict(self._rejected),
            disconnected=dict(disconnected),
            slow_disconnects=disconnected["too_slow"],
            aborted=self._aborted,
            received=fanout.received,
            unrouted=fanout.unrouted,
            invalid=fanout.invalid,
            offered=total("offered"),
            queued=sum(c.queued for c in connections),
            sent=total("sent"),
            dropped_by_reason=dropped,
            writes=total("writes"),
            bytes_sent=total("bytes_sent"),
            connections=connections,
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
        self._draining = True
        for scope in self._intake_waits:
            scope.cancel()

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
                        for subscription in subscriptions:
                            pumps.start_soon(self._intake, subscription, inbox.clone())
                        pumps.start_soon(self._dispatch, outbox)
                        task_status.started(self)
                    if not self._draining:
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

    async def _intake(self, subscription: Subscription, inbox: SendChannel[BusMessage]) -> None:
        """Forward the subscription's messages until it ends or :meth:`close` drains it."""
        async with inbox:
            receive = _batch_receiver(subscription)
            while not self._draining:
                with trio.CancelScope() as wait:
                    self._intake_waits.add(wait)
                    try:
                        batch = await receive()
                    except (trio.EndOfChannel, StopAsyncIteration):
                        return
                    finally:
                        self._intake_waits.discard(wait)
                if wait.cancelled_caught:
                    break  # close(): nothing was taken by the cancelled wait
                await _forward_all(inbox, batch)
            # Draining: hand on what the subscription already holds. At most a
            # queue's worth: on a bus others still publish to (a relay), the
            # queue refills as it is read, and the drain must end.
            take_nowait = getattr(subscription, "receive_batch_nowait", None)
            left = self.config.bus_queue_size
            while take_nowait is not None and left > 0:
                try:
                    batch = take_nowait(min(INBOX_SIZE, left))
                except (trio.WouldBlock, trio.EndOfChannel):
                    return
                left -= len(batch)
                await _forward_all(inbox, batch)

    async def _dispatch(self, inbox: ReceiveChannel[BusMessage]) -> None:
        dispatch = self._fanout.dispatch
        # A dispatch larger than a client's queue would make even a client
        # that keeps up lose messages: its writer runs only after it.
        limit = min(MAX_DISPATCH, self.config.queue_size)
        while True:
            try:
                batch = await inbox.receive_batch(limit)
            except trio.EndOfChannel:
                return
            if len(batch) < limit:
                await _linger(inbox, batch, limit)
            dispatch(batch)
            for message in batch:  # at most once to the clients; acked once handed on
                await message.ack()

    async def _handle(self, stream: trio.SocketStream) -> None:
        if self._closing:
            await trio.aclose_forcefully(stream)
            return
        client = Client(stream, self.config, next(self._ids), self._fanout.update)
        refused = self._refuse_at_accept(client)
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
                    self._rejected["handshake_timeout"] += 1
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

    def _refuse_at_accept(self, client: Client) -> Rejection | None:
        """Why a connection just accepted is refused at once, or ``None`` to serve it."""
        limit = self.config.max_handshaking
        if len(self._connections) - len(self._fanout) >= limit:
            message = f"at most {limit} connections in the upgrade"
            return Rejection(503, "busy", message, RETRY_AFTER)
        per_ip = self.config.max_clients_per_ip
        if per_ip is not None and client.host is not None and self._per_ip[client.host] >= per_ip:
            return Rejection(
                503, "per_ip", f"at most {per_ip} connections per address", RETRY_AFTER
            )
        return None

    async def _answer_at_accept(self, stream: trio.SocketStream, rejection: Rejection) -> None:
        """Count a refusal at accept, answer it unless too many are under way, and close.

        Answered before its request is read, it holds nothing for
        ``handshake_timeout``; the answers under way are bounded too.
        """
        self._rejected[rejection.reason] += 1
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
        verdict = request if isinstance(request, Rejection) else self._admit(request)
        if isinstance(verdict, Rejection):
            self._rejected[verdict.reason] += 1
            client.cause = "rejected"
            logger.debug("%s: refused %s: %s", self.name, client.peer, verdict.message)
            response = reject_bytes(client.ws, verdict)
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await client.stream.send_all(response)
            return
        client.open(verdict)
        self._fanout.add(client)
        self._accepted += 1
        self._peak = max(self._peak, len(self._fanout))
        try:
            await client.stream.send_all(accept_bytes(client.ws))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            client.cause = "connection_lost"
            return
        await client.run()

    def _admit(self, request: Request) -> tuple[str, ...] | Rejection:
        if self._closing:
            return Rejection(503, "shutting_down", "the server is shutting down")
        verdict = admit(request, self.config)
        if not isinstance(verdict, Rejection) and len(self._fanout) >= self.config.max_clients:
            message = f"at most {self.config.max_clients} clients"
            return Rejection(503, "full", message, RETRY_AFTER)
        return verdict

    def _retire(self, client: Client) -> None:
        self._fanout.remove(client)
        client.discard()  # what was still queued is dropped, as "closed"
        stats = client.statistics()
        for field in ("offered", "sent", "writes", "bytes_sent"):
            self._gone[field] += getattr(stats, field)
        for reason, count in stats.dropped_by_reason.items():
            self._gone[f"dropped_{reason}"] += count
        cause = client.cause or "connection_lost"
        self._disconnected[cause] += 1
        self._aborted += client.aborted
        if cause == "too_slow":
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
