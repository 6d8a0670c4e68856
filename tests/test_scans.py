"""Scans through the service's path: the seed 002 table row by row, the API, the command."""

from __future__ import annotations

import datetime
import functools
import json
import math
import os
import pathlib
import subprocess
import sys
from collections.abc import AsyncIterator, Mapping, Sequence

import httpx
import pytest
import trio

import engine
import engine.testing
from services.market.api import build_api
from services.market.candles import DateRange, SqliteCandleStore
from services.market.scans import (
    FormulaError,
    ScanConfig,
    ScanJob,
    Scans,
    ScansBusy,
    parse_formula,
    rsi,
    universe,
)
from tests.processing_support import SyntheticRepository

ANCHOR_MS = 1_700_000_000_000  # 2023-11-14T22:13:20Z
DAY_MS = 86_400_000
REPOSITORY = SyntheticRepository()
# The default window: the 250 closed daily bars before the anchor's day.
WINDOW = DateRange.from_ms(
    ANCHOR_MS // DAY_MS * DAY_MS - 250 * DAY_MS, ANCHOR_MS // DAY_MS * DAY_MS
)


def _scans(config: ScanConfig, **options: object) -> Scans:
    return Scans(config, REPOSITORY, clock=lambda: ANCHOR_MS, **options)  # type: ignore[arg-type]


def _job(formula: str, date_range: DateRange = WINDOW, **parameters: int) -> ScanJob:
    return ScanJob(parse_formula(formula).bind(parameters), REPOSITORY, "1d", date_range)


@pytest.fixture
async def scans() -> AsyncIterator[Scans]:
    # Threads: the same path as processes for everything but the pool, without
    # paying for process starts in every test (the rows below use processes).
    running = _scans(ScanConfig(symbols=60, workers=2), bridge="thread")
    async with trio.open_nursery() as nursery:
        await nursery.start(running.run)
        yield running
        nursery.cancel_scope.cancel()


def test_the_universe_is_distinct_deterministic_and_starts_with_the_defaults() -> None:
    names = universe(2_500)
    assert len(set(names)) == 2_500
    assert names[:2] == ("BTCUSDT", "ETHUSDT")
    assert universe(2_500) == names
    assert universe(2_500, seed=1) != names
    with pytest.raises(ValueError, match="count must be >= 1"):
        universe(0)


def test_a_job_reports_every_bar_where_the_formula_holds_and_the_last_bars_values() -> None:
    job = _job("rsi14 < 45")
    result = job("BTCUSDT")
    candles = REPOSITORY.candles("BTCUSDT", "1d", job.reading())
    series = rsi(candles.close, 14)
    in_window = candles.open_time >= WINDOW.start_ms()
    expected = candles.open_time[in_window & (series < 45)].tolist()
    assert list(result.matches) == expected
    assert expected  # the walk dips below 45 somewhere in 250 days
    assert result.values["rsi14"] == pytest.approx(series[-1])
    assert result.close == candles.close[-1]
    assert result.matched == (series[-1] < 45)
    assert candles.open_time[-1] == WINDOW.end_ms() - DAY_MS  # the last closed bar
    # The warm-up bars are read but never reported.
    assert candles.open_time[0] < WINDOW.start_ms() <= min(result.matches)


def test_parameters_feed_the_periods() -> None:
    named = _job("rsi(period) < 45 and close > sma(slow)", period=14, slow=50)("ETHUSDT")
    written = _job("rsi14 < 45 and close > sma50")("ETHUSDT")
    assert named.matches == written.matches
    assert named.values == written.values


# -- seed 002's acceptance table, row by row, on the scan path -------------------------


async def test_row_2500_symbols_complete_well_within_30_seconds() -> None:
    scans = _scans(ScanConfig(workers=2))
    async with trio.open_nursery() as nursery:
        await nursery.start(scans.run)
        with trio.fail_after(30):
            scan = scans.start("rsi14 < 30 or close > sma50")
            await scan.wait()
        nursery.cancel_scope.cancel()
    summary = scan.summary()
    assert (summary.status, summary.total, summary.completed) == ("done", 2_500, 2_500)
    assert summary.failed == 0
    assert len(scan.results()) == 2_500
    # The same answer as the job run here, symbol by symbol.
    job = _job("rsi14 < 30 or close > sma50")
    expected = [job(symbol) for symbol in scans.symbols[:200]]
    first = set(scans.symbols[:200])
    assert [r for r in scan.results() if r.symbol in first] == expected


