"""Scans through the service's path: the seed 002 table row by row, the API, the command."""

from __future__ import annotations

import functools
import json
import math
import os
import subprocess
import sys
from collections.abc import AsyncIterator

import attrs
import httpx
import pytest
import trio

import engine
import engine.testing
from services.market.api import build_api
from services.market.scans import (
    FormulaError,
    Klines,
    ScanConfig,
    ScanJob,
    Scans,
    ScansBusy,
    SimulatedKlines,
    parse_formula,
    universe,
)

ANCHOR_MS = 1_700_000_000_000
KLINES = SimulatedKlines(anchor_ms=ANCHOR_MS)


@attrs.frozen
class FlakyKlines(SimulatedKlines):
    """Candles that cannot be had for one symbol (an exchange error, say)."""

    broken: str = ""

    def klines(self, symbol: str) -> Klines:
        if symbol == self.broken:
            raise ConnectionError(f"no candles for {symbol}")
        return super().klines(symbol)


@pytest.fixture
async def scans() -> AsyncIterator[Scans]:
    # Threads: the same path as processes for everything but the pool, without
    # paying for process starts in every test (the rows below use processes).
    running = Scans(ScanConfig(symbols=60, workers=2), KLINES, bridge="thread")
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


def test_simulated_klines_are_the_simulators_history() -> None:
    klines = KLINES.klines("BTCUSDT")
    assert len(klines) == 250
    # The walk is anchored: the candle holding the anchor closes at the base price.
    assert klines.close[-1] == 65_000.0
    assert (klines.high >= klines.close).all()
    assert (klines.low <= klines.close).all()
    with pytest.raises(ValueError, match="interval must be one of"):
        SimulatedKlines(anchor_ms=ANCHOR_MS, interval="2d")
    with pytest.raises(ValueError, match="bars must be at most 1000"):
        SimulatedKlines(anchor_ms=ANCHOR_MS, bars=5_000)


# -- seed 002's acceptance table, row by row, on the scan path -------------------------


async def test_row_2500_symbols_complete_well_within_30_seconds() -> None:
    scans = Scans(ScanConfig(workers=2), KLINES)
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
    job = ScanJob(parse_formula("rsi14 < 30 or close > sma50"), KLINES)
    expected = [symbol for symbol in scans.symbols[:200] if job(symbol).matched]
    assert [r.symbol for r in scan.matches() if r.symbol in set(scans.symbols[:200])] == expected


async def test_row_a_symbol_past_its_60s_deadline_is_recorded_and_the_scan_goes_on(
    autojump_clock: trio.abc.Clock,
) -> None:
    hung = universe(20)[7]
    bridge = engine.testing.VirtualBridge(duration=lambda s: math.inf if s == hung else 1.0)
    scans = Scans(ScanConfig(symbols=20, workers=2, item_deadline=60), KLINES, bridge=bridge)
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
    broken = universe(30)[4]
    scans = Scans(
        ScanConfig(symbols=30),
        FlakyKlines(anchor_ms=ANCHOR_MS, broken=broken),
        bridge=engine.testing.VirtualBridge(duration=lambda s: 0.001),
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(scans.run)
        scan = scans.start("close > 0")
        await scan.wait()
        nursery.cancel_scope.cancel()
    (error,) = scan.errors()
    assert error.symbol == broken
    assert error.status == "error"
    assert error.error == f"ConnectionError: no candles for {broken}"
    assert scan.summary().matched == 29


async def test_row_the_pool_lives_in_the_scans_block_and_is_gone_after() -> None:
    scans = Scans(ScanConfig(symbols=20, workers=2), KLINES)
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
    scans = Scans(ScanConfig(symbols=10, workers=workers), KLINES)
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
    assert scans.statistics().started == 0


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
    scans = Scans(ScanConfig(symbols=40, workers=2), KLINES, bridge=bridge)
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
    job = ScanJob(parse_formula("rsi14 > 50 and close > sma20"), KLINES)
    assert [r["symbol"] for r in results] == [s for s in universe(60) if job(s).matched]
    assert set(results[0]["values"]) == {"rsi14", "close", "sma20"}
    everything = (await api.get(f"{location}?all=true&limit=5")).json()["results"]
    assert [r["symbol"] for r in everything] == list(universe(5))
    listing = (await api.get("/api/scans")).json()
    assert [s["id"] for s in listing] == [response.json()["id"]]


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ({"formula": "rsi14 < 3O"}, "unexpected 'O'"),
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
        ("colour=red", "unknown query parameter(s) colour; known: limit, all"),
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
def test_command_prints_json_results_that_match_the_job() -> None:
    formula = "rsi14 > 55 or close < bb_lower20"
    result = _command(
        "--formula", formula, "--symbols", "200", "--workers", "2",
        "--epoch-ms", str(ANCHOR_MS), "--json", "--limit", "200",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    body = json.loads(result.stdout)
    assert body["scan"]["completed"] == 200
    job = ScanJob(parse_formula(formula), KLINES)
    assert [m["symbol"] for m in body["matches"]] == [s for s in universe(200) if job(s).matched]


@pytest.mark.subprocess
def test_command_prints_a_table_and_rejects_a_bad_formula() -> None:
    table = _command(
        "--formula", "close > sma50", "--symbols", "30", "--workers", "1",
        "--epoch-ms", str(ANCHOR_MS), "--limit", "3",
    )  # fmt: skip
    assert table.returncode == 0, table.stderr
    assert "close > sma50:" in table.stdout
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
    assert lines[-1] == "done: 23 of 500 matched, 0 failed"
    assert len(lines) == 9
