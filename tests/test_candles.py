"""The candle seam's values and the embedded SQLite store.

The store is tested on real files in ``tmp_path``: reads, upserts, coverage,
the schema shared with ``services.market.store``, pickling to a real worker
process (which opens its own connection), reopening after a fork, and the
faults: an unknown symbol, ``:memory:``, a failing write that keeps nothing.
"""

from __future__ import annotations

import datetime
import itertools
import os
import pickle
import sqlite3
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

import engine
from services.market.candles import (
    TIMEFRAME_MS,
    TIMEFRAMES,
    CandleRepository,
    Candles,
    CandleStore,
    DateRange,
    PostgresCandleStore,
    SqliteCandleStore,
    UnknownSymbol,
)
from services.market.candles._model import merge_ranges, missing_ranges
from services.market.scans import KlinesLike, latest_values, parse_formula, rsi
from services.market.store import migrate_sqlite, open_database, pending_migrations

DAY = 86_400_000
JAN1 = 1_704_067_200_000  # 2024-01-01T00:00:00Z
UTC = datetime.UTC


def bars(start: int, count: int, step: int = DAY, base: float = 100.0) -> Candles:
    """``count`` bars from ``start``, with closes base, base+1, ..."""
    closes = base + np.arange(count, dtype=np.float64)
    opens = closes - 0.5
    return Candles(
        start + step * np.arange(count, dtype=np.int64),
        opens,
        closes + 1,
        opens - 1,
        closes,
        np.full(count, 10.0),
    )


# --- values -------------------------------------------------------------------


def test_timeframes_and_their_lengths() -> None:
    assert TIMEFRAMES == ("1m", "5m", "15m", "1h", "4h", "1d")
    assert list(TIMEFRAME_MS) == list(TIMEFRAMES)
    assert TIMEFRAME_MS["1m"] * 60 == TIMEFRAME_MS["1h"]
    assert TIMEFRAME_MS["4h"] * 6 == TIMEFRAME_MS["1d"] == DAY


def test_date_range_of_dates_spans_whole_utc_days() -> None:
    year = DateRange(datetime.date(2024, 1, 1), datetime.date(2024, 12, 31))
    assert year.start_ms() == JAN1
    assert year.end_ms() == JAN1 + 366 * DAY  # 2024 is a leap year; the end day is included
    one_day = DateRange(datetime.date(2024, 1, 1), datetime.date(2024, 1, 1))
    assert one_day.end_ms() - one_day.start_ms() == DAY


def test_date_range_of_datetimes_is_half_open_and_any_zone() -> None:
    start = datetime.datetime(2024, 1, 1, 6, tzinfo=UTC)
    plus_two = datetime.timezone(datetime.timedelta(hours=2))
    end = datetime.datetime(2024, 1, 1, 14, tzinfo=plus_two)  # 12:00 UTC
    window = DateRange(start, end)
    assert window.start_ms() == JAN1 + 6 * 3_600_000
    assert window.end_ms() == JAN1 + 12 * 3_600_000
    assert DateRange.from_ms(window.start_ms(), window.end_ms()) == DateRange(
        start, end.astimezone(UTC)
    )


def test_date_range_refuses_end_before_start_and_naive_datetimes() -> None:
    with pytest.raises(ValueError, match=r"end \(2024-01-01\) is before its start"):
        DateRange(datetime.date(2024, 1, 2), datetime.date(2024, 1, 1))
    with pytest.raises(ValueError, match="start must be a timezone-aware"):
        DateRange(datetime.datetime(2024, 1, 1), datetime.date(2024, 1, 2))
    with pytest.raises(ValueError, match="end must be a timezone-aware"):
        DateRange(datetime.date(2024, 1, 1), datetime.datetime(2024, 1, 2))
    with pytest.raises(TypeError, match=r"start must be a datetime\.date"):
        DateRange("2024-01-01", datetime.date(2024, 1, 2))  # type: ignore[arg-type]


def test_candles_are_klines_like_arrays_of_one_length() -> None:
    candles = bars(JAN1, 30)
    klines: KlinesLike = candles  # mypy checks the protocol; the scan below uses it
    values = latest_values(parse_formula("rsi14 > 50 and close > sma20").indicators, klines)
    assert values["close"] == 129.0
    assert values["sma20"] == pytest.approx(119.5)
    assert len(candles) == 30
    assert candles.open_time.dtype == np.int64
    assert candles.close.dtype == np.float64
    assert rsi(candles.close, 14)[-1] == pytest.approx(100.0)  # only rising closes
    with pytest.raises(ValueError, match=r"Candles\.close has 2 values but open_time has 3"):
        Candles([1, 2, 3], [1.0] * 3, [1.0] * 3, [1.0] * 3, [1.0] * 2, [1.0] * 3)
    assert len(Candles.empty()) == 0
    assert Candles.from_rows(candles.rows()).rows() == candles.rows()
    assert len(candles.between(JAN1 + DAY, JAN1 + 3 * DAY)) == 2


