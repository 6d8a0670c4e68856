"""The stored failure history: the SQLite store, /api/history/failures, the watchlist's rows."""

from __future__ import annotations

import json
import math
import sqlite3
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
import trio
import trio.testing
from prometheus_client import CollectorRegistry, generate_latest

from engine._metrics import EngineCollector
from services.market.api import build_api
from services.market.cycles import Watchlist, WatchlistConfig
from services.market.store import (
    FailureHistory,
    FailureRecord,
    open_database,
    open_failure_history,
)

from ._promlint import lint
from .test_watchlist_breaker import BASE, EPOCH, SERVER_ERROR, Exchange

GUARD = 10
T0 = 1_700_000_000.0


class Clock:
    """A wall clock a test moves by hand."""

    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


async def record_some(history: FailureHistory, clock: Clock) -> None:
    history.record(1, "BTCUSDT", "timeout", "request deadline of 2 s expired")
    clock.now += 1
    history.record(1, "ETHUSDT", "error", "HTTP 500: boom (code -1000)")
    clock.now += 1
    history.record(2, "ETHUSDT", "breaker", "closed->open")
    await history.flush()


ROWS = [
    FailureRecord(round(T0 * 1000) + 2000, 2, "ETHUSDT", "breaker", "closed->open"),
    FailureRecord(round(T0 * 1000) + 1000, 1, "ETHUSDT", "error", "HTTP 500: boom (code -1000)"),
    FailureRecord(round(T0 * 1000), 1, "BTCUSDT", "timeout", "request deadline of 2 s expired"),
]


# --- the store ------------------------------------------------------------------------


async def test_rows_come_back_newest_first_and_survive_reopening_the_file(tmp_path: Path) -> None:
    path = tmp_path / "history.sqlite"
    clock = Clock()
    with trio.fail_after(GUARD):
        async with open_failure_history(path, wall_clock=clock) as history:
            await record_some(history, clock)
            assert await history.query() == ROWS
            stats = history.statistics()
            assert (stats.recorded, stats.written, stats.flushes, stats.pending) == (3, 3, 1, 0)
        # A restart: a new process opens the same file.
        async with open_failure_history(path, wall_clock=clock) as history:
            assert await history.query() == ROWS
            assert await history.query(symbol="ETHUSDT", kind="error") == [ROWS[1]]
            assert await history.query(since_ms=ROWS[1].at_ms) == ROWS[:2]
            assert await history.query(limit=1) == ROWS[:1]
            assert await history.query(symbol="SOLUSDT") == []
        # WAL mode, and the migration ran once in the file's life.
        async with open_database(path) as database:
            mode = await database.run(lambda c: c.execute("PRAGMA journal_mode").fetchone()[0])
            versions = await database.run(
                lambda c: c.execute("SELECT part, version FROM schema_version").fetchall()
            )
    assert mode == "wal"
    assert versions == [("failures", 1)]


async def test_pruning_on_write_keeps_the_newest_max_rows(tmp_path: Path) -> None:
    clock = Clock()
    with trio.fail_after(GUARD):
        async with open_failure_history(tmp_path / "h", max_rows=2, wall_clock=clock) as history:
            await record_some(history, clock)
            assert await history.query() == ROWS[:2]
            history.record(3, "SOLUSDT", "error", "late")
            await history.flush()
            assert [r.symbol for r in await history.query()] == ["SOLUSDT", "ETHUSDT"]
            assert history.statistics().pruned == 2


async def test_pruning_on_write_drops_rows_older_than_max_age(tmp_path: Path) -> None:
    clock = Clock()
    with trio.fail_after(GUARD):
        async with open_failure_history(tmp_path / "h", max_age=60, wall_clock=clock) as history:
            await record_some(history, clock)  # at T0, T0 + 1, T0 + 2
            clock.now = T0 + 61.5  # the first two are now older than 60 s
            history.record(9, "SOLUSDT", "timeout", "batch deadline of 4 s expired")
            await history.flush()
            rows = await history.query()
    assert [(r.cycle, r.symbol) for r in rows] == [(9, "SOLUSDT"), (2, "ETHUSDT")]
    assert history.statistics().pruned == 2


async def test_a_full_queue_drops_its_oldest_rows_and_counts_them(tmp_path: Path) -> None:
    with trio.fail_after(GUARD):
        async with open_failure_history(tmp_path / "h", queue_size=2, flush_rows=2) as history:
            for cycle in (1, 2, 3):
                history.record(cycle, "BTCUSDT", "error", "down")
            await history.flush()
            assert [r.cycle for r in await history.query()] == [3, 2]
    stats = history.statistics()
    assert (stats.recorded, stats.dropped, stats.written) == (3, 1, 2)


