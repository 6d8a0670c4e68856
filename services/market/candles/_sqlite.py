"""The embedded candle store: one SQLite file in WAL mode, read directly by worker processes."""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager

from services.market.store import migrate_sqlite

from ._model import check_timeframe
from ._store import _StoreBase

# The file's ``schema_version`` table is the one services.market.store's
# Database keeps (a row per part), so one file can hold the failure history
# and the candles, each migrating on its own.
_PART = "candles"
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


class SqliteCandleStore(_StoreBase[sqlite3.Connection]):
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

    _ARGUMENT = "path"

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
        super().__init__()

    def __repr__(self) -> str:
        return f"SqliteCandleStore({self.path!r})"

    def _open(self) -> sqlite3.Connection:
        return sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)

    def _prepare(self, connection: sqlite3.Connection) -> None:
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("PRAGMA synchronous=NORMAL")
        connection.execute("PRAGMA busy_timeout=30000")
        migrate_sqlite(connection, _PART, MIGRATIONS)

    @contextmanager
    def _transaction(self, connection: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
        connection.execute("BEGIN IMMEDIATE")
        try:
            yield connection
        except BaseException:
            connection.execute("ROLLBACK")
            raise
        connection.execute("COMMIT")

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