async def test_row_a_symbol_past_its_60s_deadline_is_recorded_and_the_scan_goes_on(
    autojump_clock: trio.abc.Clock,
) -> None:
    hung = universe(20)[7]
    bridge = engine.testing.VirtualBridge(duration=lambda s: math.inf if s == hung else 1.0)
    scans = _scans(ScanConfig(symbols=20, workers=2, item_deadline=60), bridge=bridge)
    async with trio.open_nursery() as nursery:
        await nursery.start(scans.run)
        scan = scans.start("close > 0")
        await scan.wait()
        nursery.cancel_scope.cancel()
    summary = scan.summary()
    assert (summary.status, summary.completed, summary.matched, summary.failed) == (
        "done",
        20,
        19,
        1,
    )
    (error,) = scan.errors()
    assert (error.symbol, error.status) == (hung, "timeout")
    assert "item deadline of 60 s expired" in error.error
    # Its chunk was cut at 30 s and re-run item by item: the hung one is cut
    # 60 s after its own start, so the whole scan takes under two deadlines.
    assert trio.current_time() < 120


async def test_row_a_raising_symbol_is_recorded_and_the_scan_goes_on() -> None:
    symbols = [*universe(29)[:4], "RAISE1", *universe(29)[4:]]
    scans = _scans(
        ScanConfig(symbols=30), bridge=engine.testing.VirtualBridge(duration=lambda s: 0.001)
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(scans.run)
        scan = scans.start("close > 0", symbols)
        await scan.wait()
        nursery.cancel_scope.cancel()
    (error,) = scan.errors()
    assert error.symbol == "RAISE1"
    assert error.status == "error"
    assert error.error == "RuntimeError: store unavailable for RAISE1"
    assert scan.summary().matched == 29


async def test_row_the_pool_lives_in_the_scans_block_and_is_gone_after() -> None:
    scans = _scans(ScanConfig(symbols=20, workers=2))
    async with trio.open_nursery() as nursery:
        await nursery.start(scans.run)
        assert scans._pool is not None
        scan = scans.start("close > 0")
        await scan.wait()
        nursery.cancel_scope.cancel()
    assert scans._pool is None
    # The plugin's leak check fails this test if a worker outlived the block.


async def test_row_progress_is_reported_for_every_symbol(scans: Scans) -> None:
    seen: list[tuple[int, int]] = []
    scan = scans.start("rsi14 > 50", on_progress=lambda done, total: seen.append((done, total)))
    await scan.wait()
    assert seen == [(n, 60) for n in range(1, 61)]


@pytest.mark.parametrize("workers", [1, 3])
async def test_row_the_worker_count_is_configurable(workers: int) -> None:
    scans = _scans(ScanConfig(symbols=10, workers=workers))
    async with trio.open_nursery() as nursery:
        await nursery.start(scans.run)
        assert scans._pool is not None
        assert scans._pool.workers == workers
        nursery.cancel_scope.cancel()
    assert ScanConfig().workers is None  # None: one worker per CPU, as the pool defaults


# -- starting, refusing, cancelling -----------------------------------------------------


async def test_bad_formulas_and_symbols_are_refused_before_anything_runs(scans: Scans) -> None:
    with pytest.raises(FormulaError, match="unknown indicator 'rsx14'"):
        scans.start("rsx14 < 30")
    with pytest.raises(ValueError, match="at least one symbol"):
        scans.start("close > 0", [])
    with pytest.raises(ValueError, match="must not repeat"):
        scans.start("close > 0", ["BTCUSDT", "BTCUSDT"])
    with pytest.raises(ValueError, match="timeframe must be one of 1m, 5m"):
        scans.start("close > 0", timeframe="2d")
    with pytest.raises(FormulaError, match="no value for parameter"):
        scans.start("rsi(period) < 30")
    with pytest.raises(FormulaError, match="unknown parameter"):
        scans.start("rsi14 < 30", parameters={"period": 14})
    assert scans.statistics().started == 0


async def test_a_scan_covers_its_date_range_and_timeframe(scans: Scans) -> None:
    year = DateRange(datetime.date(2023, 3, 1), datetime.date(2023, 8, 31))
    scan = scans.start("rsi14 < 40", timeframe="4h", date_range=year)
    await scan.wait()
    summary = scan.summary()
    assert (summary.timeframe, summary.start_ms, summary.end_ms) == (
        "4h",
        year.start_ms(),
        year.end_ms(),
    )
    job = ScanJob(parse_formula("rsi14 < 40"), REPOSITORY, "4h", year)
    assert scan.results() == [job(symbol) for symbol in scans.symbols]
    assert summary.bars_matched == sum(len(r.matches) for r in scan.results()) > 0
    assert summary.matched_in_range == len(scan.matches_in_range()) > summary.matched
    assert all(year.start_ms() <= t < year.end_ms() for r in scan.results() for t in r.matches)


class _Fill:
    """A store filler that cannot fill some symbols, and can be held up."""

    def __init__(self, unfillable: Sequence[str] = (), *, hold: bool = False) -> None:
        self.unfillable = unfillable
        self.hold = hold
        self.calls: list[tuple[tuple[str, ...], str, DateRange]] = []

    async def __call__(
        self, symbols: Sequence[str], timeframe: str, date_range: DateRange
    ) -> Mapping[str, BaseException]:
        self.calls.append((tuple(symbols), timeframe, date_range))
        if self.hold:
            await trio.sleep_forever()
        return {s: ConnectionError(f"no klines for {s}") for s in self.unfillable}


async def test_the_store_is_filled_before_the_scan_and_an_unfillable_symbol_fails_alone() -> None:
    fill = _Fill([universe(10)[3]])
    bridge = engine.testing.VirtualBridge(duration=lambda s: 0.001)
    scans = _scans(ScanConfig(symbols=10), fill=fill, bridge=bridge)
    async with trio.open_nursery() as nursery:
        await nursery.start(scans.run)
        scan = scans.start("close > 0")
        await scan.wait()
        nursery.cancel_scope.cancel()
    ((symbols, timeframe, reading),) = fill.calls
    assert (symbols, timeframe) == (universe(10), "1d")
    # The fill covers the warm-up bars the job reads, not just the range.
    assert reading == _job("close > 0").reading()
    (error,) = scan.errors()
    assert (error.symbol, error.status) == (universe(10)[3], "error")
    assert error.error == f"ConnectionError: no klines for {universe(10)[3]}"
    summary = scan.summary()
    assert (summary.completed, summary.matched, summary.failed) == (10, 9, 1)


async def test_a_scan_cancelled_while_the_store_fills_ends_with_every_symbol_cancelled(
    autojump_clock: trio.abc.Clock,
) -> None:
    scans = _scans(ScanConfig(symbols=5), fill=_Fill(hold=True), bridge="thread")
    async with trio.open_nursery() as nursery:
        await nursery.start(scans.run)
        scan = scans.start("close > 0")
        await trio.sleep(1)
        scan.cancel()
        await scan.wait()
        nursery.cancel_scope.cancel()
    assert scan.summary().status == "cancelled"
    assert [(e.symbol, e.status) for e in scan.errors()] == [(s, "cancelled") for s in universe(5)]


async def test_a_second_scan_is_refused_while_one_runs(scans: Scans) -> None:
    first = scans.start("close > 0")
    with pytest.raises(ScansBusy, match="at most 1 at once"):
        scans.start("close > 1")
    await first.wait()
    second = scans.start("close > 1")
    await second.wait()
    assert scans.statistics() == type(scans.statistics())(
        started=2, running=0, finished=2, refused=1
    )


async def test_a_cancelled_scan_has_one_outcome_per_symbol(autojump_clock: trio.abc.Clock) -> None:
    bridge = engine.testing.VirtualBridge(duration=lambda s: 1.0)
    scans = _scans(ScanConfig(symbols=40, workers=2), bridge=bridge)
    async with trio.open_nursery() as nursery:
        await nursery.start(scans.run)
        scan = scans.start("close > 0")
        await trio.sleep(5.5)
        scan.cancel()
        await scan.wait()
        nursery.cancel_scope.cancel()
    summary = scan.summary()
    assert summary.status == "cancelled"
    assert 0 < summary.completed < 40
    assert len(scan.results()) + len(scan.errors()) == 40
    assert {e.status for e in scan.errors()} == {"cancelled"}


def test_scan_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="symbols must be >= 1"):
        ScanConfig(symbols=0)
    with pytest.raises(ValueError, match="item_deadline must be > 0"):
        ScanConfig(item_deadline=0)
    with pytest.raises(ValueError, match="workers must be >= 1"):
        ScanConfig(workers=0)
    with pytest.raises(ValueError, match="timeframe must be one of"):
        ScanConfig(timeframe="1w")
    with pytest.raises(ValueError, match="bars must be at most 1,000"):
        ScanConfig(bars=1_001)


