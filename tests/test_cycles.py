"""The watchlist cycle and whale flows (seed 001): deadlines, partial success, detection."""

from __future__ import annotations

import json
import logging
import math
import re
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import attrs
import httpx
import msgspec
import pytest
import trio
import trio.testing

import engine
from engine._probes import Kind, liveness
from engine.bus import MemoryBus
from services.market._events import Normalised, Trade, normalise
from services.market.cycles import (
    CycleReport,
    DatasetUpdate,
    Quote,
    SymbolFlow,
    Watchlist,
    WatchlistConfig,
    WhaleFlowConfig,
    WhaleFlows,
    WhaleTrade,
)
from services.market.simulator import SimulatorConfig, open_simulator

ROOT = Path(__file__).resolve().parent.parent
EPOCH = 1_700_000_000.0  # the wall clock at virtual time 0, in every virtual-time test
BASE = "https://exchange.test"


def wall_clock() -> float:
    """A wall clock that follows the virtual clock, so timestamps are exact."""
    return EPOCH + trio.current_time()


# --- a scripted exchange ----------------------------------------------------


@attrs.define
class FakeExchange:
    """``GET /api/v3/ticker/24hr?symbols=[...]`` in Binance's shapes, with scripted faults.

    Every request takes ``latency`` seconds. A request for exactly the symbols
    of a tuple in ``hang`` never answers; one in ``stubborn`` ignores
    cancellation for ``stubborn_for`` seconds (code stuck outside trio's
    reach). ``delays`` adds seconds per symbol; ``broken`` and ``errors``
    answer a request holding such a symbol with a bad body or an HTTP error.
    A symbol not in ``listed`` is rejected with 400 -1121, as Binance does.
    """

    listed: tuple[str, ...]
    latency: float = 0.125  # a binary fraction: sums of times stay exact
    hang: set[tuple[str, ...]] = attrs.Factory(set)
    stubborn: set[tuple[str, ...]] = attrs.Factory(set)
    stubborn_for: float = 100.0
    delays: dict[str, float] = attrs.Factory(dict)
    broken: dict[str, bytes] = attrs.Factory(dict)
    errors: dict[str, httpx.Response | Exception] = attrs.Factory(dict)
    omit: set[str] = attrs.Factory(set)
    mini: set[str] = attrs.Factory(set)
    requests: list[tuple[float, tuple[str, ...]]] = attrs.Factory(list)
    in_flight: int = 0
    peak: int = 0

    def client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(transport=httpx.MockTransport(self.handle))

    async def handle(self, request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/api/v3/ticker/24hr"
        symbols = tuple(json.loads(request.url.params["symbols"]))
        self.requests.append((trio.current_time(), symbols))
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        try:
            return await self._answer(symbols)
        finally:
            self.in_flight -= 1

    async def _answer(self, symbols: tuple[str, ...]) -> httpx.Response:
        if symbols in self.hang:
            await trio.sleep_forever()
        if symbols in self.stubborn:
            with trio.CancelScope(shield=True):
                await trio.sleep(self.stubborn_for)
        await trio.sleep(self.latency + max(self.delays.get(s, 0.0) for s in symbols))
        for symbol in symbols:
            if symbol in self.errors:
                error = self.errors[symbol]
                if isinstance(error, Exception):
                    raise error
                return error
            if symbol in self.broken:
                return httpx.Response(200, content=self.broken[symbol])
        if any(s not in self.listed for s in symbols):
            return httpx.Response(400, json={"code": -1121, "msg": "Invalid symbol."})
        return httpx.Response(200, json=[self.ticker(s) for s in symbols if s not in self.omit])

    def ticker(self, symbol: str) -> dict[str, Any]:
        price = self.price(symbol)
        body: dict[str, Any] = {
            "symbol": symbol,
            "priceChange": "1.00000000",
            "priceChangePercent": "-1.250",
            "lastPrice": f"{price:.8f}",
            "volume": "1234.50000000",
            "quoteVolume": f"{price * 1234.5:.8f}",
            "openTime": 0,
            "closeTime": int(wall_clock() * 1000),
        }
        if symbol not in self.mini:
            body["bidPrice"] = f"{price - 0.5:.8f}"
            body["askPrice"] = f"{price + 0.5:.8f}"
        return body

    def price(self, symbol: str) -> float:
        return 100.0 + 10 * self.listed.index(symbol)


def symbols(count: int) -> tuple[str, ...]:
    return tuple(f"S{i:02d}USDT" for i in range(count))


def watchlist_for(exchange: FakeExchange, config: WatchlistConfig) -> Watchlist:
    return Watchlist(config, client_factory=exchange.client, wall_clock=wall_clock)


async def run_until(watchlist: Watchlist, when: float) -> None:
    """Run the watchlist until the virtual time ``when``, then stop it."""
    with trio.move_on_at(when) as scope:
        await watchlist.run()
    assert scope.cancelled_caught


async def next_report(watchlist: Watchlist, *, within: float = 30) -> CycleReport:
    """The next cycle's report; a cycle that never finishes fails the test, not hangs it."""
    with trio.fail_after(within):  # virtual seconds under autojump_clock
        return await watchlist.wait_cycle()


def updated(watchlist: Watchlist) -> dict[str, float]:
    """Each quote's ``updated_at``, as the virtual time it was received."""
    return {s: q.updated_at - EPOCH for s, q in watchlist.quotes().items()}


# --- configuration ----------------------------------------------------------


def test_deadlines_default_to_nested_fractions_of_the_interval() -> None:
    config = WatchlistConfig(BASE + "/", ["BTCUSDT"], interval=10)
    assert config.base_url == BASE
    assert (config.cycle_deadline, config.batch_deadline, config.request_deadline) == (10, 8, 4)
    assert config.stall_after == 40
    assert (config.batch_size, config.concurrency, config.name) == (20, 4, "watchlist")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"base_url": "ftp://x"}, "base_url must start with http:// or https://"),
        ({"symbols": []}, "symbols must name at least one symbol"),
        ({"symbols": ["btcusdt"]}, "symbols must hold upper-case Binance symbols"),
        ({"symbols": ["BTCUSDT", "BTCUSDT"]}, "symbols must not repeat"),
        ({"interval": 0}, "interval must be > 0"),
        ({"interval": math.inf}, "interval must be finite"),
        ({"batch_size": 0}, "batch_size must be >= 1"),
        ({"concurrency": 0}, "concurrency must be >= 1"),
        ({"request_deadline": -1}, "request_deadline must be > 0"),
        (
            {"request_deadline": 3, "batch_deadline": 2},
            "request_deadline must be <= batch_deadline (deadlines nest: request <= batch "
            "<= cycle <= interval), got request_deadline=3 > batch_deadline=2",
        ),
        ({"batch_deadline": 5, "cycle_deadline": 4}, "batch_deadline must be <= cycle_deadline"),
        ({"cycle_deadline": 6}, "got cycle_deadline=6 > interval=5"),
        ({"name": ""}, "name must be a non-empty string"),
    ],
)
def test_watchlist_config_rejects_bad_settings(kwargs: dict[str, Any], message: str) -> None:
    arguments: dict[str, Any] = {"base_url": BASE, "symbols": ["BTCUSDT"], "interval": 5}
    arguments.update(kwargs)
    with pytest.raises(ValueError, match=re.escape(message)):
        WatchlistConfig(**arguments)


