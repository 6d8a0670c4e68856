"""The watchlist's per-symbol circuits and request retries, in virtual time.

The exchange is the simulator's own REST answers, served in-process through
an ``httpx.MockTransport`` (a real socket would not run in virtual time), with
faults added in front of it: one symbol failing for ten minutes, throttling,
dropped connections.
"""

from __future__ import annotations

import json
import logging
import re
import time
from typing import Any

import attrs
import httpx
import pytest
import trio
import trio.testing
from prometheus_client import CollectorRegistry

import engine
from engine._breaker import BreakerStatistics
from engine._opsapp import OpsApp
from engine._probes import Kind, warnings
from services.market.cycles import CycleReport, Watchlist, WatchlistConfig
from services.market.simulator import SimulatorConfig, open_simulator
from services.market.simulator._instruments import instruments
from services.market.simulator._state import SharedState

EPOCH = 1_700_000_000.0  # the wall clock at virtual time 0
BASE = "http://simulator.test"
LISTED = ("BTCUSDT", "ETHUSDT", "SOLUSDT", "BNBUSDT", "XRPUSDT", "ADAUSDT")
SERVER_ERROR = {"code": -1000, "msg": "An unknown error occurred while processing the request."}
# A seeded backoff: retry waits are the same on every run.
BACKOFF = engine.Backoff(initial=0.25, maximum=2, jitter=0, seed=3)


def wall_clock() -> float:
    return EPOCH + trio.current_time()


@attrs.define
class Exchange:
    """The simulator's REST answers, after ``latency``, with scripted faults in front.

    A request holding ``failing`` that arrives in ``[fail_from, fail_until)``
    gets HTTP 500. ``script`` answers the next requests, in order, with a
    response or an exception before the simulator gets them (``None``: the
    simulator answers).
    """

    failing: str | None = None
    fail_from: float = 0.0
    fail_until: float = 0.0
    latency: float = 0.125
    script: list[httpx.Response | Exception | None] = attrs.Factory(list)
    requests: list[tuple[float, tuple[str, ...]]] = attrs.Factory(list)
    simulator: SharedState = attrs.field(init=False)

    @simulator.default
    def _simulator(self) -> SharedState:
        config = SimulatorConfig(symbols=LISTED, seed=1, epoch_ms=1_700_000_000_000)
        return SharedState.create(config, instruments(config.symbols, config.seed))

    def client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(transport=httpx.MockTransport(self.handle))

    async def handle(self, request: httpx.Request) -> httpx.Response:
        symbols = tuple(json.loads(request.url.params["symbols"]))
        arrived = trio.current_time()
        self.requests.append((arrived, symbols))
        await trio.sleep(self.latency)
        if self.script:
            fault = self.script.pop(0)
            if isinstance(fault, Exception):
                raise fault
            if fault is not None:
                return fault
        if self.failing in symbols and self.fail_from <= arrived < self.fail_until:
            return httpx.Response(500, json=SERVER_ERROR)
        reply = self.simulator.rest.answer(request.method, request.url.raw_path.decode())
        return httpx.Response(reply.status, content=reply.body)

    def asked(self, symbol: str) -> list[tuple[float, tuple[str, ...]]]:
        return [(t, s) for t, s in self.requests if symbol in s]


def watchlist_for(exchange: Exchange, **settings: Any) -> Watchlist:
    settings = {"interval": 5, "batch_size": 3, "retry_backoff": BACKOFF, **settings}
    config = WatchlistConfig(BASE, LISTED, **settings)
    return Watchlist(config, client_factory=exchange.client, wall_clock=wall_clock)


async def collect(watchlist: Watchlist, into: list[CycleReport]) -> None:
    while True:
        into.append(await watchlist.wait_cycle())