async def test_the_run_writes_at_flush_rows_and_what_is_queued_when_cancelled(
    tmp_path: Path,
) -> None:
    with trio.fail_after(GUARD):
        async with (
            open_failure_history(tmp_path / "h", flush_every=1000, flush_rows=2) as history,
            trio.open_nursery() as nursery,
        ):
            await nursery.start(history.run)
            history.record(1, "BTCUSDT", "error", "down")
            await trio.sleep(0.05)
            assert history.statistics().flushes == 0  # 1 row < flush_rows; 1000 s to go
            history.record(1, "ETHUSDT", "error", "down")  # flush_rows: the run writes
            await trio.testing.wait_all_tasks_blocked()
            await history.flush()  # waits for the run's write, then finds nothing queued
            assert history.statistics().flushes == 1
            history.record(2, "SOLUSDT", "timeout", "late")
            nursery.cancel_scope.cancel()
        # The cancelled run wrote the last row before the file closed.
        async with open_failure_history(tmp_path / "h") as reopened:
            symbols = [r.symbol for r in await reopened.query()]
    assert sorted(symbols) == ["BTCUSDT", "ETHUSDT", "SOLUSDT"]
    assert history.statistics().flushes == 2


async def test_the_run_writes_every_flush_every_in_virtual_time(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    history_at = open_failure_history(tmp_path / "h", flush_every=1)
    async with history_at as history, trio.open_nursery() as nursery:
        await nursery.start(history.run)
        history.record(1, "BTCUSDT", "error", "down")
        await trio.sleep(0.999)
        assert history.statistics().flushes == 0
        await trio.sleep(0.002)  # the run's write started at 1.0 and holds the writer's lock
        await history.flush()  # so this waits for it, and finds nothing queued
        stats = history.statistics()
        assert (stats.flushes, stats.written) == (1, 1)
        nursery.cancel_scope.cancel()


async def test_bad_settings_and_arguments_are_refused_with_their_name(tmp_path: Path) -> None:
    with trio.fail_after(GUARD):
        async with open_database(":memory:") as database:
            with pytest.raises(ValueError, match="max_rows must be >= 1, got 0"):
                FailureHistory(database, max_rows=0)
            with pytest.raises(ValueError, match="flush_every must be finite"):
                FailureHistory(database, flush_every=math.inf)
            with pytest.raises(TypeError, match="database must be a Database"):
                FailureHistory(":memory:")  # type: ignore[arg-type]
            history = FailureHistory(database)
            with pytest.raises(ValueError, match="kind must be one of timeout, error, breaker"):
                history.record(1, "BTCUSDT", "oops", "")
            with pytest.raises(ValueError, match="kind must be one of"):
                await history.query(kind="oops")
            with pytest.raises(ValueError, match="limit must be >= 1"):
                await history.query(limit=0)
            with pytest.raises(TypeError, match="migrations must be a sequence of SQL strings"):
                await database.migrate("x", "CREATE TABLE x (a)")
        with pytest.raises(trio.ClosedResourceError, match="is closed"):
            await database.run(lambda c: None)


async def test_a_migration_that_fails_leaves_the_file_as_it_was(tmp_path: Path) -> None:
    path = tmp_path / "m"
    with trio.fail_after(GUARD):
        async with open_database(path) as database:
            assert await database.migrate("candles", ["CREATE TABLE a (x)"]) == 1
            with pytest.raises(sqlite3.OperationalError):
                await database.migrate(
                    "candles", ["CREATE TABLE a (x)", "CREATE TABLE b (x); nope"]
                )
            tables = await database.run(_tables)
            assert tables == ["a", "schema_version"]
            assert (
                await database.migrate("candles", ["CREATE TABLE a (x)", "CREATE TABLE b (x)"]) == 2
            )
        async with open_database(path) as database:
            with pytest.raises(ValueError, match="version 2, newer than this code's 1"):
                await database.migrate("candles", ["CREATE TABLE a (x)"])
            assert await database.run(_tables) == ["a", "b", "schema_version"]


def _tables(connection: sqlite3.Connection) -> list[str]:
    rows = connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()
    return sorted(name for (name,) in rows if not name.startswith("sqlite_"))


# --- the API --------------------------------------------------------------------------


async def test_the_api_answers_with_filters_and_refuses_bad_values(tmp_path: Path) -> None:
    clock = Clock()
    with trio.fail_after(GUARD):
        async with open_failure_history(tmp_path / "h", wall_clock=clock) as history:
            await record_some(history, clock)
            transport = httpx.ASGITransport(app=build_api(history=history))
            async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
                everything = (await client.get("/history/failures")).json()
                eth = await client.get("/history/failures", params={"symbol": "ETHUSDT"})
                kind = await client.get("/history/failures", params={"kind": "timeout"})
                since_ms = {"since": str(ROWS[1].at_ms)}
                since_iso = {"since": "2023-11-14T22:13:21+00:00"}  # T0 + 1 s
                by_ms = await client.get("/history/failures", params=since_ms)
                by_iso = await client.get("/history/failures", params=since_iso)
                limited = await client.get("/history/failures", params={"limit": 1})
                bad = {
                    name: await client.get("/history/failures", params={name: value})
                    for name, value in [
                        ("symbol", "btc"), ("kind", "warning"), ("since", "yesterday"),
                        ("since", "2023-11-14T22:13:21"), ("limit", "0"), ("sort", "asc"),
                    ]
                }  # fmt: skip
                described = (await client.get("/openapi.json")).json()
    assert everything == {
        "failures": [
            {
                "at": "2023-11-14T22:13:22.000Z",
                "at_ms": 1_700_000_002_000,
                "cycle": 2,
                "symbol": "ETHUSDT",
                "kind": "breaker",
                "detail": "closed->open",
            },
            {
                "at": "2023-11-14T22:13:21.000Z",
                "at_ms": 1_700_000_001_000,
                "cycle": 1,
                "symbol": "ETHUSDT",
                "kind": "error",
                "detail": "HTTP 500: boom (code -1000)",
            },
            {
                "at": "2023-11-14T22:13:20.000Z",
                "at_ms": 1_700_000_000_000,
                "cycle": 1,
                "symbol": "BTCUSDT",
                "kind": "timeout",
                "detail": "request deadline of 2 s expired",
            },
        ],
        "count": 3,
    }
    assert [r["kind"] for r in eth.json()["failures"]] == ["breaker", "error"]
    assert [r["symbol"] for r in kind.json()["failures"]] == ["BTCUSDT"]
    assert by_ms.json() == by_iso.json()
    assert by_ms.json()["count"] == 2
    assert limited.json()["count"] == 1
    assert {name: r.status_code for name, r in bad.items()} == dict.fromkeys(bad, 400)
    errors = [r.json()["error"] for r in bad.values()]
    assert errors[0] == "symbol must hold upper-case Binance symbols like 'BTCUSDT', got 'btc'"
    assert errors[1] == "kind must be one of timeout, error, breaker, got 'warning'"
    assert errors[2].startswith("since must be milliseconds since the epoch")
    assert "'2023-11-14T22:13:21'" in bad["since"].json()["error"]  # no offset: refused too
    assert errors[-2] == "limit must be an integer from 1 to 10000, got '0'"
    assert errors[-1] == "unknown query parameter(s) sort; known: symbol, since, kind, limit"
    assert "/api/history/failures" in described["paths"]


async def test_without_a_history_the_route_is_absent() -> None:
    transport = httpx.ASGITransport(app=build_api())
    with trio.fail_after(GUARD):
        async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
            assert (await client.get("/history/failures")).status_code == 404
            described = (await client.get("/openapi.json")).json()
    assert "/api/history/failures" not in described["paths"]


# --- the watchlist --------------------------------------------------------------------


def exchange_where_sol_hangs(exchange: Exchange) -> Callable[[], httpx.AsyncClient]:
    async def handle(request: httpx.Request) -> httpx.Response:
        if "SOLUSDT" in request.url.params["symbols"]:
            await trio.sleep_forever()
        return await exchange.handle(request)

    return lambda: httpx.AsyncClient(transport=httpx.MockTransport(handle))


async def test_the_watchlist_records_timeouts_errors_and_circuit_changes(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    # ETHUSDT answers 500 (retried once), SOLUSDT never answers (2 s request
    # deadline). Cycles every 5 s; three failing cycles open both circuits;
    # the probes of the cycle at 75 (60 s after 12) fail and open them again.
    # A cycle's failures are recorded as it ends.
    exchange = Exchange(failing="ETHUSDT", fail_from=0, fail_until=math.inf)
    config = WatchlistConfig(
        BASE, ("BTCUSDT", "ETHUSDT", "SOLUSDT"), interval=5, batch_size=1, breaker_cooldown=60
    )

    def wall_clock() -> float:
        return EPOCH + trio.current_time()

    async with open_failure_history(tmp_path / "h", wall_clock=wall_clock) as history:
        watchlist = Watchlist(
            config,
            client_factory=exchange_where_sol_hangs(exchange),
            wall_clock=wall_clock,
            recorder=history,
        )
        with trio.move_on_at(78):
            await watchlist.run()
        assert history.statistics().flushes == 0  # not running: all still queued
        await history.flush()
        rows = await history.query()
    rows.reverse()  # oldest first
    error = f"HTTP 500: {SERVER_ERROR['msg']} (code {SERVER_ERROR['code']})"
    timeout = "request deadline of 2 s expired"
    got = [(r.at_ms - round(EPOCH * 1000), r.cycle, r.symbol, r.kind, r.detail) for r in rows]
    assert got == [
        (2000, 1, "ETHUSDT", "error", error),
        (2000, 1, "SOLUSDT", "timeout", timeout),
        (7000, 2, "ETHUSDT", "error", error),
        (7000, 2, "SOLUSDT", "timeout", timeout),
        (12000, 3, "ETHUSDT", "breaker", "closed->open"),  # as the cycle ends
        (12000, 3, "SOLUSDT", "breaker", "closed->open"),
        (12000, 3, "ETHUSDT", "error", error),
        (12000, 3, "SOLUSDT", "timeout", timeout),
        (75000, 16, "ETHUSDT", "breaker", "open->half_open"),  # cooldown over: probes
        (75000, 16, "SOLUSDT", "breaker", "open->half_open"),
        (77000, 16, "ETHUSDT", "breaker", "half_open->open"),
        (77000, 16, "SOLUSDT", "breaker", "half_open->open"),
        (77000, 16, "ETHUSDT", "error", error),
        (77000, 16, "SOLUSDT", "timeout", timeout),
    ]
    # Nothing for BTCUSDT, nor for the cycles that left the two out.
    assert watchlist.statistics().skipped_symbols == 2 * 12  # cycles 4 to 15


async def test_the_page_shows_what_the_endpoint_answers(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    page = (Path(__file__).parent.parent / "docs" / "watchlist.md").read_text()
    section = page[page.index("## Failure history") : page.index("## Testing it")]
    shown = json.loads(section.split("```json\n")[1].split("```")[0])
    refusal = section.split("kind=warning'\n")[1].split("\n")[0]
    exchange = Exchange(failing="ETHUSDT", fail_from=0, fail_until=math.inf)
    config = WatchlistConfig(BASE, ("BTCUSDT", "ETHUSDT", "SOLUSDT"), interval=5, batch_size=1)

    def wall_clock() -> float:
        return EPOCH + trio.current_time()

    async with open_failure_history(tmp_path / "h", wall_clock=wall_clock) as history:
        client_factory = exchange_where_sol_hangs(exchange)
        watchlist = Watchlist(
            config, client_factory=client_factory, wall_clock=wall_clock, recorder=history
        )
        with trio.move_on_at(13):  # three cycles: ETHUSDT's circuit opens as the third ends
            await watchlist.run()
        await history.flush()
        transport = httpx.ASGITransport(app=build_api(history=history))
        async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
            params = {"symbol": "ETHUSDT", "limit": "2"}
            answer = await client.get("/history/failures", params=params)
            refused = await client.get("/history/failures", params={"kind": "warning"})
    assert answer.json() == shown
    assert refused.status_code == 400
    assert refused.text == refusal


async def test_the_watchlist_refuses_a_recorder_without_record() -> None:
    config = WatchlistConfig(BASE, ("BTCUSDT",))
    with pytest.raises(TypeError, match="recorder must have a record"):
        Watchlist(config, recorder=object())  # type: ignore[arg-type]


async def test_the_statistics_follow_the_metric_conventions() -> None:
    with trio.fail_after(GUARD):
        async with open_failure_history(":memory:", max_rows=1) as history:
            history.record(1, "BTCUSDT", "error", "down")
            history.record(2, "BTCUSDT", "error", "down")
            await history.flush()
            history.record(3, "BTCUSDT", "error", "down")
            registry = CollectorRegistry()
            registry.register(EngineCollector(None, {"history": history}, None))
            text = generate_latest(registry).decode()
    assert lint(text) == []
    assert 'engine_failure_history_written_total{source="history"} 2.0' in text
    assert 'engine_failure_history_pruned_total{source="history"} 1.0' in text
    assert 'engine_failure_history_pending{source="history"} 1.0' in text


def test_the_store_package_exports_exactly_its_api() -> None:
    from services.market import store

    assert store.__all__ == [
        "KINDS",
        "Database",
        "FailureHistory",
        "FailureHistoryStatistics",
        "FailureRecord",
        "FailureRecorder",
        "migrate_sqlite",
        "open_database",
        "open_failure_history",
        "pending_migrations",
    ]
    for name in store.__all__:
        assert getattr(store, name).__doc__, name


async def test_flush_rows_past_the_queue_size_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"flush_rows \(600\) must be <= queue_size \(500\)"):
        async with open_failure_history(tmp_path / "h", queue_size=500, flush_rows=600):
            pass
