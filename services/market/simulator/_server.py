"""``serve_simulator``: the listening socket, and the handle that injects faults."""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager

import attrs
import trio

from engine.lowlevel import attach_statistics, check_count, check_duration

from ._config import SimulatorConfig
from ._http import handle_connection
from ._instruments import instruments
from ._orderlog import write_order_log
from ._state import SharedState, SimulatorStatistics

logger = logging.getLogger("services.market.simulator")


@attrs.frozen
class SimulatorAddress:
    """Where a running simulator answers.

    Attributes:
        ws_url: the WebSocket base, ``ws://host:port``, like
            ``wss://stream.binance.com:9443``.
        rest_url: the REST base, ``http://host:port``, like
            ``https://api.binance.com``.
    """

    ws_url: str
    rest_url: str

    def combined_url(self, streams: Iterable[str]) -> str:
        """The URL of a combined stream: ``ws://.../stream?streams=a/b``."""
        return f"{self.ws_url}/stream?streams={'/'.join(streams)}"

    def raw_url(self, stream: str) -> str:
        """The URL of one raw stream: ``ws://.../ws/<stream>``."""
        return f"{self.ws_url}/ws/{stream}"


@attrs.define(eq=False)
class Simulator:
    """A running exchange simulator: its address, its counters, and fault switches.

    ``await nursery.start(serve_simulator, config)`` returns it. The fault
    methods act at once on every open connection; they are synchronous and
    never block.

    Attributes:
        config: the settings it runs with.
        address: where it answers.
        name: its name in statistics trees.
    """

    config: SimulatorConfig
    address: SimulatorAddress
    _state: SharedState = attrs.field(repr=False, alias="state")
    name: str = "simulator"

    @property
    def anchor_ms(self) -> int:
        """Where the REST history is anchored: the start time, or ``config.epoch_ms``."""
        return self._state.rest.history.anchor_ms

    def drop_connections(self) -> int:
        """Cut every open WebSocket connection without a close frame.

        Clients see the connection end abnormally (code 1006 in most
        libraries); new connections are accepted as before.

        Returns:
            How many connections were cut.
        """
        sessions = list(self._state.sessions)
        for session in sessions:
            session.drop()
        return len(sessions)

    def send_malformed(self) -> int:
        """Make the next frame on every open connection invalid JSON.

        The broken frame is a truncated copy of the next message, sent just
        before it; the message sequence itself is unchanged.

        Returns:
            How many connections will send one.
        """
        sessions = list(self._state.sessions)
        for session in sessions:
            session.corrupt_next()
        return len(sessions)

    def burst(self, count: int) -> int:
        """Send ``count`` stream messages beyond the pace, on every open connection.

        Each connection sends them as fast as its socket takes them, in
        writes of at most 512 messages (pings and requests are answered in
        between), besides the messages its pace makes due meanwhile; then it
        goes on at its pace, on the same schedule as before. They are the
        next messages of the connection's own sequence (trade ids stay
        consecutive), counted in ``messages_sent`` and ``burst_messages``.
        A :meth:`stall` holds a burst too: what is left of it goes out when
        the stall ends. Connections opened later get none; a second call
        adds to what is still owed.

        Args:
            count: messages per connection (>= 0).

        Returns:
            How many connections will send them.

        Raises:
            TypeError, ValueError: ``count`` is not a whole number >= 0.
        """
        check_count("count", count)
        sessions = list(self._state.sessions)
        for session in sessions:
            session.burst(count)
        return len(sessions)

    def stall(self, seconds: float) -> None:
        """Send no stream messages for ``seconds``, on every connection.

        Sockets stay open and pings and requests are still answered, as when
        an exchange's matching engine pauses. Connections opened meanwhile
        wait too. When the stall ends, each connection resumes its own
        sequence on a fresh schedule: the messages due during the stall are
        not sent in a burst afterwards. A second call replaces the first.

        Args:
            seconds: how long; ``math.inf`` until :meth:`resume`.

        Raises:
            TypeError, ValueError: ``seconds`` is not a positive duration.
        """
        check_duration("seconds", seconds)
        self._state.set_stall(trio.current_time() + seconds)

    def resume(self) -> None:
        """End a :meth:`stall` early (nothing happens if there is none)."""
        self._state.set_stall(-math.inf)

    def statistics(self) -> SimulatorStatistics:
        """A snapshot of the counters."""
        state = self._state
        counters = state.counters
        return counters.snapshot(
            connections_open=len(state.sessions),
            stalled=state.stalled(),
            # Skips of the sessions still open are theirs until they end.
            messages_skipped=counters.messages_skipped + sum(s.skipped for s in state.sessions),
        )


async def serve_simulator(
    config: SimulatorConfig | None = None,
    *,
    task_status: trio.TaskStatus[Simulator] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve Binance-format WebSocket streams and REST endpoints until cancelled.

    Start it with ``simulator = await nursery.start(serve_simulator, config)``.
    One port answers both: WebSocket streams at ``/ws/<stream>`` (raw) and
    ``/stream?streams=<a>/<b>`` (combined), REST at ``/api/v3/...``. Every
    connection gets its own message sequence, paced at ``config.rate``,
    determined by the seed and its stream list. Under a supervised child the
    simulator's statistics are listed under that child.

    Args:
        config: the settings; :class:`SimulatorConfig` defaults when omitted.
        task_status: receives the :class:`Simulator` once the port is bound.

    Raises:
        OSError: the address could not be bound.
    """
    config = config if config is not None else SimulatorConfig()
    listeners = await trio.open_tcp_listeners(config.port, host=config.host)
    if config.port == 0:
        # Several addresses (IPv4 and IPv6) would each get a different port.
        for extra in listeners[1:]:
            await extra.aclose()
        listeners = listeners[:1]
    state = SharedState.create(config, instruments(config.symbols, config.seed))
    simulator = Simulator(config, _address(config.host, listeners[0]), state=state)
    with attach_statistics(simulator):
        async with trio.open_nursery() as nursery:
            handler = functools.partial(handle_connection, state)
            await nursery.start(trio.serve_listeners, handler, listeners)
            if config.order_log is not None:
                await nursery.start(
                    functools.partial(
                        write_order_log,
                        config.order_log,
                        rate=config.order_log_rate,
                        seed=config.seed,
                        symbols=config.symbols,
                        epoch_ms=config.epoch_ms,
                    )
                )
            logger.info("exchange simulator on %s", simulator.address.rest_url)
            task_status.started(simulator)


@asynccontextmanager
async def open_simulator(config: SimulatorConfig | None = None) -> AsyncIterator[Simulator]:
    """Run a simulator for the duration of an ``async with`` block.

    Args:
        config: the settings; :class:`SimulatorConfig` defaults when omitted.

    Yields:
        The running :class:`Simulator`; it stops when the block exits.

    Raises:
        OSError: the address could not be bound.
    """
    async with trio.open_nursery() as nursery:
        simulator = await nursery.start(serve_simulator, config)
        try:
            yield simulator
        finally:
            nursery.cancel_scope.cancel()


def _address(host: str, listener: trio.SocketListener) -> SimulatorAddress:
    bound = listener.socket.getsockname()
    shown = f"[{bound[0]}]" if ":" in bound[0] else bound[0]
    return SimulatorAddress(f"ws://{shown}:{bound[1]}", f"http://{shown}:{bound[1]}")