def test_symbols_must_not_be_a_string() -> None:
    with pytest.raises(TypeError, match="symbols must be a sequence of symbol names"):
        WatchlistConfig(BASE, "BTCUSDT")


# --- the watchlist under virtual time -----------------------------------------


async def test_one_cycle_fetches_every_batch_with_one_request(
    autojump_clock: trio.testing.MockClock,
) -> None:
    listed = symbols(5)
    exchange = FakeExchange(listed, mini={"S04USDT"})
    config = WatchlistConfig(BASE, listed, interval=5, batch_size=2, concurrency=3)
    watchlist = watchlist_for(exchange, config)
    assert watchlist.last_update() == {"watchlist": DatasetUpdate(None, {})}
    await run_until(watchlist, 1)
    assert exchange.requests == [
        (0, ("S00USDT", "S01USDT")),
        (0, ("S02USDT", "S03USDT")),
        (0, ("S04USDT",)),
    ]
    quotes = watchlist.quotes()
    assert list(quotes) == list(listed)
    assert quotes["S01USDT"] == Quote(
        symbol="S01USDT",
        last_price=110.0,
        change_pct=-1.25,
        volume=1234.5,
        quote_volume=110.0 * 1234.5,
        bid=109.5,
        ask=110.5,
        close_time=int((EPOCH + 0.125) * 1000),
        updated_at=EPOCH + 0.125,
    )
    assert (quotes["S04USDT"].bid, quotes["S04USDT"].ask) == (None, None)  # a MINI ticker
    assert watchlist.last_update()["watchlist"] == DatasetUpdate(
        EPOCH + 0.125, dict.fromkeys(listed, EPOCH + 0.125)
    )
    report = watchlist.last_report()
    assert report == CycleReport(1, 0, 0.125, "ok", listed, {})
    stats = watchlist.statistics()
    assert (stats.cycles, stats.symbols_ok, stats.symbols_failed) == (1, 5, 0)
    assert stats.last_update == EPOCH + 0.125
    assert stats.last_error is None


