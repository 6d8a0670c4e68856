"""What the connections of one simulator share: settings, counters, faults."""

from __future__ import annotations

import math
import time
from typing import Protocol

import attrs
import trio

import engine

from ._config import SimulatorConfig
from ._history import History
from ._instruments import Instrument
from ._instruments import instruments as all_instruments
from ._rest import RestApp
from ._universe import universe
from ._weights import RequestWeights


class SessionHandle(Protocol):
    """A live WebSocket session, as the fault injector sees it."""

    def drop(self) -> None: ...

    def corrupt_next(self) -> None: ...

    def burst(self, count: int) -> None: ...

    @property
    def skipped(self) -> int: ...


# Keyword-only, so that given fields (no default) may follow counted ones.
@attrs.frozen(kw_only=True)
class SimulatorStatistics:
    """A snapshot of a simulator's counters.

    Attributes:
        connections_open: WebSocket connections streaming now.
        connections_total: WebSocket connections accepted with valid streams.
        connections_dropped: connections cut by :meth:`Simulator.drop_connections`.
        streams_rejected: connections closed at once for an unknown stream.
        messages_sent: stream messages sent, across all connections;
            counted as each burst is handed to the socket, so a client never
            has more (a dropped connection may cut the last burst short).
        messages_skipped: messages never sent because a connection fell
            more than a quarter second behind its schedule (a slow client).
        burst_messages: stream messages sent beyond the pace by
            :meth:`Simulator.burst` (also counted in ``messages_sent``).
        malformed_sent: deliberately broken frames sent.
        bytes_sent: WebSocket bytes of stream messages and broken frames.
        rest_requests: REST requests answered.
        stalled: whether a :meth:`Simulator.stall` is holding messages now.
    """

    connections_open: int = attrs.field(
        metadata=engine.gauge_metric("WebSocket connections streaming now")
    )
    connections_total: int = attrs.field(
        default=0,
        metadata=engine.counter_metric(
            "WebSocket connections accepted with valid streams", name="connections"
        ),
    )
    connections_dropped: int = attrs.field(
        default=0, metadata=engine.counter_metric("Connections cut on purpose")
    )
    streams_rejected: int = attrs.field(
        default=0, metadata=engine.counter_metric("Connections closed for an unknown stream")
    )
    messages_sent: int = attrs.field(
        default=0, metadata=engine.counter_metric("Stream messages sent")
    )
    messages_skipped: int = attrs.field(
        default=0, metadata=engine.counter_metric("Messages skipped for a slow client")
    )
    burst_messages: int = attrs.field(
        default=0, metadata=engine.counter_metric("Stream messages sent beyond the pace on purpose")
    )
    malformed_sent: int = attrs.field(
        default=0, metadata=engine.counter_metric("Broken frames sent on purpose")
    )
    bytes_sent: int = attrs.field(
        default=0, metadata=engine.counter_metric("Bytes of stream messages and broken frames")
    )
    rest_requests: int = attrs.field(
        default=0, metadata=engine.counter_metric("REST requests answered")
    )
    stalled: bool = attrs.field(metadata=engine.gauge_metric("1 while a stall holds messages"))


class Counters(engine.Tally[SimulatorStatistics]):
    """Running totals (private); ``Simulator.statistics()`` snapshots them."""


@attrs.define(eq=False)
class SharedState:
    """One simulator's settings, instruments, sessions and fault switches (private)."""

    config: SimulatorConfig
    instruments: dict[str, Instrument]
    rest: RestApp
    counters: Counters = attrs.Factory(Counters)
    sessions: set[SessionHandle] = attrs.Factory(set)
    stall_until: float = -math.inf
    # Replaced on every change of the stall, so waiting sessions re-check it.
    stall_changed: trio.Event = attrs.Factory(trio.Event)

    @classmethod
    def create(cls, config: SimulatorConfig, instruments: dict[str, Instrument]) -> SharedState:
        """The state of a simulator starting now."""
        anchor = config.epoch_ms if config.epoch_ms is not None else int(time.time() * 1000)
        history = History(config.seed, anchor)
        listed = dict(instruments)
        if config.universe > len(listed):
            names = universe(config.universe, seed=config.seed, first=config.symbols)
            listed.update(all_instruments(names[len(listed) :], config.seed))
        weights = RequestWeights(config.weight_limit)
        return cls(config, instruments, RestApp(history, listed, config.epoch_ms, weights))

    def stalled(self) -> bool:
        """Whether sessions must hold their data messages now."""
        return trio.current_time() < self.stall_until

    def set_stall(self, until: float) -> None:
        """Hold data messages until ``until`` (``trio.current_time()`` seconds)."""
        self.stall_until = until
        self.stall_changed.set()
        self.stall_changed = trio.Event()

    async def wait_stall(self) -> bool:
        """Wait out the current stall, if any; return whether there was one."""
        waited = False
        while self.stalled():
            waited = True
            with trio.move_on_at(self.stall_until):
                await self.stall_changed.wait()
        return waited