# -- the HTTP API ------------------------------------------------------------------------


@pytest.fixture
async def api(scans: Scans) -> AsyncIterator[httpx.AsyncClient]:
    # Made first: creating a client loads certificates, blocking the loop ~0.1 s.
    async with httpx.AsyncClient() as client, trio.open_nursery() as nursery:
        serve = functools.partial(
            engine.serve_ops, None, "127.0.0.1", 0, routes={"/api": build_api(scans=scans)}
        )
        ops = await nursery.start(serve)
        client.base_url = httpx.URL(ops.url)
        yield client
        nursery.cancel_scope.cancel()


async def _finished(client: httpx.AsyncClient, location: str) -> dict[str, object]:
    with trio.fail_after(30):
        while True:
            body: dict[str, object] = (await client.get(location)).json()
            if body["scan"]["status"] != "running":  # type: ignore[index]
                return body
            await trio.sleep(0.05)


async def test_api_starts_a_scan_reports_progress_and_results(api: httpx.AsyncClient) -> None:
    response = await api.post("/api/scans", json={"formula": "rsi14 > 50 and close > sma20"})
    assert response.status_code == 202
    location = response.headers["location"]
    assert location == f"/api/scans/{response.json()['id']}"
    assert response.json()["total"] == 60
    body = await _finished(api, location)
    scan = body["scan"]
    assert isinstance(scan, dict)
    assert (scan["status"], scan["completed"], scan["failed"]) == ("done", 60, 0)
    results = body["results"]
    assert isinstance(results, list)
    assert len(results) == scan["matched"]
    job = _job("rsi14 > 50 and close > sma20")
    assert [r["symbol"] for r in results] == [s for s in universe(60) if job(s).matched]
    assert set(results[0]["values"]) == {"rsi14", "close", "sma20"}
    everything = (await api.get(f"{location}?all=true&limit=5")).json()["results"]
    assert [r["symbol"] for r in everything] == list(universe(5))
    listing = (await api.get("/api/scans")).json()
    assert [s["id"] for s in listing] == [response.json()["id"]]


