"""A candle store on PostgreSQL through psycopg 3, for users who run a server."""

from __future__ import annotations

import os
import threading
from typing import TYPE_CHECKING, Any

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

if TYPE_CHECKING:
    import psycopg

_PART = "candles"
# Append new migrations; never edit old ones.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE candles (
        symbol TEXT NOT NULL,
        timeframe TEXT NOT NULL,
        open_time BIGINT NOT NULL,
        open DOUBLE PRECISION NOT NULL,
        high DOUBLE PRECISION NOT NULL,
        low DOUBLE PRECISION NOT NULL,
        close DOUBLE PRECISION NOT NULL,
        volume DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (symbol, timeframe, open_time)
    );
    CREATE TABLE candle_coverage (
        symbol TEXT NOT NULL,
        timeframe TEXT NOT NULL,
        start_ms BIGINT NOT NULL,
        end_ms BIGINT NOT NULL,
        PRIMARY KEY (symbol, timeframe, start_ms)
    )
    """,
)
# Serialises migrations of one database across processes.
_MIGRATION_LOCK = 0x63616E646C6573  # "candles"

_SELECT = (
    "SELECT open_time, open, high, low, close, volume FROM candles"
    " WHERE symbol = %s AND timeframe = %s AND open_time >= %s AND open_time < %s"
    " ORDER BY open_time"
)
_ANY = "SELECT 1 FROM candles WHERE symbol = %s AND timeframe = %s LIMIT 1"
_UPSERT = (
    "INSERT INTO candles (symbol, timeframe, open_time, open, high, low, close, volume)"
    " VALUES (%s, %s, %s, %s, %s, %s, %s, %s)"
    " ON CONFLICT (symbol, timeframe, open_time) DO UPDATE SET"
    " open = excluded.open, high = excluded.high, low = excluded.low,"
    " close = excluded.close, volume = excluded.volume"
)
_COVERAGE = (
    "SELECT start_ms, end_ms FROM candle_coverage WHERE symbol = %s AND timeframe = %s"
    " ORDER BY start_ms"
)


class PostgresCandleStore:
    """Candles in a PostgreSQL database, keyed ``(symbol, timeframe, open_time)``.

    The same contract as :class:`SqliteCandleStore`: it pickles as its DSN,
    each process opens its own connection on first use (and again after a
    fork), reads are synchronous, :meth:`write_async` runs :meth:`write` in a
    worker thread. The tables are created on first use; their version is kept
    in a ``schema_version`` table, a row per part.

    Needs ``psycopg`` 3 (``pip install 'psycopg[binary]'``), imported on first use.

    Args:
        dsn: a libpq connection string or URI, such as
            ``"postgresql://user@127.0.0.1:5432/market"``. It is pickled to
            worker processes as it is, password included: prefer a password
            file or the ``PGPASSWORD`` environment variable.

    Raises:
        TypeError: ``dsn`` is not a string.
        ValueError: ``dsn`` is empty.
    """

    def __init__(self, dsn: str) -> None:
        if not isinstance(dsn, str):
            raise TypeError(f"dsn must be a string, got {dsn!r}")
        if not dsn.strip():
            raise ValueError("dsn must not be empty")
        self.dsn = dsn
        self._connection: psycopg.Connection[Any] | None = None
        self._pid = 0
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"PostgresCandleStore(<dsn of {len(self.dsn)} characters>)"

    def __reduce__(self) -> tuple[type[PostgresCandleStore], tuple[str]]:
        return (PostgresCandleStore, (self.dsn,))

    def _connect(self) -> psycopg.Connection[Any]:
        pid = os.getpid()
        connection = self._connection
        if connection is None or self._pid != pid or connection.closed:
            import psycopg  # optional: needed only by this store, imported on first use

            # A connection inherited through fork belongs to the parent: never used here.
            connection = psycopg.connect(self.dsn, autocommit=True)
            try:
                _migrate(connection)
            except BaseException:
                connection.close()
                raise
            self._connection, self._pid = connection, pid
        return connection

    def candles(self, symbol: str, timeframe: str, date_range: DateRange) -> Candles:
        """``symbol``'s bars of ``timeframe`` that open within ``date_range``, oldest first.

        Raises:
            UnknownSymbol: the store has no candles of ``timeframe`` for ``symbol``.
            ValueError: ``timeframe`` is not one of :data:`TIMEFRAMES`.
            psycopg.Error: the database cannot be read.
        """
        check_timeframe(timeframe)
        check_symbol(symbol)
        key = (symbol, timeframe)
        with self._lock:
            connection = self._connect()
            rows = connection.execute(
                _SELECT, (*key, date_range.start_ms(), date_range.end_ms()), prepare=True
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
            covers: ``(start_ms, end_ms)`` the store now holds completely;
                by default the span of ``candles``.

        Returns:
            The number of bars written.

        Raises:
            ValueError: a bad timeframe or ``covers``.
            psycopg.Error: the write failed; nothing of it was kept.
        """
        timeframe_ms = check_timeframe(timeframe)
        check_symbol(symbol)
        check_covers(covers)
        span = covers if covers is not None else default_covers(timeframe_ms, candles)
        rows = [(symbol, timeframe, *row) for row in candles.rows()]
        with self._lock:
            connection = self._connect()
            with connection.transaction(), connection.cursor() as cursor:
                cursor.executemany(_UPSERT, rows)
                if span is not None:
                    _cover(cursor, symbol, timeframe, span)
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
            psycopg.Error: the database cannot be read.
        """
        check_timeframe(timeframe)
        with self._lock:
            rows = self._connect().execute(_COVERAGE, (symbol, timeframe)).fetchall()
        return [(int(start), int(end)) for start, end in rows]

    async def covered_async(self, symbol: str, timeframe: str) -> list[tuple[int, int]]:
        """:meth:`covered` in a worker thread."""
        return await engine.to_thread(self.covered, symbol, timeframe, abandon_on_cancel=False)

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


def _cover(cursor: psycopg.Cursor[Any], symbol: str, timeframe: str, span: Any) -> None:
    """Merge ``span`` into the key's covered ranges, within the caller's transaction."""
    key = (symbol, timeframe)
    # Lock the key's coverage rows so two writers merge one after the other.
    cursor.execute("SELECT pg_advisory_xact_lock(hashtext(%s), hashtext(%s))", key)
    ranges = cursor.execute(_COVERAGE, key).fetchall()
    merged = merge_ranges([*((int(s), int(e)) for s, e in ranges), (int(span[0]), int(span[1]))])
    cursor.execute("DELETE FROM candle_coverage WHERE symbol = %s AND timeframe = %s", key)
    cursor.executemany(
        "INSERT INTO candle_coverage (symbol, timeframe, start_ms, end_ms) VALUES (%s, %s, %s, %s)",
        [(*key, start, end) for start, end in merged],
    )


def _migrate(connection: psycopg.Connection[Any]) -> None:
    """Bring the candle tables up to :data:`MIGRATIONS`, once per database."""
    with connection.transaction():
        connection.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
        connection.execute(
            "CREATE TABLE IF NOT EXISTS schema_version"
            " (part TEXT PRIMARY KEY, version INTEGER NOT NULL)"
        )
        row = connection.execute(
            "SELECT version FROM schema_version WHERE part = %s", (_PART,)
        ).fetchone()
        version = 0 if row is None else int(row[0])
        if version > len(MIGRATIONS):
            raise ValueError(
                f"the database's schema of {_PART!r} is version {version}, newer than this "
                f"code's {len(MIGRATIONS)}: written by a newer release?"
            )
        for script in MIGRATIONS[version:]:
            connection.execute(script)
        connection.execute(
            "INSERT INTO schema_version (part, version) VALUES (%s, %s)"
            " ON CONFLICT (part) DO UPDATE SET version = excluded.version",
            (_PART, len(MIGRATIONS)),
        )
