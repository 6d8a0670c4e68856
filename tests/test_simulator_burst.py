"""``Simulator.burst``: messages beyond the pace, in capped writes, then the pace again.

The schedule is tested exactly under the autojump clock, on a session whose
socket is a fake that notes each write and when it came. Delivery, order and
interleaved pings are tested on a real simulator on 127.0.0.1 port 0 under an
absolute ``trio.fail_after`` guard.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, cast

import pytest
import trio
import trio.testing
from trio_websocket import WebSocketConnection, open_websocket_url
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, Ping, Pong, Request, TextMessage
from wsproto.frame_protocol import FrameProtocol

from services.market.simulator import (
    Simulator,
    SimulatorAddress,
    SimulatorConfig,
    open_simulator,
)
from services.market.simulator._instruments import instruments
from services.market.simulator._pacing import Pacer
from services.market.simulator._session import MAX_BURST, Session
from services.market.simulator._state import SharedState
from services.market.simulator._streams import parse_streams
from services.market.simulator._tape import Tape

EPOCH = 1_700_000_000_000
GUARD = 10  # seconds of real time any socket test may take


class _Wire:
    """A socket as a session sees it: each write is noted with its time, then a checkpoint."""

    def __init__(self, write_time: float = 0.0) -> None:
        self.write_time = write_time  # how long each write takes (a slow client)
        self.writes: list[tuple[float, list[str]]] = []
        self.on_write: Callable[[], None] | None = None  # called once, after the next write
        self._frames = FrameProtocol(client=True, extensions=[])

    async def send_all(self, data: bytes) -> None:
        self._frames.receive_bytes(data)
        texts = [str(frame.payload) for frame in self._frames.received_frames()]
        self.writes.append((trio.current_time(), texts))
        on_write, self.on_write = self.on_write, None
        if on_write is not None:
            on_write()
        await trio.sleep(self.write_time)

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        await trio.sleep_forever()
        raise AssertionError("unreachable")  # pragma: no cover

    def counts(self, start: float, end: float) -> list[int]:
        """The messages of each write made in ``[start, end)``."""
        return [len(texts) for at, texts in self.writes if start <= at < end]

    def trade_ids(self) -> list[int]:
        return [json.loads(text)["t"] for _, texts in self.writes for text in texts]


def _session(rate: float, write_time: float = 0.0) -> tuple[Simulator, Session, _Wire]:
    """A simulator with one ``btcusdt@trade`` session on a fake socket (not yet running)."""
    config = SimulatorConfig(symbols=("BTCUSDT",), rate=rate, epoch_ms=EPOCH)
    state = SharedState.create(config, instruments(config.symbols, config.seed))
    simulator = Simulator(config, SimulatorAddress("ws://-", "http://-"), state=state)
    specs = parse_streams(["btcusdt@trade"], state.instruments)
    tape = Tape(config.seed, specs, combined=False, epoch_ms=EPOCH, rate=rate)
    wire = _Wire(write_time)
    ws = WSConnection(ConnectionType.SERVER)
    session = Session(state, cast(trio.SocketStream, wire), ws, tape, Pacer(rate, MAX_BURST))
    return simulator, session, wire


def _consecutive(ids: list[int]) -> bool:
    return ids == list(range(ids[0], ids[0] + len(ids)))


# --- The schedule, exactly -------------------------------------------------------


async def test_the_pacer_says_what_is_due_without_waiting(autojump_clock: object) -> None:
    pacer = Pacer(1000.0, max_burst=100)
    pacer.restart()
    start = trio.current_time()
    assert pacer.due() == 0
    await trio.sleep(0.0105)
    assert pacer.due() == 10
    pacer.sent(10)
    assert pacer.due() == 0
    await trio.sleep(1.0)  # 1,000 due: only the last 250 ms are kept, as in next_burst
    assert pacer.due() == 250
    assert pacer.skipped == 750
    assert trio.current_time() - start == pytest.approx(1.0105, abs=1e-9)
    assert Pacer(math.inf, max_burst=100).due() == 0  # nothing is owed without a limit


async def test_a_burst_goes_out_at_once_in_capped_writes_then_the_pace_resumes(
    autojump_clock: object,
) -> None:
    simulator, session, wire = _session(rate=1000.0)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(session.run)
        await trio.testing.wait_all_tasks_blocked()
        start = trio.current_time()
        await trio.sleep(0.1005)  # 100 paced messages; the writer waits for the 101st
        assert simulator.burst(2000) == 1
        burst_at = trio.current_time()
        await trio.sleep(1.0)
        during = simulator.statistics()
        nursery.cancel_scope.cancel()
    assert wire.counts(start, burst_at) == [1] * 100
    # At once, without waiting for the pace, in writes of at most MAX_BURST.
    assert wire.counts(burst_at, burst_at + 1e-9) == [512, 512, 512, 464]
    # Then the pace, on its old schedule: one message a millisecond from 0.101.
    assert wire.counts(burst_at + 1e-9, math.inf) == [1] * 1000
    assert during.burst_messages == 2000
    assert during.messages_sent == 3100
    assert _consecutive(wire.trade_ids())


async def test_paced_messages_go_first_so_a_burst_never_makes_the_pace_skip(
    autojump_clock: object,
) -> None:
    # Each write takes 0.2 s: the pace alone is 200 messages a write, and a
    # burst that went first would leave the pace behind until it skipped.
    simulator, session, wire = _session(rate=1000.0, write_time=0.2)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(session.run)
        await trio.testing.wait_all_tasks_blocked()
        start = trio.current_time()
        await trio.sleep(0.1)  # the first message is being written
        simulator.burst(2000)
        await trio.sleep(2.0)
        stats = simulator.statistics()
        nursery.cancel_scope.cancel()
    # 200 due, then 312 of the burst, in each write: the pace never fell behind.
    assert wire.counts(start, start + 1.3) == [1, 512, 512, 512, 512, 512, 512]
    assert stats.burst_messages == 2000
    assert stats.messages_skipped == 0


async def test_a_burst_during_a_stall_waits_for_the_stall(autojump_clock: object) -> None:
    simulator, session, wire = _session(rate=1000.0)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(session.run)
        await trio.testing.wait_all_tasks_blocked()
        simulator.stall(1.0)
        stalled_at = trio.current_time()
        assert simulator.burst(700) == 1
        await trio.sleep(0.5)
        assert simulator.statistics().messages_sent == 0
        await trio.sleep(0.6005)
        stats = simulator.statistics()
        nursery.cancel_scope.cancel()
    resumed_at = stalled_at + 1.0
    assert wire.counts(stalled_at, resumed_at) == []
    assert wire.counts(resumed_at, resumed_at + 1e-9) == [512, 188]
    # After the stall, the fresh schedule: 100 paced messages in 0.1 s.
    assert wire.counts(resumed_at + 1e-9, math.inf) == [1] * 100
    assert stats.burst_messages == 700
    assert _consecutive(wire.trade_ids())


async def test_a_stall_holds_the_rest_of_a_burst(autojump_clock: object) -> None:
    simulator, session, wire = _session(rate=1000.0)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(session.run)
        await trio.testing.wait_all_tasks_blocked()
        burst_at = trio.current_time()
        wire.on_write = functools.partial(simulator.stall, 0.2)
        simulator.burst(1000)
        await trio.sleep(0.1)
        held = simulator.statistics()
        await trio.sleep(0.2)
        stats = simulator.statistics()
        nursery.cancel_scope.cancel()
    assert held.burst_messages == 512
    assert wire.counts(burst_at, burst_at + 0.2) == [512]
    assert wire.counts(burst_at + 0.2, burst_at + 0.2 + 1e-9) == [488]
    assert stats.burst_messages == 1000
    assert _consecutive(wire.trade_ids())


async def test_an_unlimited_rate_counts_the_burst_and_goes_on(autojump_clock: object) -> None:
    simulator, session, wire = _session(rate=math.inf)
    async with trio.open_nursery() as nursery:
        # Held from the start: the first write is the burst's.
        async with session.lock:
            nursery.start_soon(session.run)
            await trio.testing.wait_all_tasks_blocked()
            simulator.burst(1000)
        while len(wire.writes) < 3:
            await trio.lowlevel.checkpoint()
        stats = simulator.statistics()
        nursery.cancel_scope.cancel()
    assert [len(texts) for _, texts in wire.writes[:3]] == [512, 488, 512]
    assert stats.burst_messages == 1000


@pytest.mark.parametrize(
    ("count", "error"),
    [(-1, ValueError), (1.5, TypeError), (True, TypeError), ("10", TypeError)],
)
def test_burst_rejects_a_bad_count(count: Any, error: type[Exception]) -> None:
    simulator, _, _ = _session(rate=1000.0)
    with pytest.raises(error, match="count"):
        simulator.burst(count)


async def test_burst_with_no_connection_affects_none() -> None:
    simulator, _, _ = _session(rate=1000.0)
    assert simulator.burst(10) == 0
    assert simulator.statistics().burst_messages == 0


# --- On a real socket --------------------------------------------------------------


@asynccontextmanager
async def _simulator(**settings: Any) -> AsyncIterator[Simulator]:
    async with open_simulator(SimulatorConfig(epoch_ms=EPOCH, **settings)) as simulator:
        yield simulator


def _trades(sim: Simulator) -> AbstractAsyncContextManager[WebSocketConnection]:
    return open_websocket_url(sim.address.raw_url("btcusdt@trade"))


async def test_a_burst_arrives_in_full_and_in_order_on_a_real_socket() -> None:
    with trio.fail_after(GUARD):
        async with _simulator(rate=10) as sim, _trades(sim) as ws:
            received = [json.loads(await ws.get_message())]
            assert sim.burst(5000) == 1
            # At the pace of 10 a second these would take 500 s.
            with trio.fail_after(2.5):
                while True:
                    received.append(json.loads(await ws.get_message()))
                    stats = sim.statistics()
                    if stats.burst_messages == 5000 and len(received) == stats.messages_sent:
                        break
    assert 5001 <= len(received) <= 5001 + 30  # the burst, and the pace meanwhile
    assert _consecutive([message["t"] for message in received])


async def test_every_open_connection_bursts() -> None:
    with trio.fail_after(GUARD):
        async with _simulator(rate=10) as sim, _trades(sim) as one, _trades(sim) as two:
            for ws in (one, two):
                await ws.get_message()
            assert sim.burst(200) == 2
            with trio.fail_after(2.5):  # 20 s at the pace
                for ws in (one, two):
                    for _ in range(200):
                        await ws.get_message()
            stats = sim.statistics()
    assert stats.burst_messages == 400


async def test_pings_are_answered_in_the_middle_of_a_burst() -> None:
    with trio.fail_after(GUARD):
        async with _simulator(rate=1000) as sim:
            host, port = sim.address.rest_url.removeprefix("http://").rsplit(":", 1)
            stream = await trio.open_tcp_stream(host, int(port))
            async with stream:
                ws = WSConnection(ConnectionType.CLIENT)
                await stream.send_all(ws.send(Request(host=host, target="/ws/btcusdt@trade")))
                events: list[object] = []
                while not any(isinstance(e, TextMessage) for e in events):
                    ws.receive_data(await stream.receive_some())
                    events.extend(ws.events())
                assert isinstance(events[0], AcceptConnection)
                sim.burst(20_000)
                await stream.send_all(ws.send(Ping(b"mid-burst")))
                texts_before_pong = 0
                while True:
                    ws.receive_data(await stream.receive_some())
                    new = list(ws.events())
                    if any(isinstance(e, Pong) for e in new):
                        break
                    texts_before_pong += sum(isinstance(e, TextMessage) for e in new)
    # Not after the whole burst: the writer let the reader's pong through.
    assert texts_before_pong < 5_000
