"""A candle store on PostgreSQL through psycopg 3, for users who run a server."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from services.market.store import pending_migrations

from ._model import MsRange
from ._store import _BatchExecutor, _StoreBase

if TYPE_CHECKING:
    import psycopg

_PART = "candles"
# SqliteCandleStore's tables in PostgreSQL's types. Each dialect's migrations
# are written out in full rather than made from one template: a released
# migration is never edited, and a shared template would edit both at once.
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


class PostgresCandleStore(_StoreBase["psycopg.Connection[Any]"], placeholder="%s"):
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

    _ARGUMENT = "dsn"

    def __init__(self, dsn: str) -> None:
        if not isinstance(dsn, str):
            raise TypeError(f"dsn must be a string, got {dsn!r}")
        if not dsn.strip():
            raise ValueError("dsn must not be empty")
        self.dsn = dsn
        super().__init__()

    def __repr__(self) -> str:
        return f"PostgresCandleStore(<dsn of {len(self.dsn)} characters>)"

    def _open(self) -> psycopg.Connection[Any]:
        import psycopg  # optional: needed only by this store, imported on first use

        return psycopg.connect(self.dsn, autocommit=True)

    def _prepare(self, connection: psycopg.Connection[Any]) -> None:
        _migrate(connection)

    def _is_closed(self, connection: psycopg.Connection[Any]) -> bool:
        return connection.closed

    @contextmanager
    def _transaction(self, connection: psycopg.Connection[Any]) -> Iterator[psycopg.Cursor[Any]]:
        with connection.transaction(), connection.cursor() as cursor:
            yield cursor

    def _select(self, connection: psycopg.Connection[Any], params: tuple[Any, ...]) -> list[Any]:
        return connection.execute(self._SELECT, params, prepare=True).fetchall()

    def _cover(self, executor: _BatchExecutor, key: tuple[str, str], span: MsRange) -> None:
        # Lock the key's coverage rows so two writers merge one after the other.
        executor.execute("SELECT pg_advisory_xact_lock(hashtext(%s), hashtext(%s))", key)
        super()._cover(executor, key, span)


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
        for script in pending_migrations(_PART, 0 if row is None else int(row[0]), MIGRATIONS):
            connection.execute(script)
        connection.execute(
            "INSERT INTO schema_version (part, version) VALUES (%s, %s)"
            " ON CONFLICT (part) DO UPDATE SET version = excluded.version",
            (_PART, len(MIGRATIONS)),
        )