async def test_api_scans_a_range_with_parameters_and_shows_it_in_range(
    api: httpx.AsyncClient,
) -> None:
    body = {
        "formula": "rsi(period) < 40",
        "timeframe": "1d",
        "start": "2023-04-01",
        "end": "2023-09-30",
        "parameters": {"period": 10},
    }
    response = await api.post("/api/scans", json=body)
    assert response.status_code == 202, response.text
    finished = await _finished(api, response.headers["location"])
    scan = finished["scan"]
    assert isinstance(scan, dict)
    assert scan["formula"] == "rsi(10) < 40"
    assert (scan["start_ms"], scan["end_ms"]) == (1_680_307_200_000, 1_696_118_400_000)
    shown = (await api.get(f"{response.headers['location']}?in_range=true&limit=60")).json()
    job = _job("rsi10 < 40", DateRange(datetime.date(2023, 4, 1), datetime.date(2023, 9, 30)))
    expected = [job(s) for s in universe(60)]
    assert [(r["symbol"], r["matches"]) for r in shown["results"]] == [
        (r.symbol, list(r.matches)) for r in expected if r.matches
    ]
    assert scan["bars_matched"] == sum(len(r.matches) for r in expected)


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ({"formula": "rsi14 < 3O"}, "unexpected 'O'"),
        ({"formula": "close > 1", "timeframe": "2d"}, "timeframe must be one of"),
        ({"formula": "close > 1", "start": "2023-05-01", "end": "2023-04-01"}, "is before start"),
        ({"formula": "close > 1", "end": "2023-04-01"}, "end needs start"),
        ({"formula": "close > 1", "start": "May 1st"}, "Invalid RFC3339 encoded date"),
        ({"formula": "rsi(n) < 30"}, "no value for parameter(s) 'n'"),
        ({"formula": "rsi(n) < 30", "parameters": {"n": 0}}, "must be"),
        ({"formula": "rsi(n) < 30", "parameters": {"n": "x"}}, "Expected `int`"),
        ({"formula": "rsx14 < 30"}, "unknown indicator 'rsx14'"),
        ({"formula": "__import__(1) > 0"}, "unknown indicator '__import__'"),
        ({"formula": "close > 1", "symbols": ["NOPEUSDT"]}, "unknown symbols: NOPEUSDT"),
        ({"formula": 5}, "Expected `str`, got `int` - at `$.formula`"),
        ({"formul": "close > 1"}, "Object contains unknown field `formul`"),
    ],
)
async def test_api_refuses_bad_scan_requests_with_a_reason(
    api: httpx.AsyncClient, body: dict[str, object], reason: str
) -> None:
    response = await api.post("/api/scans", json=body)
    assert response.status_code == 400
    assert reason in response.json()["error"]


async def test_api_formula_errors_carry_the_position(api: httpx.AsyncClient) -> None:
    response = await api.post("/api/scans", json={"formula": "close > sma50 and rsx14 < 30"})
    assert response.status_code == 400
    assert response.json()["position"] == 18
    assert response.json()["formula"] == "close > sma50 and rsx14 < 30"


