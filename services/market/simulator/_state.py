"""What the connections of one simulator share: settings, counters, faults."""

from __future__ import annotations

import math
import time
from typing import Protocol

import attrs
import trio

from ._config import SimulatorConfig
from ._history import History
from ._instruments import Instrument
from ._rest import RestApp


class SessionHandle(Protocol):
    """A live WebSocket session, as the fault injector sees it."""

    def drop(self) -> None: ...

    def corrupt_next(self) -> None: ...

    @property
    def skipped(self) -> int: ...


@attrs.define(eq=False)
class Counters:
    """Running totals (private); ``Simulator.statistics()`` snapshots them."""

    connections_total: int = 0
    connections_dropped: int = 0
    streams_rejected: int = 0
    messages_sent: int = 0
    messages_skipped: int = 0
    malformed_sent: int = 0
    bytes_sent: int = 0
    rest_requests: int = 0


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
        return cls(config, instruments, RestApp(history, instruments, config.epoch_ms))

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
