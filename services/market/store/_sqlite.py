"""One SQLite file, opened in WAL mode, with versioned schema migrations per part.

Every call into :mod:`sqlite3` runs in a worker thread through
:func:`engine.to_thread`, never on the event loop: a slow disk makes its
caller wait, not the loop. One connection serves every thread, one call at
a time under a lock, which is all SQLite does with one file anyway.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import TypeVar, TypeVarTuple

import trio

import engine

T = TypeVar("T")
PosArgsT = TypeVarTuple("PosArgsT")

# One row per part of the file (``"failures"``, later ``"candles"``), so
# parts that share a file migrate independently.
_VERSION_TABLE = (
    "CREATE TABLE IF NOT EXISTS schema_version (part TEXT PRIMARY KEY, version INTEGER NOT NULL)"
)

_VERSION = "SELECT version FROM schema_version WHERE part = ?"


class Database:
    """An open SQLite file; made by :func:`open_database`.

    Attributes:
        path: the file.
    """

    def __init__(self, path: str, connection: sqlite3.Connection) -> None:
        self.path = path
        self._connection: sqlite3.Connection | None = connection
        self._lock = threading.Lock()
        # One thread at a time: callers queue in trio (where a wait can be
        # cancelled), not in threads holding the process's thread tokens.
        self._limiter = trio.CapacityLimiter(1)

    async def run(self, fn: Callable[[sqlite3.Connection, *PosArgsT], T], *args: *PosArgsT) -> T:
        """``fn(connection, *args)`` in a worker thread, as one transaction.

        The transaction commits if ``fn`` returns and rolls back if it raises.

        Cancellation:
            The caller waits for ``fn`` to end (``abandon_on_cancel=False``):
            a statement is short, and a transaction cut half-way would leave
            the lock held and the connection in use while the file closes.

        Raises:
            trio.ClosedResourceError: the database is closed.
            sqlite3.Error: what SQLite raised.
        """
        return await engine.to_thread(
            self._locked, fn, *args, abandon_on_cancel=False, limiter=self._limiter
        )

    def _locked(self, fn: Callable[[sqlite3.Connection, *PosArgsT], T], *args: *PosArgsT) -> T:
        with self._lock:
            connection = self._connection
            if connection is None:
                raise trio.ClosedResourceError(f"database {self.path!r} is closed")
            with connection:  # commit, or roll back on an exception
                return fn(connection, *args)

    async def migrate(self, part: str, migrations: Sequence[str]) -> int:
        """Bring ``part``'s tables up to date; return its schema version (``len(migrations)``).

        ``migrations[i]`` is the SQL that takes ``part`` from version ``i`` to
        ``i + 1``; the ``schema_version`` table records how far each part of
        the file has come, so each migration runs once in the file's life.
        Append new migrations; never edit old ones. All of them run in one
        transaction: a failing one leaves the file as it was.

        Args:
            part: the name of the tables' owner, such as ``"failures"``.
            migrations: SQL scripts (statements separated by ``;``, with no
                ``;`` inside a statement).

        Raises:
            TypeError: ``migrations`` is not a sequence of strings.
            ValueError: the file's version of ``part`` is newer than ``migrations``.
            sqlite3.Error: a migration failed.
        """
        if isinstance(migrations, str) or not all(isinstance(m, str) for m in migrations):
            raise TypeError(f"migrations must be a sequence of SQL strings, got {migrations!r}")
        return await engine.to_thread(
            self._exclusive, migrate_sqlite, part, tuple(migrations), abandon_on_cancel=False
        )

    def _exclusive(self, fn: Callable[[sqlite3.Connection, *PosArgsT], T], *args: *PosArgsT) -> T:
        with self._lock:
            if self._connection is None:
                raise trio.ClosedResourceError(f"database {self.path!r} is closed")
            return fn(self._connection, *args)

    async def aclose(self) -> None:
        """Close the file; later calls raise :class:`trio.ClosedResourceError`.

        Cancellation:
            Waits for a call in flight to end, then closes, even if cancelled.
        """
        with trio.CancelScope(shield=True):
            await engine.to_thread(self._close, abandon_on_cancel=False)

    def _close(self) -> None:
        with self._lock:
            if self._connection is not None:
                self._connection.close()
                self._connection = None


def _connect(path: str) -> sqlite3.Connection:
    connection = sqlite3.connect(path, check_same_thread=False)
    try:
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("PRAGMA synchronous=NORMAL")
    except BaseException:
        connection.close()
        raise
    return connection


def pending_migrations(part: str, version: int, migrations: Sequence[str]) -> Sequence[str]:
    """The migrations that take ``part`` from schema ``version`` to ``len(migrations)``.

    The rule of every versioned schema here (SQLite's or PostgreSQL's):
    ``migrations[i]`` takes a part from version ``i`` to ``i + 1``.

    Raises:
        ValueError: ``version`` is newer than ``migrations`` (a newer release wrote it).
    """
    if version > len(migrations):
        raise ValueError(
            f"the schema of {part!r} is version {version}, newer than this "
            f"code's {len(migrations)}: written by a newer release?"
        )
    return migrations[version:]


def migrate_sqlite(connection: sqlite3.Connection, part: str, migrations: Sequence[str]) -> int:
    """Bring ``part``'s tables in ``connection``'s file up to date; return its version.

    The synchronous core of :meth:`Database.migrate`, for a connection of the
    caller's own (one per worker process, say). It holds a write
    transaction (``BEGIN IMMEDIATE``) only when ``part`` is behind, and reads
    the version again inside it, so processes migrating one file at once
    migrate it once; all pending migrations run in that one transaction.
    (Making sure the ``schema_version`` table exists is a short write of its
    own, so even an up-to-date part waits out another connection's write.)

    Args:
        connection: a connection not inside a transaction.
        part: the name of the tables' owner, such as ``"failures"``.
        migrations: SQL scripts (statements separated by ``;``, with no
            ``;`` inside a statement).

    Raises:
        ValueError: the file's version of ``part`` is newer than ``migrations``.
        sqlite3.Error: a migration failed; the file is as it was.
    """
    with connection:
        connection.execute(_VERSION_TABLE)
    if _version(connection, part) == len(migrations):
        return len(migrations)
    connection.execute("BEGIN IMMEDIATE")
    try:
        for script in pending_migrations(part, _version(connection, part), migrations):
            for statement in script.split(";"):
                if statement.strip():
                    connection.execute(statement)
        connection.execute(
            "INSERT OR REPLACE INTO schema_version (part, version) VALUES (?, ?)",
            (part, len(migrations)),
        )
    except BaseException:
        connection.rollback()
        raise
    connection.commit()
    return len(migrations)


def _version(connection: sqlite3.Connection, part: str) -> int:
    row = connection.execute(_VERSION, (part,)).fetchone()
    return 0 if row is None else int(row[0])


@asynccontextmanager
async def open_database(path: str | os.PathLike[str]) -> AsyncIterator[Database]:
    """Open (or create) the SQLite file at ``path``, in WAL mode; close it when the block exits.

    Each user of the file then brings its own tables up to date with
    :meth:`Database.migrate`.

    Args:
        path: the file (its directory must exist); ``":memory:"`` for a
            database that lives as long as the block.

    Raises:
        sqlite3.Error: the file cannot be opened.
    """
    where = os.fspath(path)
    connection = await engine.to_thread(_connect, where, abandon_on_cancel=False)
    database = Database(where, connection)
    try:
        yield database
    finally:
        await database.aclose()