def test_ranges_merge_and_gaps_are_what_is_not_covered() -> None:
    assert merge_ranges([(5, 9), (0, 3), (3, 4), (8, 12), (20, 20)]) == [(0, 4), (5, 12)]
    gaps, skipped = missing_ranges(0, 30, [(5, 10), (12, 15), (40, 50)])
    assert gaps == [(0, 5), (10, 12), (15, 30)]
    assert skipped == 2
    assert missing_ranges(6, 9, [(5, 10)]) == ([], 1)
    assert missing_ranges(0, 10, []) == ([(0, 10)], 0)


def test_unknown_symbol_is_a_key_error_that_says_what_is_missing() -> None:
    error = UnknownSymbol("NOPEUSDT", "1d")
    assert isinstance(error, KeyError)
    assert str(error) == "no 1d candles for symbol 'NOPEUSDT'"
    again = pickle.loads(pickle.dumps(error))
    assert (again.symbol, again.timeframe, str(again)) == ("NOPEUSDT", "1d", str(error))


# --- the SQLite store -----------------------------------------------------------


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqliteCandleStore]:
    opened = SqliteCandleStore(tmp_path / "candles.db")
    yield opened
    opened.close()


def test_store_satisfies_both_protocols(store: SqliteCandleStore) -> None:
    assert isinstance(store, CandleRepository)
    assert isinstance(store, CandleStore)


def test_written_candles_read_back_within_the_range(store: SqliteCandleStore) -> None:
    assert store.write("BTCUSDT", "1d", bars(JAN1, 40)) == 40
    january = DateRange(datetime.date(2024, 1, 1), datetime.date(2024, 1, 31))
    got = store.candles("BTCUSDT", "1d", january)
    assert len(got) == 31
    assert got.open_time[0] == JAN1
    assert got.rows() == bars(JAN1, 31).rows()
    february_first = DateRange(datetime.date(2024, 2, 1), datetime.date(2024, 2, 1))
    assert store.candles("BTCUSDT", "1d", february_first).close.tolist() == [131.0]
    later = DateRange(datetime.date(2025, 1, 1), datetime.date(2025, 1, 1))
    assert len(store.candles("BTCUSDT", "1d", later)) == 0  # known symbol, nothing there


def test_an_unknown_symbol_or_timeframe_raises_clearly(store: SqliteCandleStore) -> None:
    store.write("BTCUSDT", "1d", bars(JAN1, 3))
    year = DateRange(datetime.date(2024, 1, 1), datetime.date(2024, 12, 31))
    with pytest.raises(UnknownSymbol, match="no 1d candles for symbol 'ETHUSDT'"):
        store.candles("ETHUSDT", "1d", year)
    with pytest.raises(UnknownSymbol, match="no 1h candles for symbol 'BTCUSDT'"):
        store.candles("BTCUSDT", "1h", year)
    with pytest.raises(ValueError, match="timeframe must be one of 1m, 5m, 15m, 1h, 4h, 1d"):
        store.candles("BTCUSDT", "7m", year)


def test_a_write_upserts_and_records_what_it_covers(store: SqliteCandleStore) -> None:
    store.write("BTCUSDT", "1d", bars(JAN1, 10))
    store.write("BTCUSDT", "1d", bars(JAN1 + 5 * DAY, 10, base=500.0))
    got = store.candles("BTCUSDT", "1d", DateRange.from_ms(JAN1, JAN1 + 20 * DAY))
    assert len(got) == 15
    assert got.close[4] == 104.0  # kept
    assert got.close[5] == 500.0  # replaced by the later write
    assert store.covered("BTCUSDT", "1d") == [(JAN1, JAN1 + 15 * DAY)]
    # An empty write can still say a range holds nothing (before a listing).
    store.write("BTCUSDT", "1d", Candles.empty(), covers=(JAN1 - 30 * DAY, JAN1))
    store.write("BTCUSDT", "1d", bars(JAN1 + 40 * DAY, 2))
    assert store.covered("BTCUSDT", "1d") == [
        (JAN1 - 30 * DAY, JAN1 + 15 * DAY),
        (JAN1 + 40 * DAY, JAN1 + 42 * DAY),
    ]
    assert store.covered("BTCUSDT", "1h") == []
    assert store.symbols("1d") == ["BTCUSDT"]
    with pytest.raises(ValueError, match="covers must be"):
        store.write("BTCUSDT", "1d", Candles.empty(), covers=(5, 1))


