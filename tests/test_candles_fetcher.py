"""The candle fetcher: against the embedded simulator on loopback, and against faults.

Fills run against a real simulator (127.0.0.1, port 0, a pinned clock) under
an absolute ``trio.fail_after`` guard, through a transport that counts (and,
when told, breaks) requests. Rate-limit waits run against a fake exchange
written here (no sockets) under the autojump clock, so the waits are asserted
exactly in virtual time.
"""

from __future__ import annotations

import functools
import json
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest
import trio

from services.market.candles import (
    TIMEFRAME_MS,
    TIMEFRAMES,
    CandleFetcher,
    DateRange,
    FetcherConfig,
    FetcherStatistics,
    KlinesUnavailable,
    MalformedKlines,
    RateLimited,
    SqliteCandleStore,
    open_candle_fetcher,
)
from services.market.candles._fetcher import _parse_klines, _parse_row, _well_formed
from services.market.simulator import Simulator, SimulatorConfig, open_simulator

ROOT = Path(__file__).resolve().parent.parent
HOUR = 3_600_000
MINUTE = 60_000
DAY = 86_400_000
# 2024-03-01T12:34:56Z: the simulator's clock; its history ends here.
NOW = 1_709_296_496_000
GUARD = 20  # seconds of real time a socket test may take

Fault = Callable[[httpx.Request], Awaitable[httpx.Response]]


def reply(response: httpx.Response) -> Fault:
    """A fault that answers ``response`` instead of the exchange."""

    async def answer(request: httpx.Request) -> httpx.Response:
        return response

    return answer


class Faulty(httpx.AsyncBaseTransport):
    """Sends requests on through ``inner``, counting them; ``faults[n]`` replaces request n."""

    def __init__(self, inner: httpx.AsyncBaseTransport) -> None:
        self.inner = inner
        self.faults: dict[int, Fault] = {}
        self.requests: list[httpx.Request] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        fault = self.faults.pop(len(self.requests), None)
        if fault is not None:
            return await fault(request)
        return await self.inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self.inner.aclose()

    def klines_params(self) -> list[dict[str, str]]:
        return [dict(r.url.params) for r in self.requests if r.url.path == "/api/v3/klines"]


@asynccontextmanager
async def simulated(
    tmp_path: Path, config: FetcherConfig | None = None
) -> AsyncIterator[tuple[Simulator, CandleFetcher, Faulty, SqliteCandleStore]]:
    store = SqliteCandleStore(tmp_path / "candles.db")
    transport = Faulty(httpx.AsyncHTTPTransport())
    async with open_simulator(SimulatorConfig(epoch_ms=NOW)) as sim:  # noqa: SIM117
        async with open_candle_fetcher(
            store, sim.address.rest_url, config, transport=transport
        ) as fetcher:
            yield sim, fetcher, transport, store
    store.close()


def days_before_now(days: int) -> DateRange:
    return DateRange.from_ms(NOW - days * DAY, NOW + DAY)


