"""The embedded candle store: one SQLite file in WAL mode, read directly by worker processes."""

from __future__ import annotations

import os
import sqlite3
import threading
from typing import Any

import trio

import engine

from ._model import (
    Candles,
    DateRange,
    UnknownSymbol,
    check_covers,
    check_symbol,
    check_timeframe,
    default_covers,
    merge_ranges,
)

# The file's ``schema_version`` table is the one services.market.store's
# Database keeps (a row per part), so one file can hold the failure history
# and the candles, each migrating on its own.
_PART = "candles"
_VERSION_TABLE = (
    "CREATE TABLE IF NOT EXISTS schema_version (part TEXT PRIMARY KEY, version INTEGER NOT NULL)"
)
_VERSION = "SELECT version FROM schema_version WHERE part = ?"
# Append new migrations; never edit old ones.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE candles (
        symbol TEXT NOT NULL,
        timeframe TEXT NOT NULL,
        open_time INTEGER NOT NULL,
        open REAL NOT NULL,
        high REAL NOT NULL,
        low REAL NOT NULL,
        close REAL NOT NULL,
        volume REAL NOT NULL,
        PRIMARY KEY (symbol, timeframe, open_time)
    ) WITHOUT ROWID;
    CREATE TABLE candle_coverage (
        symbol TEXT NOT NULL,
        timeframe TEXT NOT NULL,
        start_ms INTEGER NOT NULL,
        end_ms INTEGER NOT NULL,
        PRIMARY KEY (symbol, timeframe, start_ms)
    ) WITHOUT ROWID
    """,
)

_SELECT = (
    "SELECT open_time, open, high, low, close, volume FROM candles"
    " WHERE symbol = ? AND timeframe = ? AND open_time >= ? AND open_time < ?"
    " ORDER BY open_time"
)
_ANY = "SELECT 1 FROM candles WHERE symbol = ? AND timeframe = ? LIMIT 1"
_UPSERT = (
    "INSERT INTO candles (symbol, timeframe, open_time, open, high, low, close, volume)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
    " ON CONFLICT (symbol, timeframe, open_time) DO UPDATE SET"
    " open = excluded.open, high = excluded.high, low = excluded.low,"
    " close = excluded.close, volume = excluded.volume"
)
_COVERAGE = (
    "SELECT start_ms, end_ms FROM candle_coverage WHERE symbol = ? AND timeframe = ?"
    " ORDER BY start_ms"
)


class SqliteCandleStore:
    """Candles in one SQLite file (WAL), keyed ``(symbol, timeframe, open_time)``.

    The default :class:`CandleRepository`: it pickles as its path, and each
    process opens its own connection on first use (and again after a fork,
    since a connection must not cross one). Reads are synchronous, for worker
    processes; the service writes through :meth:`write_async`, which runs
    :meth:`write` in a worker thread, never on the event loop. The schema is
    created on first use and migrated by part, in the same ``schema_version``
    table as :class:`services.market.store.Database`, so both can share a file.

    Args:
        path: the file (created if missing; its directory must exist).

    Raises:
        TypeError: ``path`` is not a path.
        ValueError: ``path`` is ``":memory:"`` or empty: worker processes
            could not see such a database.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        where = os.fspath(path)
        if not isinstance(where, str):
            raise TypeError(f"path must be a str path, got {path!r}")
        if where in ("", ":memory:") or where.startswith("file::memory:"):
            raise ValueError(
                f"SqliteCandleStore needs a file: worker processes cannot see an in-memory "
                f"database (got path={where!r})"
            )
        self.path = where
        self._connection: sqlite3.Connection | None = None
        self._pid = 0
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"SqliteCandleStore({self.path!r})"

    def __reduce__(self) -> tuple[type[SqliteCandleStore], tuple[str]]:
        return (SqliteCandleStore, (self.path,))

    def _connect(self) -> sqlite3.Connection:
        """This process's connection, opened (and the schema migrated) on first use."""
        pid = os.getpid()
        if self._connection is None or self._pid != pid:
            # A connection inherited through fork is the parent's: never used, never closed here.
            connection = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            try:
                connection.execute("PRAGMA journal_mode=WAL")
                connection.execute("PRAGMA synchronous=NORMAL")
                connection.execute("PRAGMA busy_timeout=30000")
                _migrate(connection)
            except BaseException:
                connection.close()
                raise
            self._connection, self._pid = connection, pid
        return self._connection

    def candles(self, symbol: str, timeframe: str, date_range: DateRange) -> Candles:
        """``symbol``'s bars of ``timeframe`` that open within ``date_range``, oldest first.

        Raises:
            UnknownSymbol: the store has no candles of ``timeframe`` for ``symbol``.
            ValueError: ``timeframe`` is not one of :data:`TIMEFRAMES`.
            sqlite3.Error: the file cannot be read.
        """
        check_timeframe(timeframe)
        check_symbol(symbol)
        key = (symbol, timeframe)
        with self._lock:
            connection = self._connect()
            rows = connection.execute(
                _SELECT, (*key, date_range.start_ms(), date_range.end_ms())
            ).fetchall()
            if not rows and connection.execute(_ANY, key).fetchone() is None:
                raise UnknownSymbol(symbol, timeframe)
        return Candles.from_rows(rows)

    def write(
        self,
        symbol: str,
        timeframe: str,
        candles: Candles,
        *,
        covers: tuple[int, int] | None = None,
    ) -> int:
        """Upsert ``candles`` and record ``covers`` as covered, in one transaction.

        Args:
            symbol: the symbol.
            timeframe: one of :data:`TIMEFRAMES`.
            candles: the bars; an existing bar with the same open time is replaced.
            covers: ``(start_ms, end_ms)`` the store now holds completely
                (every bar that exists there); by default the span of
                ``candles``, from the first open to the last close.

        Returns:
            The number of bars written.

        Raises:
            ValueError: a bad timeframe or ``covers``.
            sqlite3.Error: the write failed; nothing of it was kept.
        """
        timeframe_ms = check_timeframe(timeframe)
        check_symbol(symbol)
        check_covers(covers)
        span = covers if covers is not None else default_covers(timeframe_ms, candles)
        rows = [(symbol, timeframe, *row) for row in candles.rows()]
        with self._lock:
            connection = self._connect()
            connection.execute("BEGIN IMMEDIATE")
            try:
                connection.executemany(_UPSERT, rows)
                if span is not None:
                    _cover(connection, symbol, timeframe, span)
            except BaseException:
                connection.execute("ROLLBACK")
                raise
            connection.execute("COMMIT")
        return len(rows)

    async def write_async(
        self,
        symbol: str,
        timeframe: str,
        candles: Candles,
        *,
        covers: tuple[int, int] | None = None,
    ) -> int:
        """:meth:`write` in a worker thread.

        Cancellation:
            Waits for the transaction to end (``abandon_on_cancel=False``),
            then raises :class:`trio.Cancelled`; the write is kept whole.
        """
        return await engine.to_thread(
            self._write_kw, symbol, timeframe, candles, covers, abandon_on_cancel=False
        )

    def _write_kw(
        self, symbol: str, timeframe: str, candles: Candles, covers: tuple[int, int] | None
    ) -> int:
        return self.write(symbol, timeframe, candles, covers=covers)

    def covered(self, symbol: str, timeframe: str) -> list[tuple[int, int]]:
        """The ``[start_ms, end_ms)`` ranges held completely, sorted and disjoint.

        Raises:
            ValueError: ``timeframe`` is not one of :data:`TIMEFRAMES`.
            sqlite3.Error: the file cannot be read.
        """
        check_timeframe(timeframe)
        with self._lock:
            rows = self._connect().execute(_COVERAGE, (symbol, timeframe)).fetchall()
        return [(int(start), int(end)) for start, end in rows]

    async def covered_async(self, symbol: str, timeframe: str) -> list[tuple[int, int]]:
        """:meth:`covered` in a worker thread."""
        return await engine.to_thread(self.covered, symbol, timeframe, abandon_on_cancel=False)

    def symbols(self, timeframe: str) -> list[str]:
        """The symbols with candles of ``timeframe``, sorted.

        Raises:
            ValueError: ``timeframe`` is not one of :data:`TIMEFRAMES`.
        """
        check_timeframe(timeframe)
        with self._lock:
            rows = (
                self._connect()
                .execute(
                    "SELECT DISTINCT symbol FROM candle_coverage WHERE timeframe = ?"
                    " ORDER BY symbol",
                    (timeframe,),
                )
                .fetchall()
            )
        return [str(row[0]) for row in rows]

    def close(self) -> None:
        """Close this process's connection; the next call opens a new one."""
        with self._lock:
            if self._connection is not None and self._pid == os.getpid():
                self._connection.close()
            self._connection = None

    async def aclose(self) -> None:
        """:meth:`close` in a worker thread, shielded from cancellation."""
        with trio.CancelScope(shield=True):
            await engine.to_thread(self.close, abandon_on_cancel=False)