def test_a_failing_write_keeps_nothing_of_itself(store: SqliteCandleStore) -> None:
    store.write("BTCUSDT", "1d", bars(JAN1, 3))
    poisoned = bars(JAN1 + 3 * DAY, 3)
    poisoned.close[1] = np.nan  # NOT NULL refuses the NaN (sqlite3 stores NaN as NULL)
    with pytest.raises(sqlite3.IntegrityError):
        store.write("BTCUSDT", "1d", poisoned)
    got = store.candles("BTCUSDT", "1d", DateRange.from_ms(JAN1, JAN1 + 10 * DAY))
    assert len(got) == 3
    assert store.covered("BTCUSDT", "1d") == [(JAN1, JAN1 + 3 * DAY)]


def test_the_store_refuses_an_in_memory_database() -> None:
    for path in (":memory:", "", "file::memory:?cache=shared"):
        with pytest.raises(ValueError, match="worker processes cannot see an in-memory"):
            SqliteCandleStore(path)


def test_the_store_pickles_as_its_path(store: SqliteCandleStore) -> None:
    store.write("BTCUSDT", "1d", bars(JAN1, 3))  # opens a connection
    data = pickle.dumps(store)
    assert len(data) < 200
    again = pickle.loads(data)
    assert again.path == store.path
    assert len(again.candles("BTCUSDT", "1d", DateRange.from_ms(0, JAN1 + DAY))) == 1


def _count_in_worker(store: SqliteCandleStore) -> tuple[int, int]:
    year = DateRange(datetime.date(2024, 1, 1), datetime.date(2024, 12, 31))
    return os.getpid(), len(store.candles("BTCUSDT", "1d", year))


async def test_a_worker_process_reads_through_its_own_connection(
    store: SqliteCandleStore,
) -> None:
    store.write("BTCUSDT", "1d", bars(JAN1, 365))
    with trio.fail_after(60):
        pid, count = await engine.to_process(_count_in_worker, store)
    assert pid != os.getpid()
    assert count == 365


@pytest.mark.skipif(sys.platform == "win32", reason="fork is POSIX")
def test_a_forked_child_opens_its_own_connection(store: SqliteCandleStore) -> None:
    store.write("BTCUSDT", "1d", bars(JAN1, 5))
    parent_connection = store._connection
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: read, report, and leave without running the parent's cleanup
        try:
            fresh = store.candles("BTCUSDT", "1d", DateRange.from_ms(0, JAN1 + 10 * DAY))
            ok = len(fresh) == 5 and store._connection is not parent_connection
            os.write(write, b"ok" if ok else b"no")
        finally:
            os._exit(0)
    os.close(write)
    answer = os.read(read, 2)
    os.close(read)
    os.waitpid(pid, 0)
    assert answer == b"ok"
    assert store._connection is parent_connection  # the parent's is untouched


async def test_async_writes_run_in_a_thread_and_share_the_file_with_the_database(
    tmp_path: Path,
) -> None:
    path = tmp_path / "market.db"
    async with open_database(path) as database:
        await database.migrate("failures", ["CREATE TABLE f (x INTEGER)"])
        store = SqliteCandleStore(path)
        assert await store.write_async("BTCUSDT", "1h", bars(JAN1, 4, step=3_600_000)) == 4
        assert await store.covered_async("BTCUSDT", "1h") == [(JAN1, JAN1 + 4 * 3_600_000)]
        versions = await database.run(
            lambda c: sorted(c.execute("SELECT part, version FROM schema_version").fetchall())
        )
        await store.aclose()
    assert versions == [("candles", 1), ("failures", 1)]


def test_a_file_from_a_newer_release_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "newer.db"
    with sqlite3.connect(path) as connection:
        connection.execute("CREATE TABLE schema_version (part TEXT PRIMARY KEY, version INTEGER)")
        connection.execute("INSERT INTO schema_version VALUES ('candles', 99)")
    connection.close()
    store = SqliteCandleStore(path)
    with pytest.raises(ValueError, match="version 99, newer than this code's 1"):
        store.covered("BTCUSDT", "1d")


class _RecordingStore(SqliteCandleStore):
    """A store that keeps every connection it opens, to see what became of them."""

    opened: list[sqlite3.Connection]

    def _open(self) -> sqlite3.Connection:
        connection = super()._open()
        self.opened = [*getattr(self, "opened", []), connection]
        return connection


def test_a_failed_migration_closes_the_connection_it_opened(tmp_path: Path) -> None:
    path = tmp_path / "newer.db"
    with sqlite3.connect(path) as connection:
        connection.execute("CREATE TABLE schema_version (part TEXT PRIMARY KEY, version INTEGER)")
        connection.execute("INSERT INTO schema_version VALUES ('candles', 99)")
    connection.close()
    store = _RecordingStore(path)
    for _ in range(2):  # each call tries afresh, and keeps nothing of its failed try
        with pytest.raises(ValueError, match="version 99"):
            store.candles("BTCUSDT", "1d", DateRange.from_ms(0, DAY))
        assert store._connection is None
    assert len(store.opened) == 2
    for opened in store.opened:
        with pytest.raises(sqlite3.ProgrammingError, match="closed"):
            opened.execute("SELECT 1")