def bars_before_now(timeframe: str, count: int) -> DateRange:
    """A range holding exactly ``count`` closed bars, up to the one open at ``NOW``."""
    length = TIMEFRAME_MS[timeframe]
    return DateRange.from_ms(NOW // length * length - count * length, NOW + DAY)


async def test_a_fill_stores_every_closed_candle_and_not_the_open_one(tmp_path: Path) -> None:
    with trio.fail_after(GUARD):
        async with simulated(tmp_path) as (sim, fetcher, transport, store):
            stored = await fetcher.fill("BTCUSDT", "1h", days_before_now(3))
            async with httpx.AsyncClient(base_url=sim.address.rest_url) as client:
                reply = await client.get(
                    "/api/v3/klines",
                    params={
                        "symbol": "BTCUSDT",
                        "interval": "1h",
                        "startTime": NOW - 3 * 86_400_000,
                    },
                )
    rows = reply.json()
    current = NOW // HOUR * HOUR
    assert rows[-1][0] == current  # the exchange serves the open candle ...
    got = store.candles("BTCUSDT", "1h", days_before_now(3))
    assert stored == len(got) == len(rows) - 1  # ... the store keeps only the closed ones
    assert got.open_time[-1] == current - HOUR
    assert got.close.tolist() == [float(row[4]) for row in rows[:-1]]
    assert got.volume.tolist() == [float(row[5]) for row in rows[:-1]]
    assert store.covered("BTCUSDT", "1h") == [(NOW - 3 * 86_400_000 + HOUR - NOW % HOUR, current)]
    assert fetcher.statistics() == FetcherStatistics(
        requests=2, candles_stored=stored, ranges_fetched=1
    )
    assert [r.url.path for r in transport.requests] == ["/api/v3/time", "/api/v3/klines"]


async def test_a_second_fill_asks_only_for_what_is_missing(tmp_path: Path) -> None:
    with trio.fail_after(GUARD):
        async with simulated(tmp_path) as (_, fetcher, transport, store):
            first = await fetcher.fill("ETHUSDT", "4h", days_before_now(2))
            again = await fetcher.fill("ETHUSDT", "4h", days_before_now(2))
            wider = await fetcher.fill("ETHUSDT", "4h", days_before_now(5))
    # 2 days from 12:34:56 hold 12 4h slots: the first opens before the range
    # starts, the last is still open at the exchange: 11 are stored.
    assert first == 11
    assert again == 0
    assert wider == 18
    params = transport.klines_params()
    assert len(params) == 2  # the repeat asked for nothing
    assert int(params[1]["endTime"]) == NOW - 2 * 86_400_000 - NOW % (4 * HOUR) + 4 * HOUR - 1
    statistics = fetcher.statistics()
    assert statistics.ranges_skipped == 2
    assert statistics.ranges_fetched == 2
    assert statistics.candles_stored == 29
    assert len(store.candles("ETHUSDT", "4h", days_before_now(5))) == 29


async def test_a_long_range_is_fetched_in_pages(tmp_path: Path) -> None:
    with trio.fail_after(GUARD):
        async with simulated(tmp_path, FetcherConfig(page_size=100)) as (_, fetcher, tr, store):
            stored = await fetcher.fill("SOLUSDT", "1m", bars_before_now("1m", 1000))
    assert stored == 1000
    opens = store.candles("SOLUSDT", "1m", DateRange.from_ms(0, NOW)).open_time
    assert np.all(np.diff(opens) == MINUTE)
    assert len(tr.klines_params()) == 10
    assert store.covered("SOLUSDT", "1m") == [(int(opens[0]), NOW // MINUTE * MINUTE)]


@pytest.mark.parametrize("timeframe", TIMEFRAMES)
async def test_every_timeframe_fills(tmp_path: Path, timeframe: str) -> None:
    length = TIMEFRAME_MS[timeframe]
    window = bars_before_now(timeframe, 50)
    with trio.fail_after(GUARD):
        async with simulated(tmp_path) as (_, fetcher, _transport, store):
            stored = await fetcher.fill("XRPUSDT", timeframe, window)
    assert stored == 50
    assert np.all(np.diff(store.candles("XRPUSDT", timeframe, window).open_time) == length)


async def test_a_symbol_the_exchange_does_not_list_fails_clearly(tmp_path: Path) -> None:
    with trio.fail_after(GUARD):
        async with simulated(tmp_path) as (_, fetcher, _transport, store):
            with pytest.raises(KlinesUnavailable, match=r"answered 400: .*Invalid symbol"):
                await fetcher.fill("NOPEUSDT", "1h", days_before_now(1))
    assert store.covered("NOPEUSDT", "1h") == []


async def test_a_malformed_page_stores_nothing_of_itself_and_loses_nothing_before(
    tmp_path: Path,
) -> None:
    window = bars_before_now("1m", 300)
    with trio.fail_after(GUARD):
        async with simulated(tmp_path, FetcherConfig(page_size=100)) as (_, fetcher, tr, store):
            # Request 1 is the server time; 2 the first page; 3 the second.
            tr.faults[3] = reply(httpx.Response(200, json=[[1, "1.0", "x"]]))
            with pytest.raises(MalformedKlines, match="row 0: expected a list of at least 6"):
                await fetcher.fill("BNBUSDT", "1m", window)
            kept = store.covered("BNBUSDT", "1m")
            tr.faults[5] = reply(httpx.Response(200, text="<html>busy</html>"))
            with pytest.raises(MalformedKlines, match="not JSON"):
                await fetcher.fill("BNBUSDT", "1m", window)
            resumed = await fetcher.fill("BNBUSDT", "1m", window)
    first = window.start_ms()
    assert kept == [(first, first + 100 * MINUTE)]  # the first page, and only it
    assert resumed == 200
    assert len(store.candles("BNBUSDT", "1m", window)) == 300
    starts = [int(p["startTime"]) for p in tr.klines_params()]
    assert starts == [first, first + 100 * MINUTE, first + 100 * MINUTE, first + 100 * MINUTE,
                      first + 200 * MINUTE]  # fmt: skip


@asynccontextmanager
async def dropping_server() -> AsyncIterator[int]:
    """A TCP server on loopback that reads a request and hangs up without answering."""

    async def drop(stream: trio.SocketStream) -> None:
        await stream.receive_some(65536)
        await stream.aclose()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            functools.partial(trio.serve_tcp, host="127.0.0.1"), drop, 0
        )
        yield listeners[0].socket.getsockname()[1]
        nursery.cancel_scope.cancel()


async def test_a_connection_dropped_mid_fill_keeps_the_pages_stored(tmp_path: Path) -> None:
    window = bars_before_now("1m", 300)
    with trio.fail_after(GUARD):
        async with (
            dropping_server() as port,
            simulated(tmp_path, FetcherConfig(page_size=100)) as (_, fetcher, tr, store),
        ):
            elsewhere = httpx.AsyncHTTPTransport()

            async def hang_up(request: httpx.Request) -> httpx.Response:
                request.url = request.url.copy_with(port=port)
                return await elsewhere.handle_async_request(request)

            tr.faults[3] = hang_up
            with pytest.raises(KlinesUnavailable, match="failed: RemoteProtocolError"):
                await fetcher.fill("ETHUSDT", "1m", window)
            kept = store.covered("ETHUSDT", "1m")
            resumed = await fetcher.fill("ETHUSDT", "1m", window)
            await elsewhere.aclose()
    first = window.start_ms()
    assert kept == [(first, first + 100 * MINUTE)]
    assert resumed == 200
    assert len(store.candles("ETHUSDT", "1m", window)) == 300


# --- rate limits, in virtual time, against a fake exchange ------------------------


class FakeExchange:
    """Binance-shaped ``/api/v3/time`` and ``/api/v3/klines`` from arithmetic, no sockets.

    ``replies`` holds canned responses for the next requests, in order;
    ``used_weight`` is sent as ``X-MBX-USED-WEIGHT-1M`` when set.
    """

    def __init__(self) -> None:
        self.replies: list[httpx.Response] = []
        self.used_weight: int | None = None
        self.times: list[float] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.times.append(trio.current_time())
        if self.replies:
            return self.replies.pop(0)
        headers = (
            {} if self.used_weight is None else {"X-MBX-USED-WEIGHT-1M": str(self.used_weight)}
        )
        if request.url.path == "/api/v3/time":
            return httpx.Response(200, json={"serverTime": NOW}, headers=headers)
        params = request.url.params
        step = TIMEFRAME_MS[params["interval"]]
        first = -(-int(params["startTime"]) // step) * step
        last = min(int(params["endTime"]), NOW) // step * step
        opens = range(first, last + 1, step)[: int(params["limit"])]
        rows = [[t, "1.0", "2.0", "0.5", "1.5", "10.0", t + step - 1, "15", 3, "5", "7", "0"]
                for t in opens]  # fmt: skip
        return httpx.Response(200, json=rows, headers=headers)


@asynccontextmanager
async def fake(
    tmp_path: Path, config: FetcherConfig | None = None
) -> AsyncIterator[tuple[FakeExchange, CandleFetcher, SqliteCandleStore]]:
    exchange = FakeExchange()
    store = SqliteCandleStore(tmp_path / "candles.db")
    async with open_candle_fetcher(
        store, "http://exchange.invalid", config, transport=httpx.MockTransport(exchange)
    ) as fetcher:
        yield exchange, fetcher, store
    store.close()


async def test_429_waits_for_its_retry_after_then_goes_on(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with fake(tmp_path) as (exchange, fetcher, store):
        exchange.replies = [
            httpx.Response(200, json={"serverTime": NOW}),
            httpx.Response(429, headers={"Retry-After": "7"}, json={"code": -1003}),
        ]
        start = trio.current_time()
        stored = await fetcher.fill("BTCUSDT", "1h", bars_before_now("1h", 24))
    assert stored == 24
    assert exchange.times == [start, start, start + 7]  # asked again exactly 7 s later
    assert fetcher.statistics().rate_limit_waits == 1
    assert fetcher.statistics().rate_limit_wait_seconds == 7
    assert len(store.candles("BTCUSDT", "1h", bars_before_now("1h", 24))) == 24


async def test_418_without_retry_after_waits_a_minute_and_gives_up_after_the_retries(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with fake(tmp_path, FetcherConfig(max_rate_limit_retries=2)) as (exchange, fetcher, _):
        exchange.replies = [httpx.Response(418) for _ in range(3)]
        start = trio.current_time()
        with pytest.raises(RateLimited, match="still rate-limited after 2 waits"):
            await fetcher.fill("BTCUSDT", "1h", days_before_now(1))
    assert exchange.times == [start, start + 60, start + 120]
    assert fetcher.statistics().rate_limit_waits == 3


async def test_the_weight_budget_spreads_requests_over_minutes(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    # 5 weight a minute: the time request (1) and two pages (2 each) fit in the first.
    config = FetcherConfig(weight_budget=5, page_size=10)
    async with fake(tmp_path, config) as (exchange, fetcher, store):
        start = trio.current_time()
        stored = await fetcher.fill("BTCUSDT", "1h", bars_before_now("1h", 50))
    assert stored == 50
    assert [t - start for t in exchange.times] == [0, 0, 0, 60, 60, 120]
    assert fetcher.statistics().rate_limit_waits == 2
    assert len(store.candles("BTCUSDT", "1h", DateRange.from_ms(0, NOW))) == 50


async def test_the_exchanges_used_weight_header_counts_against_the_budget(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with fake(tmp_path, FetcherConfig(weight_budget=100)) as (exchange, fetcher, _):
        exchange.used_weight = 99  # other clients of this IP used nearly all of it
        start = trio.current_time()
        await fetcher.fill("BTCUSDT", "1h", days_before_now(1))
    assert [t - start for t in exchange.times] == [0, 60]


async def test_fill_many_fills_each_symbol_under_one_budget(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with fake(tmp_path, FetcherConfig(weight_budget=7)) as (exchange, fetcher, store):
        stored = await fetcher.fill_many(["A", "B", "C", "D"], "1d", bars_before_now("1d", 10))
    assert stored == {"A": 10, "B": 10, "C": 10, "D": 10}
    # The time once (1), then 4 x klines (2) = 9 weight: the time and three
    # fills in the first minute, one in the next.
    assert len(exchange.times) == 5
    assert max(exchange.times) - min(exchange.times) == 60
    assert store.symbols("1d") == ["A", "B", "C", "D"]
    with pytest.raises(ValueError, match="concurrency must be"):
        await fetcher.fill_many(["A"], "1d", days_before_now(1), concurrency=0)


async def test_fill_each_fails_one_symbol_alone_and_asks_the_time_once(tmp_path: Path) -> None:
    done: list[int] = []
    window = bars_before_now("1d", 30)
    with trio.fail_after(GUARD):
        async with simulated(tmp_path) as (_, fetcher, transport, store):
            failed = await fetcher.fill_each(
                ["BTCUSDT", "NOPEUSDT", "ETHUSDT"], "1d", window, on_filled=done.append
            )
    assert list(failed) == ["NOPEUSDT"]
    assert isinstance(failed["NOPEUSDT"], KlinesUnavailable)
    assert "Invalid symbol" in str(failed["NOPEUSDT"])
    assert len(store.candles("BTCUSDT", "1d", window)) == 30
    assert len(store.candles("ETHUSDT", "1d", window)) == 30
    assert sorted(done) == [1, 2, 3]
    assert [r.url.path for r in transport.requests].count("/api/v3/time") == 1


async def test_fill_each_fails_every_symbol_when_the_exchanges_time_cannot_be_had(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with fake(tmp_path) as (exchange, fetcher, store):
        exchange.replies = [httpx.Response(503, text="down")]
        failed = await fetcher.fill_each(["A", "B"], "1d", days_before_now(1))
    assert list(failed) == ["A", "B"]
    assert failed["A"] is failed["B"]
    assert isinstance(failed["A"], KlinesUnavailable)
    assert store.covered("A", "1d") == []


async def test_a_bad_server_time_is_refused(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with fake(tmp_path) as (exchange, fetcher, _):
        exchange.replies = [httpx.Response(200, json={"serverTime": "soon"})]
        with pytest.raises(MalformedKlines, match="/api/v3/time answered"):
            await fetcher.fill("BTCUSDT", "1h", days_before_now(1))


def test_the_fast_parse_reads_what_the_row_by_row_parse_reads() -> None:
    rows = [
        [HOUR * i, "1.50", " 2.25", "1.0e0", "1.75", "1000.00000000", 0, "x"] for i in range(50)
    ]
    fast = _well_formed(rows)
    assert fast is not None
    assert fast.tolist() == [list(_parse_row(row, "row")) for row in rows]
    # Anything the row-by-row parse refuses, the fast one hands back to it.
    for bad in ([0, "1", "1", "1", 1.0, "1"], [True, *"11111"], [0, "1", "1", "1", "inf", "1"]):
        assert _well_formed([*rows, bad]) is None


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"code": -1}, "expected a list of rows, got dict"),
        ([[0, "1", "1", "1", "1"]], "row 0: expected a list of at least 6 fields"),
        ([["0", "1", "1", "1", "1", "1"]], "open time '0' is not a whole number"),
        ([[0, "1", "1", "1", "nan", "1"]], "close 'nan' is not a non-negative decimal"),
        ([[0, "1", "1", "1", 1.0, "1"]], "close 1.0 is not a non-negative decimal"),
        ([[0, "1", "1", "1", "-1", "1"]], "close '-1' is not a non-negative"),
        ([[5, "1", "1", "1", "1", "1"]], "off the 1h grid"),
        ([[HOUR, *"111111"], [0, *"111111"]], "not strictly increasing"),
        ([[0, *"111111"], [0, *"111111"]], "not strictly increasing"),
        ([[HOUR * 5, *"111111"]], "outside"),
        ([[0, "1", "1", "2", "1", "1"]], "a low above the open or close"),
    ],
)
def test_malformed_klines_are_named(body: object, message: str) -> None:
    with pytest.raises(MalformedKlines, match=message):
        _parse_klines(body, "BTCUSDT", "1h", HOUR, 0, 5 * HOUR)


def test_fetcher_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="weight_budget must be an int >= 2"):
        FetcherConfig(weight_budget=1)
    with pytest.raises(ValueError, match=r"page_size must be an int in 1\.\.1000"):
        FetcherConfig(page_size=1001)
    with pytest.raises(ValueError, match="max_rate_limit_retries must be an int >= 0"):
        FetcherConfig(max_rate_limit_retries=-1)


@pytest.mark.subprocess
def test_the_docs_example_runs_and_prints_what_the_page_shows() -> None:
    example = ROOT / "docs" / "examples" / "candles_example.py"
    result = subprocess.run(
        [sys.executable, str(example)], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    page = (ROOT / "docs" / "candles.md").read_text()
    printed = result.stdout.strip()
    assert printed
    assert printed in page
    figures = json.loads(printed.splitlines()[-1])
    assert figures["second_fill_requests"] == 1