async def test_a_symbol_failing_for_ten_minutes_costs_one_probe_per_cooldown(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    # ETHUSDT answers 500 from 30 s to 630 s. Cycles run every 5 s; a
    # failing request is tried twice (one retry). Its circuit opens after
    # the failing cycles at 30, 35 and 40 (3 within 15 s), leaves it out for
    # 60 s, then tries it alone in the first cycle after that: 105, 170, ...
    # 625 fail and reopen it; the probe at 690 answers and closes it.
    caplog.set_level(logging.INFO, logger="engine.breaker")
    exchange = Exchange(failing="ETHUSDT", fail_from=30, fail_until=630)
    watchlist = watchlist_for(exchange)
    reports: list[CycleReport] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(collect, watchlist, reports)
        await nursery.start(watchlist.run)
        await trio.sleep_until(321)  # mid-failure, between the cycles of 320 and 325
        stats = watchlist.statistics()
        assert stats.circuit_states["ETHUSDT"] == "open"
        assert stats.circuits == {"closed": 5, "open": 1, "half_open": 0}
        # Next tried in the first cycle at or after 60 s past the probe of 300.
        assert 360 < stats.next_tries["ETHUSDT"] - EPOCH < 365
        assert watchlist.failures() == {
            "ETHUSDT": "left out, circuit open (latest failure: HTTP 500: An unknown error "
            "occurred while processing the request. (code -1000))"
        }
        # /api/last_update still says how old ETHUSDT's data is.
        updated = watchlist.last_update()["watchlist"].symbols
        assert updated["ETHUSDT"] == EPOCH + 25.125  # the last answer before the fault
        assert {updated[s] for s in LISTED if s != "ETHUSDT"} == {EPOCH + 320.125}
        await trio.sleep_until(712)
        nursery.cancel_scope.cancel()

    eth = exchange.asked("ETHUSDT")
    probes = [t for t, symbols in eth if symbols == ("ETHUSDT",) and t == int(t)]
    assert probes == [105, 170, 235, 300, 365, 430, 495, 560, 625, 690]
    # 6 good cycles; 3 failing ones of 4 requests (the batch, retried, then
    # ETHUSDT alone, retried); 9 failed probes of 2; the good probe; 4 good cycles.
    assert len(eth) == 6 + 3 * 4 + 9 * 2 + 1 + 4 == 41
    # The symbols of the other batch cost one request per cycle, as before;
    # ETHUSDT's batch-mates two more in each failing cycle (the retry, and
    # their own request after the split), then one again.
    every_cycle = [5.0 * k for k in range(143)]
    for symbol in ("BNBUSDT", "XRPUSDT", "ADAUSDT"):
        assert [t for t, _ in exchange.asked(symbol)] == every_cycle
    for symbol in ("BTCUSDT", "SOLUSDT"):
        assert len(exchange.asked(symbol)) == 143 + 3 * 2
    assert len(reports) == 143
    for report in reports:
        assert set(report.ok) >= set(LISTED) - {"ETHUSDT"}, report
    stats = watchlist.statistics()
    assert stats.skipped_symbols == 120  # 143 cycles - 10 good - 3 failing - 10 probes
    assert stats.circuits == {"closed": 6, "open": 0, "half_open": 0}
    assert stats.next_tries == {}
    circuits = watchlist.circuits()
    assert (circuits.opened, circuits.half_opened, circuits.closed) == (10, 10, 1)
    assert (circuits.failures, circuits.successes) == (12, 6 * 143 - 12 - 120)
    messages = [r.getMessage() for r in caplog.records if r.name == "engine.breaker"]
    assert len(messages) == 21  # each change of state, once
    assert messages[0] == (
        "breaker 'watchlist': circuit 'ETHUSDT' opened (3 failure(s) within 15 s); "
        "half-opens in 60 s"
    )
    assert messages[-1] == "breaker 'watchlist': circuit 'ETHUSDT' closed: its probe succeeded"


async def test_an_unlisted_symbol_stops_costing_a_split_once_its_circuit_opens(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # NOPEUSDT makes the exchange refuse its whole batch (400 -1121): each
    # cycle then costs the batch and one request per symbol, until three
    # rejections open its circuit; from then on the batch is one request.
    exchange = Exchange()
    watched = ("BTCUSDT", "NOPEUSDT", "ETHUSDT")
    config = WatchlistConfig(BASE, watched, interval=5, breaker_cooldown=600)
    watchlist = Watchlist(config, client_factory=exchange.client, wall_clock=wall_clock)
    with trio.move_on_at(27):
        await watchlist.run()
    per_cycle = [len([r for r in exchange.requests if t <= r[0] < t + 5]) for t in range(0, 30, 5)]
    assert per_cycle == [4, 4, 4, 1, 1, 1]
    assert exchange.requests[-1] == (25, ("BTCUSDT", "ETHUSDT"))
    stats = watchlist.statistics()
    assert (stats.split_batches, stats.rejected_symbols, stats.skipped_symbols) == (3, 3, 3)
    assert watchlist.failures() == {
        "NOPEUSDT": "left out, circuit open (latest failure: rejected by the exchange: "
        "Invalid symbol. (code -1121))"
    }
    assert stats.next_tries == {"NOPEUSDT": EPOCH + 10.5 + 600}  # that cycle ended at 10.5


async def test_a_transient_error_is_retried_after_the_wait_the_exchange_asks_for(
    autojump_clock: trio.testing.MockClock,
) -> None:
    throttled = httpx.Response(
        429, headers={"Retry-After": "1"}, json={"code": -1003, "msg": "Too many requests."}
    )
    exchange = Exchange(script=[throttled, None, httpx.ConnectError("connection reset")])
    watchlist = watchlist_for(exchange, concurrency=1)
    with trio.move_on_at(4):
        await watchlist.run()
    # The first batch: throttled at 0.125, asked again at 1.125 as the
    # exchange said. The second batch: a dropped connection at 1.375, asked
    # again after a seeded wait below 0.25 s.
    times = [t for t, _ in exchange.requests]
    assert times[:3] == [0, 1.125, 1.25]
    assert 1.375 <= times[3] < 1.625
    report = watchlist.last_report()
    assert report is not None
    assert (report.ok, report.failed) == (LISTED, {})
    assert watchlist.statistics().retries == 2
    retries = watchlist.retries()
    assert (retries.retry_after_waits, retries.attempts, retries.successes) == (1, 4, 2)


async def test_throttling_and_dead_connections_count_against_no_symbol(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # Every request of three cycles is throttled or dropped: the symbols
    # fail, but not on their own account, so no circuit opens and no batch
    # is split (splitting a throttled batch would only add requests).
    throttled = httpx.Response(429, json={"code": -1003, "msg": "Too many requests."})
    faults: list[httpx.Response | Exception | None] = [throttled, throttled]
    faults += [httpx.ConnectError("refused")] * 4 + [throttled] * 6
    exchange = Exchange(script=faults)
    watchlist = watchlist_for(exchange, breaker_threshold=1)
    with trio.move_on_at(12):
        await watchlist.run()
    assert len(exchange.requests) == 12  # 3 cycles x 2 batches x 2 attempts, no split
    stats = watchlist.statistics()
    assert stats.split_batches == 0
    assert stats.circuits == {"closed": 6, "open": 0, "half_open": 0}
    assert set(watchlist.failures().values()) == {"HTTP 429: Too many requests. (code -1003)"}


async def test_a_cut_probe_is_no_verdict_and_the_next_cycle_probes_again(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # ETHUSDT fails alone three times (its circuit opens after the cycle at
    # 10), then its probe in the cycle of 75 hangs and is cut by the cycle
    # deadline at 79: a cut says nothing about the symbol, so the circuit
    # stays half-open and the cycle at 80 probes again, which answers.
    exchange = Exchange(failing="ETHUSDT", fail_from=0, fail_until=75)
    deadlines = {"request_deadline": 4, "batch_deadline": 4, "cycle_deadline": 4}
    watchlist = watchlist_for(exchange, batch_size=1, retry_attempts=1, **deadlines)

    async def hang_once(request: httpx.Request) -> httpx.Response:
        if 75 <= trio.current_time() < 80 and "ETHUSDT" in request.url.params["symbols"]:
            await trio.sleep_forever()
        return await exchange.handle(request)

    def client() -> httpx.AsyncClient:
        return httpx.AsyncClient(transport=httpx.MockTransport(hang_once))

    watchlist = Watchlist(watchlist.config, client_factory=client, wall_clock=wall_clock)
    with trio.move_on_at(81):
        await watchlist.run()
    assert [t for t, _ in exchange.asked("ETHUSDT")] == [0, 5, 10, 80.125]  # probes go last
    stats = watchlist.statistics()
    assert stats.circuit_states["ETHUSDT"] == "closed"
    assert (stats.cycle_timeouts, stats.skipped_symbols) == (1, 12)  # left out 15 to 70
    circuits = watchlist.circuits()
    assert (circuits.opened, circuits.half_opened, circuits.closed) == (1, 1, 1)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"retry_attempts": 0}, "retry_attempts must be >= 1, got 0"),
        ({"retry_backoff": 0.5}, "'retry_backoff' must be <class 'engine._backoff.Backoff'>"),
        ({"breaker_threshold": 0}, "breaker_threshold must be >= 1, got 0"),
        ({"breaker_window": 0}, "breaker_window must be > 0, got 0"),
        ({"breaker_cooldown": float("inf")}, "breaker_cooldown must be finite, got inf"),
    ],
)
def test_bad_resilience_settings_are_refused(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises((TypeError, ValueError), match=re.escape(message)):
        WatchlistConfig(BASE, LISTED, **kwargs)


def test_the_breaker_window_defaults_to_threshold_cycles() -> None:
    config = WatchlistConfig(BASE, LISTED, interval=30, breaker_threshold=4)
    assert (config.breaker_window, config.breaker_cooldown, config.retry_attempts) == (120, 60, 2)


async def test_health_lists_the_open_circuits_with_their_next_try(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # /health in-process (a real socket would not run in virtual time): the
    # watchlist, a source of the ops server, says which symbols are left out
    # and when each is tried next.
    exchange = Exchange(failing="ETHUSDT", fail_from=0, fail_until=1000)
    watchlist = watchlist_for(exchange)
    assert watchlist.health() == engine.SourceHealth("stopped", detail={"circuits_open": 0})
    async with engine.open_supervisor(name="market") as supervisor:
        app = OpsApp(supervisor, {"watchlist": watchlist}, [], CollectorRegistry(), None)
        # OpsApp types scope and messages as read-only Mappings; httpx wants mutable ones.
        transport = httpx.ASGITransport(app=app)  # type: ignore[arg-type]
        async with httpx.AsyncClient(transport=transport, base_url="http://ops") as client:
            await supervisor.start(watchlist.run, name="watchlist")
            await trio.sleep_until(6)
            before = (await client.get("/health")).json()["sources"]["watchlist"]
            await trio.sleep_until(11)  # the circuit opened as the cycle of 10 ended
            health = await client.get("/health")
            ready = await client.get("/ready")
        supervisor.cancel()
    assert before == {"state": "fetching", "ready": True, "circuits_open": 0}
    # The circuit keeps its state after the run: it opened when the cycle of
    # 10 ended (after the retries of its batch and of the split).
    [retry_at] = watchlist.circuits().retry_at.values()
    assert 10 < retry_at - 60 < 11
    next_try = EPOCH + retry_at
    assert watchlist.statistics().next_tries == {"ETHUSDT": next_try}
    assert health.status_code == 200
    assert health.json()["sources"]["watchlist"] == {
        "state": "circuits_open",
        "ready": True,
        "circuits_open": 1,
        "ETHUSDT": "next try at " + time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(next_try)),
    }
    assert ready.status_code == 200  # a symbol left out is no reason to refuse traffic


class FailOne(httpx.AsyncBaseTransport):
    """Passes requests to the real simulator, except those for ``symbol``: HTTP 500."""

    def __init__(self, symbol: str) -> None:
        self.symbol = symbol
        self.failed = 0
        self._inner = httpx.AsyncHTTPTransport()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if self.symbol in request.url.params["symbols"]:
            self.failed += 1
            return httpx.Response(500, json=SERVER_ERROR)
        return await self._inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self._inner.aclose()


async def test_against_the_simulator_over_a_real_socket_the_failing_symbol_is_left_out() -> None:
    config = SimulatorConfig(symbols=LISTED, seed=1, epoch_ms=1_700_000_000_000)
    transport = FailOne("ETHUSDT")
    reports: list[CycleReport] = []
    with trio.fail_after(10):
        async with open_simulator(config) as simulator:
            settings = WatchlistConfig(
                simulator.address.rest_url,
                LISTED,
                interval=0.3,
                request_deadline=0.3,  # loopback answers in milliseconds; room for a slow CI
                batch_deadline=0.3,
                batch_size=3,
                retry_attempts=1,
                breaker_threshold=2,
                breaker_cooldown=60,
            )
            watchlist = Watchlist(
                settings, client_factory=lambda: httpx.AsyncClient(transport=transport)
            )
            async with trio.open_nursery() as nursery:
                await nursery.start(watchlist.run)
                for _ in range(5):
                    reports.append(await watchlist.wait_cycle())
                nursery.cancel_scope.cancel()
    # Two failing cycles (the batch, then ETHUSDT alone, in each) opened its
    # circuit; after that it cost nothing, and the others answered every time.
    assert transport.failed == 4
    for report in reports:
        assert set(report.ok) == set(LISTED) - {"ETHUSDT"}, report
    assert reports[-1].failed["ETHUSDT"].startswith("left out, circuit open")
    assert watchlist.statistics().circuit_states["ETHUSDT"] == "open"


async def test_an_open_circuit_is_a_warning_on_health_with_its_next_try(
    autojump_clock: trio.testing.MockClock,
) -> None:
    exchange = Exchange(failing="ETHUSDT", fail_from=0, fail_until=1000)
    watchlist = watchlist_for(exchange)
    async with engine.open_supervisor(name="market") as supervisor:
        await supervisor.start(watchlist.run, name="watchlist")
        await trio.sleep_until(11)  # the circuit opened as the cycle of 10 ended
        tree = supervisor.statistics()
        [problem] = warnings(tree)
        [child] = tree.children
        [circuits] = [s for s in child.attached if isinstance(s, BreakerStatistics)]
        supervisor.cancel()
    retry_at = circuits.retry_at["ETHUSDT"]
    assert (problem.kind, problem.subject, problem.where) == (
        Kind.CIRCUIT_OPEN,
        "market/watchlist",
        "ETHUSDT",
    )
    assert problem.seconds == retry_at - 11
    assert problem.message == (
        "breaker 'watchlist' of child 'market/watchlist': circuit 'ETHUSDT' is open; "
        f"next try in {retry_at - 11:.1f} s"
    )
    # The same circuit on /status, with the wall-clock time of its next try.
    assert circuits.states["ETHUSDT"] == "open"
    assert watchlist.statistics().next_tries == {"ETHUSDT": EPOCH + retry_at}