async def test_hung_request_is_cut_at_its_deadline_and_the_cycle_goes_on(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    listed = symbols(6)
    exchange = FakeExchange(listed, hang={("S02USDT", "S03USDT")})
    config = WatchlistConfig(
        BASE,
        listed,
        interval=5,
        batch_size=2,
        concurrency=3,
        request_deadline=1,
        batch_deadline=2,
        cycle_deadline=4,
    )
    watchlist = watchlist_for(exchange, config)
    caplog.set_level(logging.INFO, logger="market.cycles.watchlist")
    async with trio.open_nursery() as nursery:
        await nursery.start(watchlist.run)
        first = await next_report(watchlist)
        # The cycle ended when the hung request was cut, at exactly 1 s; the
        # two batches that answered were stored at 0.125.
        assert trio.current_time() == 1
        assert first.outcome == "ok"
        assert first.duration == 1
        assert first.ok == ("S00USDT", "S01USDT", "S04USDT", "S05USDT")
        assert first.failed == dict.fromkeys(
            ["S02USDT", "S03USDT"], "request deadline of 1 s expired"
        )
        assert updated(watchlist) == dict.fromkeys(first.ok, 0.125)
        assert watchlist.last_update()["watchlist"].updated_at == EPOCH + 0.125
        assert watchlist.failures() == first.failed

        exchange.hang.clear()  # the exchange recovers; the next cycle retries everything
        second = await next_report(watchlist)
        assert (second.started_at, second.duration, second.failed) == (5, 0.125, {})
        assert updated(watchlist) == dict.fromkeys(listed, 5.125)
        nursery.cancel_scope.cancel()
    stats = watchlist.statistics()
    assert (stats.cycles, stats.request_timeouts, stats.batch_timeouts) == (2, 1, 0)
    assert (stats.symbols_ok, stats.symbols_failed) == (6, 0)
    assert stats.last_error == "S03USDT: request deadline of 1 s expired"
    messages = [r.getMessage() for r in caplog.records if r.name == "market.cycles.watchlist"]
    assert messages == [
        "watchlist 'watchlist': failing: S02USDT (request deadline of 1 s expired); "
        "S03USDT (request deadline of 1 s expired)",
        "watchlist 'watchlist': answering again: S02USDT, S03USDT",
    ]


async def test_rejected_symbol_splits_its_batch_and_a_hang_there_spares_the_rest(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # NOPEUSDT is not listed: Binance rejects the whole batch, so the batch
    # asks for each symbol alone. S01USDT's own request then hangs; it is cut
    # at its deadline and the batch goes on to S02USDT.
    listed = symbols(3)
    watched = ("S00USDT", "NOPEUSDT", "S01USDT", "S02USDT")
    exchange = FakeExchange(listed, hang={("S01USDT",)})
    config = WatchlistConfig(
        BASE, watched, interval=5, request_deadline=1, batch_deadline=3, cycle_deadline=4
    )
    watchlist = watchlist_for(exchange, config)
    await run_until(watchlist, 4.5)
    assert exchange.requests == [
        (0, watched),
        (0.125, ("S00USDT",)),
        (0.25, ("NOPEUSDT",)),
        (0.375, ("S01USDT",)),
        (1.375, ("S02USDT",)),
    ]
    report = watchlist.last_report()
    assert report is not None
    assert report.ok == ("S00USDT", "S02USDT")
    assert report.failed == {
        "NOPEUSDT": "rejected by the exchange: Invalid symbol. (code -1121)",
        "S01USDT": "request deadline of 1 s expired",
    }
    assert updated(watchlist) == {"S00USDT": 0.25, "S02USDT": 1.5}
    stats = watchlist.statistics()
    assert (stats.split_batches, stats.rejected_symbols, stats.request_timeouts) == (1, 1, 1)
    assert stats.batch_timeouts == 0


async def test_batch_deadline_cuts_a_batch_whose_requests_keep_hanging(
    autojump_clock: trio.testing.MockClock,
) -> None:
    listed = symbols(4)
    watched = ("NOPEUSDT", *listed)
    exchange = FakeExchange(listed, hang={("S01USDT",), ("S02USDT",)})
    config = WatchlistConfig(
        BASE, watched, interval=5, request_deadline=1, batch_deadline=2, cycle_deadline=4
    )
    watchlist = watchlist_for(exchange, config)
    await run_until(watchlist, 4.5)
    # The split started at 0.125; S01USDT was cut at 1.375 by its request
    # deadline, S02USDT at 2 by the batch deadline; S03USDT never got asked.
    assert [t for t, s in exchange.requests] == [0, 0.125, 0.25, 0.375, 1.375]
    report = watchlist.last_report()
    assert report is not None
    assert report.duration == 2
    assert report.failed == {
        "NOPEUSDT": "rejected by the exchange: Invalid symbol. (code -1121)",
        "S01USDT": "request deadline of 1 s expired",
        "S02USDT": "batch deadline of 2 s expired",
        "S03USDT": "batch deadline of 2 s expired",
    }
    assert report.ok == ("S00USDT",)
    stats = watchlist.statistics()
    assert (stats.batch_timeouts, stats.request_timeouts, stats.cycle_timeouts) == (1, 1, 0)


async def test_cycle_that_overruns_is_cut_by_the_cycle_deadline_and_reported(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    # One batch at a time, 1.5 s per request: batches 1 and 2 answer at 1.5
    # and 3.0, batch 3 is cut by the cycle deadline at 4.0, batch 4 never
    # starts. Every request stays within its own deadline: only the cycle is late.
    listed = symbols(8)
    exchange = FakeExchange(listed, latency=1.5)
    config = WatchlistConfig(
        BASE,
        listed,
        interval=5,
        batch_size=2,
        concurrency=1,
        request_deadline=2,
        batch_deadline=2,
        cycle_deadline=4,
    )
    watchlist = watchlist_for(exchange, config)
    async with trio.open_nursery() as nursery:
        await nursery.start(watchlist.run)
        report = await next_report(watchlist)
        assert trio.current_time() == 4
        exchange.latency = 0.125
        second = await next_report(watchlist)
        nursery.cancel_scope.cancel()
    assert [t for t, s in exchange.requests[:3]] == [0, 1.5, 3.0]
    assert report.outcome == "timeout"
    assert report.duration == 4
    assert report.ok == listed[:4]
    assert report.failed == dict.fromkeys(listed[4:], "cycle deadline of 4 s expired")
    assert second.started_at == 5  # the next cycle ran on time, and fetched everything
    assert second.failed == {}
    stats = watchlist.statistics()
    assert (stats.cycles, stats.cycle_timeouts, stats.batch_timeouts) == (2, 1, 0)
    assert stats.last_error == "cycle deadline of 4 s expired"
    cycle = watchlist.cycle.statistics()
    assert (cycle.runs, cycle.timeouts, cycle.overruns) == (2, 1, 0)
    assert cycle.last_error == "TooSlowError: cycle deadline of 4 s expired"
    [warning] = [r for r in caplog.records if r.name == "engine.cycles"]
    assert warning.getMessage() == (
        "cycle 'watchlist': cycle deadline of 4 s expired; the run was cut after 4.000 s"
    )


async def test_batches_in_flight_never_exceed_concurrency(
    autojump_clock: trio.testing.MockClock,
) -> None:
    listed = symbols(10)
    exchange = FakeExchange(listed, delays={"S03USDT": 0.5})
    config = WatchlistConfig(BASE, listed, interval=5, batch_size=1, concurrency=3)
    watchlist = watchlist_for(exchange, config)
    await run_until(watchlist, 1)
    assert exchange.peak == 3
    assert len(exchange.requests) == 10
    assert watchlist.statistics().symbols_ok == 10


async def test_malformed_answers_and_http_errors_fail_only_their_batch(
    autojump_clock: trio.testing.MockClock,
) -> None:
    listed = symbols(6)
    exchange = FakeExchange(
        listed,
        broken={"S00USDT": b'[{"symbol": "S00USDT", "lastPr', "S01USDT": b"not json at all"},
        errors={
            "S02USDT": httpx.Response(429, json={"code": -1003, "msg": "Too many requests."}),
            "S03USDT": httpx.Response(502, text="<html>Bad Gateway</html>"),
            "S04USDT": httpx.ConnectError("connection refused"),
        },
    )
    config = WatchlistConfig(BASE, listed, interval=5, batch_size=1, concurrency=6)
    watchlist = watchlist_for(exchange, config)
    await run_until(watchlist, 1)
    failed = watchlist.failures()
    assert failed["S00USDT"].startswith("malformed response: ")
    assert failed["S01USDT"].startswith("malformed response: ")
    assert failed["S02USDT"] == "HTTP 429: Too many requests. (code -1003)"
    assert failed["S03USDT"] == "HTTP 502: <html>Bad Gateway</html>"
    assert failed["S04USDT"] == "request failed: ConnectError: connection refused"
    assert list(watchlist.quotes()) == ["S05USDT"]
    stats = watchlist.statistics()
    assert (stats.malformed_responses, stats.request_errors) == (2, 3)


async def test_a_price_that_is_not_a_number_is_a_malformed_answer(
    autojump_clock: trio.testing.MockClock,
) -> None:
    bad = json.dumps([{"symbol": "S00USDT", "lastPrice": "n/a", "priceChangePercent": "1",
                       "volume": "1", "closeTime": 0}]).encode()  # fmt: skip
    exchange = FakeExchange(symbols(1), broken={"S00USDT": bad})
    watchlist = watchlist_for(exchange, WatchlistConfig(BASE, symbols(1), interval=5))
    await run_until(watchlist, 1)
    assert watchlist.failures() == {
        "S00USDT": "malformed response: S00USDT: lastPrice is not a finite number: 'n/a'"
    }


async def test_symbol_missing_from_the_answer_is_a_failure_of_its_own(
    autojump_clock: trio.testing.MockClock,
) -> None:
    exchange = FakeExchange(symbols(3), omit={"S01USDT"})
    watchlist = watchlist_for(exchange, WatchlistConfig(BASE, symbols(3), interval=5))
    await run_until(watchlist, 1)
    assert watchlist.failures() == {"S01USDT": "missing from the exchange's answer"}
    assert list(watchlist.quotes()) == ["S00USDT", "S02USDT"]


async def test_a_stale_quote_is_kept_with_its_age(autojump_clock: trio.testing.MockClock) -> None:
    listed = symbols(2)
    exchange = FakeExchange(listed)
    config = WatchlistConfig(BASE, listed, interval=5, request_deadline=1)
    watchlist = watchlist_for(exchange, config)
    async with trio.open_nursery() as nursery:
        await nursery.start(watchlist.run)
        await next_report(watchlist)
        exchange.hang.add(listed)
        await next_report(watchlist)
        nursery.cancel_scope.cancel()
    # Nothing answered at 5: the quotes and last_update are those of 0.125.
    assert updated(watchlist) == dict.fromkeys(listed, 0.125)
    assert watchlist.last_update()["watchlist"].updated_at == EPOCH + 0.125
    assert watchlist.statistics().symbols_failed == 2


async def test_stopping_mid_cycle_keeps_what_arrived_and_finishes_no_cycle(
    autojump_clock: trio.testing.MockClock,
) -> None:
    listed = symbols(2)
    exchange = FakeExchange(listed, delays={"S01USDT": 1})
    config = WatchlistConfig(BASE, listed, interval=5, batch_size=1)
    watchlist = watchlist_for(exchange, config)
    await run_until(watchlist, 0.5)
    assert updated(watchlist) == {"S00USDT": 0.125}
    assert watchlist.last_report() is None
    assert watchlist.statistics().cycles == 0
    assert not watchlist.statistics().running


async def test_a_second_concurrent_run_is_refused(autojump_clock: trio.testing.MockClock) -> None:
    exchange = FakeExchange(symbols(1))
    watchlist = watchlist_for(exchange, WatchlistConfig(BASE, symbols(1), interval=5))
    async with trio.open_nursery() as nursery:
        await nursery.start(watchlist.run)
        assert watchlist.statistics().running
        with pytest.raises(trio.BusyResourceError):
            await watchlist.run()
        nursery.cancel_scope.cancel()


async def test_the_client_s_own_timeouts_are_turned_off(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # httpx's default would cut a request at 5 s; the deadline allows 8.
    listed = symbols(1)
    exchange = FakeExchange(listed, latency=7)
    made: list[httpx.AsyncClient] = []

    def factory() -> httpx.AsyncClient:
        client = httpx.AsyncClient(transport=httpx.MockTransport(exchange.handle))
        made.append(client)
        return client

    config = WatchlistConfig(BASE, listed, interval=10, request_deadline=8)
    watchlist = Watchlist(config, client_factory=factory, wall_clock=wall_clock)
    await run_until(watchlist, 9)
    assert updated(watchlist) == {"S00USDT": 7}
    [client] = made
    assert client.timeout == httpx.Timeout(None)
    assert client.is_closed


async def test_a_hang_the_deadlines_cannot_cut_is_reported_on_health_and_restarted(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    # The first request ignores cancellation for 100 s (as a blocking call
    # would): no deadline can cut it, heartbeats stop, and after stall_after
    # (18 s) liveness reports the child; once it unblocks, the supervisor
    # restarts it and the next cycle fetches everything.
    listed = symbols(2)
    exchange = FakeExchange(listed, stubborn={listed})
    config = WatchlistConfig(BASE, listed, interval=5, cycle_deadline=4)
    watchlist = watchlist_for(exchange, config)
    async with engine.open_supervisor(name="market") as supervisor:
        await supervisor.start(
            watchlist.run,
            name="watchlist",
            stall_after=config.stall_after,
            backoff=engine.Backoff(initial=1, jitter=0),
        )
        await trio.sleep_until(17.9)
        assert liveness(supervisor.statistics()) == []
        await trio.sleep_until(50)
        [problem] = liveness(supervisor.statistics())
        assert (problem.kind, problem.subject) == (Kind.CHILD_STALLED, "market/watchlist")
        exchange.stubborn.clear()
        # The stuck cycle ends when the call returns at 100: past its
        # deadline, so it counts as cut by it.
        stuck = await next_report(watchlist, within=60)
        assert (trio.current_time(), stuck.started_at, stuck.outcome) == (100, 0, "timeout")
        report = await next_report(watchlist)
        assert report.started_at == 101  # restarted after 1 s of backoff
        assert report.failed == {}
        assert liveness(supervisor.statistics()) == []
        [child] = supervisor.statistics().children
        assert (child.stalls, child.restarts) == (1, 1)
        # The cycle's statistics are listed under the child, for /status.
        [cycle] = [s for s in child.attached if isinstance(s, engine.CycleStatistics)]
        assert isinstance(cycle, engine.CycleStatistics)
        assert (cycle.name, cycle.runs) == ("watchlist", 2)
        supervisor.cancel()
    assert watchlist.statistics().cycle_timeouts == 1
    assert updated(watchlist) == dict.fromkeys(listed, 101.125)


async def test_each_batch_beats_the_heart(autojump_clock: trio.testing.MockClock) -> None:
    # Three batches of 1.5 s, one at a time: the heartbeat is as old as the
    # latest batch, not as old as the cycle.
    listed = symbols(6)
    exchange = FakeExchange(listed, latency=1.5)
    config = WatchlistConfig(
        BASE, listed, interval=10, batch_size=2, concurrency=1, request_deadline=2
    )
    watchlist = watchlist_for(exchange, config)
    async with engine.open_supervisor(name="market") as supervisor:
        await supervisor.start(watchlist.run, name="watchlist", stall_after=config.stall_after)
        await trio.sleep_until(3.25)
        [child] = supervisor.statistics().children
        assert child.heartbeat_age == 0.25  # the second batch ended at 3
        supervisor.cancel()


# --- against the simulator, on a real socket ---------------------------------


async def test_watchlist_against_the_simulator_over_a_real_socket() -> None:
    listed = ("BTCUSDT", "ETHUSDT", "SOLUSDT")
    simulator_config = SimulatorConfig(symbols=listed, seed=11, epoch_ms=1_700_000_000_000)
    with trio.fail_after(20):
        async with open_simulator(simulator_config) as simulator:
            base = simulator.address.rest_url
            config = WatchlistConfig(base, ("BTCUSDT", "NOPEUSDT", "ETHUSDT", "SOLUSDT"))
            watchlist = Watchlist(config)
            async with trio.open_nursery() as nursery:
                await nursery.start(watchlist.run)
                report = await watchlist.wait_cycle()
                nursery.cancel_scope.cancel()
            async with httpx.AsyncClient() as client:
                answer = await client.get(f"{base}/api/v3/ticker/24hr?symbol=ETHUSDT")
    assert report.outcome == "ok"
    assert report.ok == listed
    assert report.failed == {"NOPEUSDT": "rejected by the exchange: Invalid symbol. (code -1121)"}
    direct = answer.json()
    quote = watchlist.quotes()["ETHUSDT"]
    assert quote.last_price == float(direct["lastPrice"])
    assert quote.change_pct == float(direct["priceChangePercent"])
    assert quote.volume == float(direct["volume"])
    assert (quote.bid, quote.ask) == (float(direct["bidPrice"]), float(direct["askPrice"]))
    assert quote.close_time == 1_700_000_000_000
    assert watchlist.statistics().split_batches == 1


# --- whale flows --------------------------------------------------------------


def trade(
    symbol: str, price: float, qty: float, *, buyer_maker: bool = False, trade_id: int = 1
) -> tuple[str, bytes]:
    """The topic and payload the feed publishes for one Binance trade."""
    return normalise(
        Trade(
            E=5, s=symbol, t=trade_id, p=str(price), q=str(qty), T=1_700_000_000_123, m=buyer_maker
        )
    )


async def publish(bus: MemoryBus, *messages: tuple[str, bytes]) -> None:
    for topic, data in messages:
        await bus.publish(topic, data)
    await trio.testing.wait_all_tasks_blocked()


async def collect(subscription: Any, into: list[tuple[str, WhaleTrade]]) -> None:
    async for message in subscription:
        into.append((message.topic, msgspec.json.decode(message.data, type=WhaleTrade)))


async def test_whales_are_detected_by_threshold_published_and_kept() -> None:
    bus = MemoryBus()
    config = WhaleFlowConfig(threshold_usd=100_000, thresholds={"ETHUSDT": 50_000})
    whales = WhaleFlows(config, bus)
    published: list[tuple[str, WhaleTrade]] = []
    async with bus.subscribe("whales.>", maxsize=100) as subscription, trio.open_nursery() as n:
        n.start_soon(collect, subscription, published)
        await n.start(whales.run)
        await publish(
            bus,
            trade("BTCUSDT", 50_000, 2, trade_id=1),  # 100,000: exactly the threshold
            trade("BTCUSDT", 50_000, 1.99998, trade_id=2),  # 99,999: not a whale
            trade("ETHUSDT", 2_500, 20, buyer_maker=True, trade_id=3),  # 50,000: ETH's own
            trade("SOLUSDT", 150, 600, trade_id=4),  # 90,000 < 100,000
        )
        n.cancel_scope.cancel()
    expected = [
        WhaleTrade("ETHUSDT", 1_700_000_000_123, 2_500, 20, 50_000, "sell", 3),
        WhaleTrade("BTCUSDT", 1_700_000_000_123, 50_000, 2, 100_000, "buy", 1),
    ]
    assert whales.recent() == expected
    assert published == [(f"whales.{w.symbol}", w) for w in reversed(expected)]
    stats = whales.statistics()
    assert (stats.trades, stats.whales, stats.published) == (4, 2, 2)
    assert not stats.running


async def test_flows_aggregate_by_aggressor_side_over_a_virtual_time_window(
    autojump_clock: trio.testing.MockClock,
) -> None:
    bus = MemoryBus()
    whales = WhaleFlows(WhaleFlowConfig(window=60), bus, wall_clock=wall_clock)
    async with trio.open_nursery() as nursery:
        await nursery.start(whales.run)
        await publish(bus, trade("BTCUSDT", 50_000, 4))  # t=0: a 200,000 buy
        await trio.sleep_until(30)
        await publish(
            bus,
            trade("BTCUSDT", 50_000, 3, buyer_maker=True),  # t=30: a 150,000 sell
            trade("ETHUSDT", 2_000, 100, buyer_maker=True),  # t=30: a 200,000 sell
        )
        assert whales.flows() == {
            "BTCUSDT": SymbolFlow("BTCUSDT", 60, 1, 1, 200_000, 150_000, 50_000),
            "ETHUSDT": SymbolFlow("ETHUSDT", 60, 0, 1, 0, 200_000, -200_000),
        }
        await trio.sleep_until(59.999)
        assert whales.flows()["BTCUSDT"].buys == 1
        await trio.sleep_until(60)  # the buy of t=0 leaves the window
        assert whales.flows()["BTCUSDT"] == SymbolFlow("BTCUSDT", 60, 0, 1, 0, 150_000, -150_000)
        await trio.sleep_until(90)
        assert whales.flows() == {}
        assert len(whales.recent()) == 3  # the history is not the window
        assert whales.last_update() == {
            "whale_flows": DatasetUpdate(EPOCH + 30, {"BTCUSDT": EPOCH + 30, "ETHUSDT": EPOCH + 30})
        }
        assert whales.statistics().last_whale_at == EPOCH + 30
        nursery.cancel_scope.cancel()


async def test_history_and_window_are_bounded(autojump_clock: trio.testing.MockClock) -> None:
    bus = MemoryBus()
    whales = WhaleFlows(WhaleFlowConfig(history=3, max_window_trades=2), bus)
    async with trio.open_nursery() as nursery:
        await nursery.start(whales.run)
        await publish(bus, *(trade("BTCUSDT", 100_000, 1 + i, trade_id=i) for i in range(5)))
        nursery.cancel_scope.cancel()
    assert [w.id for w in whales.recent()] == [4, 3, 2]
    assert [w.id for w in whales.recent(2)] == [4, 3]
    assert whales.recent(0) == []
    flow = whales.flows()["BTCUSDT"]
    assert (flow.buys, flow.buy_notional) == (2, 400_000 + 500_000)
    assert whales.statistics().window_evictions == 3
    with pytest.raises(ValueError, match="limit must be >= 0"):
        whales.recent(-1)


async def test_payloads_that_are_not_trades_are_counted_not_fatal() -> None:
    bus = MemoryBus()
    whales = WhaleFlows(WhaleFlowConfig(), bus)
    book = msgspec.json.encode(Normalised("book", "BTCUSDT", 0, bid=1.0, ask=2.0))
    async with trio.open_nursery() as nursery:
        await nursery.start(whales.run)
        await publish(
            bus,
            ("trades.BTCUSDT", b"{not json"),
            ("trades.BTCUSDT", b'{"type": "trade"}'),  # no symbol, no time
            ("trades.BTCUSDT", book),
            trade("BTCUSDT", 60_000, 2),
        )
        nursery.cancel_scope.cancel()
    stats = whales.statistics()
    assert (stats.malformed, stats.ignored, stats.trades, stats.whales) == (2, 1, 1, 1)


async def test_whale_flows_end_when_the_bus_closes() -> None:
    bus = MemoryBus()
    whales = WhaleFlows(WhaleFlowConfig(), bus)
    async with trio.open_nursery() as nursery:
        await nursery.start(whales.run)
        assert whales.statistics().running
        with pytest.raises(trio.BusyResourceError):
            await whales.run()
        await bus.aclose()
    assert not whales.statistics().running


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"threshold_usd": 0}, ValueError, "threshold_usd must be > 0 and finite, got 0"),
        ({"threshold_usd": "big"}, TypeError, "threshold_usd must be a number"),
        ({"thresholds": {"ethusdt": 1}}, ValueError, "thresholds must hold upper-case"),
        (
            {"thresholds": {"ETHUSDT": -5}},
            ValueError,
            "thresholds['ETHUSDT'] must be > 0 and finite, got -5",
        ),
        ({"window": 0}, ValueError, "window must be > 0"),
        ({"window": math.inf}, ValueError, "window must be finite"),
        ({"history": 0}, ValueError, "history must be >= 1"),
        ({"max_window_trades": 0}, ValueError, "max_window_trades must be >= 1"),
        ({"publish_prefix": "whales.>"}, ValueError, "publish_prefix must be plain topic tokens"),
        ({"overflow": "disconnect"}, ValueError, "overflow must be one of 'drop_oldest'"),
        ({"queue_size": 0}, ValueError, "queue_size must be >= 1"),
    ],
)
def test_whale_flow_config_rejects_bad_settings(
    kwargs: dict[str, Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=re.escape(message)):
        WhaleFlowConfig(**kwargs)


def test_per_symbol_threshold_replaces_the_default() -> None:
    config = WhaleFlowConfig(threshold_usd=250_000, thresholds={"ETHBTC": 2.5})
    assert (config.threshold("ETHBTC"), config.threshold("BTCUSDT")) == (2.5, 250_000)


# --- the docs ------------------------------------------------------------------


def _quoted(page: str, fence: str) -> list[str]:
    """The bodies of the ``fence`` blocks of a docs page, in order."""
    text = (ROOT / "docs" / page).read_text()
    return re.findall(rf"```{fence}\n(.*?)```", text, flags=re.DOTALL)


def _run(command: Iterable[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *command], capture_output=True, text=True, timeout=60, check=False, cwd=cwd
    )


@pytest.mark.subprocess
def test_watchlist_example_prints_what_the_page_shows() -> None:
    example = ROOT / "docs" / "examples" / "watchlist_example.py"
    quoted = [block.strip() for block in _quoted("watchlist.md", "python")]
    assert example.read_text().strip() in quoted
    result = _run([str(example)], ROOT)
    assert result.returncode == 0, result.stderr
    [output] = [block for block in _quoted("watchlist.md", "text") if "cycle 1:" in block]
    assert result.stdout == output


@pytest.mark.subprocess
def test_whale_flows_page_example_prints_what_the_page_shows(tmp_path: Path) -> None:
    [code] = [block for block in _quoted("whale-flows.md", "python") if "trio.run" in block]
    script = tmp_path / "whales_example.py"
    script.write_text(code)
    result = _run([str(script)], ROOT)
    assert result.returncode == 0, result.stderr
    [output] = [block for block in _quoted("whale-flows.md", "text") if "flows at t=" in block]
    assert result.stdout == output


async def test_a_published_whale_is_the_json_the_page_shows_with_its_type_first() -> None:
    [shown] = [block for block in _quoted("whale-flows.md", "text") if "8812" in block]
    bus = MemoryBus()
    whales = WhaleFlows(WhaleFlowConfig(), bus)
    async with bus.subscribe("whales.>", maxsize=10) as published, trio.open_nursery() as nursery:
        await nursery.start(whales.run)
        await publish(bus, trade("BTCUSDT", 50_000, 2.5, trade_id=8812))
        message = await anext(published)
        nursery.cancel_scope.cancel()
    assert message.topic == "whales.BTCUSDT"
    assert message.data.decode() == shown.strip()
    # The type every message on the broadcast carries, and a client can dispatch on.
    assert message.data.startswith(b'{"type":"whale",')
    assert msgspec.json.decode(message.data, type=WhaleTrade).id == 8812