def _cover(connection: sqlite3.Connection, symbol: str, timeframe: str, span: Any) -> None:
    """Merge ``span`` into the key's covered ranges (within the caller's transaction)."""
    key = (symbol, timeframe)
    ranges = connection.execute(_COVERAGE, key).fetchall()
    merged = merge_ranges([*((int(s), int(e)) for s, e in ranges), (int(span[0]), int(span[1]))])
    connection.execute("DELETE FROM candle_coverage WHERE symbol = ? AND timeframe = ?", key)
    connection.executemany(
        "INSERT INTO candle_coverage (symbol, timeframe, start_ms, end_ms) VALUES (?, ?, ?, ?)",
        [(*key, start, end) for start, end in merged],
    )


def _migrate(connection: sqlite3.Connection) -> None:
    """Bring the candle tables up to :data:`MIGRATIONS`, once per file, in one transaction."""
    connection.execute(_VERSION_TABLE)
    row = connection.execute(
        "SELECT version FROM schema_version WHERE part = ?", (_PART,)
    ).fetchone()
    if row is not None and int(row[0]) == len(MIGRATIONS):
        return
    connection.execute("BEGIN IMMEDIATE")
    try:
        # Read again under the write lock: another process may have just migrated.
        row = connection.execute(_VERSION, (_PART,)).fetchone()
        version = 0 if row is None else int(row[0])
        if version > len(MIGRATIONS):
            raise ValueError(
                f"the file's schema of {_PART!r} is version {version}, newer than this "
                f"code's {len(MIGRATIONS)}: written by a newer release?"
            )
        for script in MIGRATIONS[version:]:
            for statement in script.split(";"):
                if statement.strip():
                    connection.execute(statement)
        connection.execute(
            "INSERT OR REPLACE INTO schema_version (part, version) VALUES (?, ?)",
            (_PART, len(MIGRATIONS)),
        )
    except BaseException:
        connection.execute("ROLLBACK")
        raise
    connection.execute("COMMIT")