def test_each_store_and_its_subclasses_speak_their_drivers_placeholders() -> None:
    class Sub(PostgresCandleStore):
        pass

    statements = ("_SELECT", "_ANY", "_UPSERT", "_COVERAGE", "_UNCOVER", "_COVER")
    for store, mark, other in (
        (SqliteCandleStore, "?", "%s"),
        (_RecordingStore, "?", "%s"),
        (PostgresCandleStore, "%s", "?"),
        (Sub, "%s", "?"),
    ):
        for name in statements:
            sql = getattr(store, name)
            assert mark in sql, (store, name)
            assert other not in sql, (store, name)


def test_pending_migrations_are_the_tail_past_the_version() -> None:
    assert pending_migrations("p", 0, ("a", "b")) == ("a", "b")
    assert pending_migrations("p", 1, ("a", "b")) == ("b",)
    assert pending_migrations("p", 2, ("a", "b")) == ()
    with pytest.raises(ValueError, match="schema of 'p' is version 3, newer than this code's 2"):
        pending_migrations("p", 3, ("a", "b"))


def test_migrate_sqlite_on_a_file_another_writer_holds_fails_and_keeps_nothing(
    tmp_path: Path,
) -> None:
    path = tmp_path / "locked.db"
    mine = sqlite3.connect(path, isolation_level=None, timeout=0)
    other = sqlite3.connect(path, isolation_level=None)
    try:
        assert migrate_sqlite(mine, "first", ["CREATE TABLE a (x)"]) == 1
        other.execute("BEGIN IMMEDIATE")  # another process is writing the file
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            migrate_sqlite(mine, "second", ["CREATE TABLE b (x)"])
        assert not mine.in_transaction
        other.execute("ROLLBACK")
        assert migrate_sqlite(mine, "second", ["CREATE TABLE b (x)"]) == 1
        assert migrate_sqlite(mine, "first", ["CREATE TABLE a (x)"]) == 1  # ran once only
    finally:
        mine.close()
        other.close()


def test_a_failing_migration_on_an_autocommit_connection_keeps_nothing(tmp_path: Path) -> None:
    connection = sqlite3.connect(tmp_path / "fail.db", isolation_level=None)
    try:
        assert migrate_sqlite(connection, "p", ["CREATE TABLE a (x)"]) == 1
        with pytest.raises(sqlite3.OperationalError, match="already exists"):
            migrate_sqlite(
                connection, "p", ["CREATE TABLE a (x)", "CREATE TABLE b (x); CREATE TABLE a (y)"]
            )
        assert not connection.in_transaction
        tables = connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
        assert sorted(row[0] for row in tables) == ["a", "schema_version"]
        version = connection.execute("SELECT version FROM schema_version WHERE part = 'p'")
        assert version.fetchone() == (1,)
    finally:
        connection.close()


def _write_in_worker(store: SqliteCandleStore, symbol: str) -> int:
    return store.write(symbol, "1d", bars(JAN1, 100))


async def test_processes_opening_a_new_file_at_once_migrate_it_once(tmp_path: Path) -> None:
    store = SqliteCandleStore(tmp_path / "fresh.db")
    written: list[int] = []

    async def write(symbol: str) -> None:
        written.append(await engine.to_process(_write_in_worker, store, symbol))

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            for symbol in ("AUSDT", "BUSDT", "CUSDT"):
                nursery.start_soon(write, symbol)
    assert written == [100, 100, 100]
    assert store.symbols("1d") == ["AUSDT", "BUSDT", "CUSDT"]
    with sqlite3.connect(store.path) as connection:
        versions = connection.execute("SELECT part, version FROM schema_version").fetchall()
    connection.close()
    store.close()
    assert versions == [("candles", 1)]


@given(
    st.integers(0, 100),
    st.integers(0, 100),
    st.lists(st.tuples(st.integers(0, 120), st.integers(0, 120)), max_size=8),
)
def test_gaps_and_coverage_tile_the_range_exactly(
    start: int, length: int, covered: list[tuple[int, int]]
) -> None:
    end = start + length
    gaps, _ = missing_ranges(start, end, covered)
    merged = merge_ranges(covered)
    inside = {t for lo, hi in merged for t in range(lo, hi)}
    assert {t for lo, hi in gaps for t in range(lo, hi)} == set(range(start, end)) - inside
    assert all(lo < hi for lo, hi in gaps)
    assert all(a[1] < b[0] for a, b in itertools.pairwise(gaps))  # disjoint, not touching
    assert all(a[1] < b[0] for a, b in itertools.pairwise(merged))