async def test_api_refuses_bad_bodies_parameters_and_methods(api: httpx.AsyncClient) -> None:
    assert (await api.post("/api/scans", content=b"{")).status_code == 400
    assert (await api.post("/api/scans", content=b"x" * 20_000)).status_code == 413
    assert (await api.get("/api/scans/99")).status_code == 404
    assert (await api.get("/api/scans?limit=3")).json()["error"].startswith("unknown query")
    assert (await api.put("/api/scans")).status_code == 405
    started = await api.post("/api/scans", json={"formula": "close > 0"})
    location = started.headers["location"]
    for query, reason in [
        ("limit=0", "limit must be an integer from 1 to 60, got '0'"),
        ("limit=ten", "limit must be an integer from 1 to 60, got 'ten'"),
        ("all=yes", "all must be true or false, got 'yes'"),
        ("colour=red", "unknown query parameter(s) colour; known: limit, all, in_range"),
        ("in_range=1", "in_range must be true or false, got '1'"),
        ("all=true&in_range=true", "all and in_range are two views: ask for one"),
    ]:
        response = await api.get(f"{location}?{query}")
        assert response.status_code == 400
        assert response.json()["error"] == reason
    busy = await api.post("/api/scans", json={"formula": "close > 1"})
    assert busy.status_code in (202, 429)  # 429 while the first still runs
    if busy.status_code == 429:
        assert busy.headers["retry-after"] == "1"
    await _finished(api, location)


async def test_api_cancels_a_scan(api: httpx.AsyncClient) -> None:
    started = await api.post("/api/scans", json={"formula": "close > 0"})
    cancelled = await api.delete(started.headers["location"])
    assert cancelled.status_code == 202
    body = await _finished(api, started.headers["location"])
    scan = body["scan"]
    assert isinstance(scan, dict)
    assert scan["status"] == "cancelled"


# -- the command line ---------------------------------------------------------------------


def _command(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "services.market", "scan", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, "COLUMNS": "120"},
    )


@pytest.mark.subprocess
def test_command_fetches_into_its_store_and_prints_what_the_job_finds_there(
    tmp_path: pathlib.Path,
) -> None:
    formula = "rsi14 > 55 or close < bb_lower20"
    path = str(tmp_path / "candles.sqlite")
    result = _command(
        "--formula", formula, "--symbols", "200", "--workers", "2", "--candles", path,
        "--epoch-ms", str(ANCHOR_MS), "--json", "--limit", "200",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    body = json.loads(result.stdout)
    assert body["scan"]["completed"] == 200
    store = SqliteCandleStore(path)
    job = ScanJob(parse_formula(formula), store, "1d", WINDOW)
    expected = [job(s) for s in universe(200)]
    store.close()
    assert [m["symbol"] for m in body["matches"]] == [r.symbol for r in expected if r.matched]
    assert body["scan"]["bars_matched"] == sum(len(r.matches) for r in expected)
    # Run again on the same store: nothing is fetched twice, the answer is the same.
    again = _command(
        "--formula", formula, "--symbols", "200", "--workers", "2", "--candles", path,
        "--epoch-ms", str(ANCHOR_MS), "--json", "--limit", "200",
    )  # fmt: skip
    assert json.loads(again.stdout)["matches"] == body["matches"]


@pytest.mark.subprocess
def test_command_prints_a_table_and_rejects_a_bad_formula() -> None:
    table = _command(
        "--formula", "close > sma50", "--symbols", "30", "--workers", "1",
        "--epoch-ms", str(ANCHOR_MS), "--limit", "3",
    )  # fmt: skip
    assert table.returncode == 0, table.stderr
    assert table.stdout.startswith("close > sma50\n  at the last bar (2023-11-13): ")
    assert "30 scanned in" in table.stdout
    bad = _command("--formula", "close >> 1")
    assert bad.returncode == 2
    assert "error: --formula:" in bad.stderr
    assert "close >> 1\n" in bad.stderr
    assert bad.stderr.rstrip().endswith("^")
    assert _command("--formula", "close > 1", "--symbols", "0").returncode == 2


@pytest.mark.subprocess
def test_docs_example_runs() -> None:
    example = os.path.join(os.path.dirname(__file__), "..", "docs", "examples", "scans_example.py")
    result = subprocess.run(
        [sys.executable, example], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[:5] == [f"progress {n}/500" for n in range(100, 600, 100)]
    assert lines[-1] == (
        "done: 25 of 500 matched at the last bar, 499 at some bar of 1d bars, 0 failed"
    )
    assert len(lines) == 9
