"""The failure history: timeouts, errors and circuit transitions, per cycle and symbol.

Recording never touches the disk: :meth:`FailureHistory.record` appends to
a bounded queue in memory, and :meth:`FailureHistory.run`, a supervised
child, writes what has queued every ``flush_every`` seconds (or as soon as
``flush_rows`` have queued) in one transaction in a worker thread, pruning
rows past ``max_age`` and beyond ``max_rows`` in the same transaction. A
failing exchange makes rows, never a wait on disk; a queue that fills
because the disk is slower than the failures drops its oldest rows and
counts them.
"""

from __future__ import annotations

import collections
import logging
import math
import os
import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import NoReturn, Protocol

import attrs
import trio

import engine
from engine.lowlevel import check_count, check_duration

from ._sqlite import Database, open_database

logger = logging.getLogger("market.store.failures")

KINDS = ("timeout", "error", "breaker")
"""What a row records: a fetch cut by a deadline, a fetch that failed, a circuit's change."""

# The write at the end of a run is bounded: a stuck disk must not hold shutdown.
_FINAL_FLUSH_GRACE = 2.0

MIGRATIONS = (
    """
    CREATE TABLE failures (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        at_ms INTEGER NOT NULL,
        cycle INTEGER NOT NULL,
        symbol TEXT NOT NULL,
        kind TEXT NOT NULL,
        detail TEXT NOT NULL
    );
    CREATE INDEX failures_by_time ON failures (at_ms);
    CREATE INDEX failures_by_symbol ON failures (symbol, at_ms)
    """,
)
"""The failure table's schema, version by version (see :meth:`Database.migrate`)."""

_INSERT = "INSERT INTO failures (at_ms, cycle, symbol, kind, detail) VALUES (?, ?, ?, ?, ?)"
# Keeps the newest max_rows rows (ids only grow: AUTOINCREMENT never reuses one).
_PRUNE_COUNT = (
    "DELETE FROM failures WHERE id <= (SELECT id FROM failures ORDER BY id DESC LIMIT 1 OFFSET ?)"
)

# The defaults of FailureHistory and open_failure_history, stated once.
MAX_AGE = 7 * 86_400.0  # seconds a row is kept
MAX_ROWS = 100_000  # rows kept at most
QUEUE_SIZE = 10_000  # rows waiting to be written at most; past it the oldest is dropped
FLUSH_EVERY = 1.0  # seconds between writes
FLUSH_ROWS = 500  # rows that make a write at once


class FailureRecorder(Protocol):
    """What the watchlist records its failures into (:class:`FailureHistory` is one)."""

    def record(self, cycle: int, symbol: str, kind: str, detail: str) -> None:
        """Note one failure; must not block."""


@attrs.frozen
class FailureRecord:
    """One row of the history.

    Attributes:
        at_ms: when it was recorded, milliseconds since the epoch (UTC).
        cycle: the watchlist cycle it happened in (1 for the first).
        symbol: the symbol.
        kind: ``"timeout"``, ``"error"`` or ``"breaker"``.
        detail: the reason (``"request deadline of 2 s expired"``) or the
            circuit's change (``"closed->open"``).
    """

    at_ms: int
    cycle: int
    symbol: str
    kind: str
    detail: str


@attrs.frozen(kw_only=True)
class FailureHistoryStatistics:
    """The history's counters since it was made.

    Attributes:
        recorded: rows recorded.
        written: rows written to the file.
        dropped: rows lost: pushed out of a full queue, or in a write that failed.
        pruned: rows deleted for being older than ``max_age`` or beyond ``max_rows``.
        flushes: writes to the file (each one transaction).
        pending: rows queued, not written yet.
    """

    recorded: int = attrs.field(default=0, metadata=engine.counter_metric("Failures recorded"))
    written: int = attrs.field(default=0, metadata=engine.counter_metric("Failures written"))
    dropped: int = attrs.field(default=0, metadata=engine.counter_metric("Failures lost"))
    pruned: int = attrs.field(default=0, metadata=engine.counter_metric("Failures pruned"))
    flushes: int = attrs.field(default=0, metadata=engine.counter_metric("Writes to the file"))
    pending: int = attrs.field(metadata=engine.gauge_metric("Failures queued, not written yet"))


def _check_settings(
    max_age: float, max_rows: int, queue_size: int, flush_every: float, flush_rows: int
) -> None:
    check_duration("max_age", max_age)
    check_count("max_rows", max_rows, minimum=1)
    check_count("queue_size", queue_size, minimum=1)
    _finite("flush_every", flush_every)
    check_count("flush_rows", flush_rows, minimum=1)
    if flush_rows > queue_size:
        raise ValueError(
            f"flush_rows ({flush_rows}) must be <= queue_size ({queue_size}): "
            "the queue would drop rows before it ever reached flush_rows"
        )


def _finite(name: str, value: float) -> float:
    check_duration(name, value)
    if math.isinf(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return float(value)


class _Tally(engine.Tally[FailureHistoryStatistics]):
    """The counters behind :meth:`FailureHistory.statistics`."""


def _write(
    connection: sqlite3.Connection,
    rows: list[FailureRecord],
    oldest_ms: int | None,
    max_rows: int,
) -> int:
    """Insert ``rows`` and prune, in the caller's transaction; return the rows pruned."""
    connection.executemany(_INSERT, [(r.at_ms, r.cycle, r.symbol, r.kind, r.detail) for r in rows])
    pruned = 0
    if oldest_ms is not None:
        pruned += connection.execute("DELETE FROM failures WHERE at_ms < ?", (oldest_ms,)).rowcount
    pruned += connection.execute(_PRUNE_COUNT, (max_rows,)).rowcount
    return pruned


def _select(
    connection: sqlite3.Connection,
    symbol: str | None,
    since_ms: int | None,
    kind: str | None,
    limit: int,
) -> list[FailureRecord]:
    where: list[str] = []
    args: list[object] = []
    for clause, value in (("symbol = ?", symbol), ("at_ms >= ?", since_ms), ("kind = ?", kind)):
        if value is not None:
            where.append(clause)
            args.append(value)
    sql = "SELECT at_ms, cycle, symbol, kind, detail FROM failures"
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += " ORDER BY at_ms DESC, id DESC LIMIT ?"
    rows = connection.execute(sql, (*args, limit)).fetchall()
    return [FailureRecord(*row) for row in rows]


class FailureHistory:
    """The failure history in a :class:`Database`; usually made by :func:`open_failure_history`.

    Run :meth:`run` as a supervised child for as long as the history records;
    without it, rows queue (up to ``queue_size``) until :meth:`flush`.

    Args:
        database: the open file; its ``failures`` tables must be migrated
            (:func:`open_failure_history` does it).
        max_age: seconds a row is kept, > 0 (``math.inf``: no age limit).
        max_rows: the most rows kept, >= 1; the oldest go first.
        queue_size: the most rows queued between writes, >= 1.
        flush_every: seconds between writes, finite, > 0.
        flush_rows: rows queued that trigger a write at once, >= 1.
        wall_clock: seconds since the epoch, for ``at_ms`` and pruning by
            age; ``time.time`` unless a test pins it.

    Raises:
        TypeError, ValueError: for a bad setting; the message names it.
    """

    def __init__(
        self,
        database: Database,
        *,
        max_age: float = MAX_AGE,
        max_rows: int = MAX_ROWS,
        queue_size: int = QUEUE_SIZE,
        flush_every: float = FLUSH_EVERY,
        flush_rows: int = FLUSH_ROWS,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        if not isinstance(database, Database):
            raise TypeError(f"database must be a Database, got {database!r}")
        _check_settings(max_age, max_rows, queue_size, flush_every, flush_rows)
        self.database = database
        self.max_age = float(max_age)
        self.max_rows = max_rows
        self.queue_size = queue_size
        self.flush_every = float(flush_every)
        self.flush_rows = flush_rows
        self._wall_clock = wall_clock
        self._queue: collections.deque[FailureRecord] = collections.deque()
        self._full = trio.Event()
        self._writing = trio.Lock()
        self._tally = _Tally()

    def record(self, cycle: int, symbol: str, kind: str, detail: str) -> None:
        """Queue one row, stamped with the wall clock now; never blocks.

        A full queue drops its oldest row (counted in ``dropped``).

        Raises:
            ValueError: ``kind`` is not one of :data:`KINDS`.
        """
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
        at_ms = round(self._wall_clock() * 1000)
        if len(self._queue) >= self.queue_size:
            self._queue.popleft()
            self._tally.dropped += 1
        self._queue.append(FailureRecord(at_ms, cycle, symbol, kind, detail))
        self._tally.recorded += 1
        if len(self._queue) >= self.flush_rows:
            self._full.set()

    async def flush(self) -> None:
        """Write the queued rows now, in one transaction, and prune.

        Raises:
            sqlite3.Error: the write failed; its rows are counted as dropped.
            trio.ClosedResourceError: the database is closed.
        """
        async with self._writing:
            rows = list(self._queue)
            self._queue.clear()
            if not rows:
                await trio.lowlevel.checkpoint()
                return
            oldest_ms = None
            if math.isfinite(self.max_age):
                oldest_ms = round((self._wall_clock() - self.max_age) * 1000)
            try:
                pruned = await self.database.run(_write, rows, oldest_ms, self.max_rows)
            except trio.Cancelled:
                # The write is never abandoned once begun: cancelled, it never
                # began. The rows go back, in order, for the next flush.
                self._queue.extendleft(reversed(rows))
                raise
            except BaseException:
                self._tally.dropped += len(rows)
                raise
            self._tally.flushes += 1
            self._tally.written += len(rows)
            self._tally.pruned += pruned

    async def run(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> NoReturn:
        """Write the queue every ``flush_every`` s (at once at ``flush_rows``) until cancelled.

        Cancellation:
            Cancelling the run writes what is still queued first, within
            a short grace period, so a clean stop loses nothing.

        Raises:
            sqlite3.Error: a write failed (the supervisor restarts the run).
        """
        task_status.started()
        try:
            while True:
                with trio.move_on_after(self.flush_every):
                    await self._full.wait()
                # A fresh event before the write: rows that reach flush_rows
                # during it set this one, and the next write follows at once.
                self._full = trio.Event()
                await self.flush()
        finally:
            with trio.move_on_after(_FINAL_FLUSH_GRACE, shield=True):
                await self.flush()

    async def query(
        self,
        *,
        symbol: str | None = None,
        since_ms: int | None = None,
        kind: str | None = None,
        limit: int = 1000,
    ) -> list[FailureRecord]:
        """The rows written so far that match, newest first.

        Rows still queued (at most ``flush_every`` seconds old) are not seen.

        Args:
            symbol: only this symbol's rows.
            since_ms: only rows at or after this time (milliseconds since the epoch).
            kind: only rows of this kind (one of :data:`KINDS`).
            limit: the most rows returned, >= 1.

        Raises:
            TypeError, ValueError: for a bad argument; the message names it.
        """
        if kind is not None and kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
        if since_ms is not None and (isinstance(since_ms, bool) or not isinstance(since_ms, int)):
            raise TypeError(f"since_ms must be an int, got {since_ms!r}")
        if symbol is not None and not isinstance(symbol, str):
            raise TypeError(f"symbol must be a str, got {symbol!r}")
        check_count("limit", limit, minimum=1)
        return await self.database.run(_select, symbol, since_ms, kind, limit)

    def statistics(self) -> FailureHistoryStatistics:
        """A frozen snapshot of the counters."""
        return self._tally.snapshot(pending=len(self._queue))


# FailureHistory's settings spelled out again, so that the opener's signature
# documents itself (as nursery.start repeats start_soon's); the defaults are
# the shared constants above.
@asynccontextmanager
async def open_failure_history(
    path: str | os.PathLike[str],
    *,
    max_age: float = MAX_AGE,
    max_rows: int = MAX_ROWS,
    queue_size: int = QUEUE_SIZE,
    flush_every: float = FLUSH_EVERY,
    flush_rows: int = FLUSH_ROWS,
    wall_clock: Callable[[], float] = time.time,
) -> AsyncIterator[FailureHistory]:
    """Open the SQLite file at ``path``, migrate the failure table, yield the history.

    Start :meth:`FailureHistory.run` as a supervised child inside the block;
    the file closes when the block exits. The settings are checked before
    the file is opened.

    Args:
        path: the file (its directory must exist).
        max_age, max_rows, queue_size, flush_every, flush_rows, wall_clock:
            the :class:`FailureHistory` settings.

    Raises:
        TypeError, ValueError: for a bad setting.
        sqlite3.Error: the file cannot be opened or migrated.
    """
    _check_settings(max_age, max_rows, queue_size, flush_every, flush_rows)
    async with open_database(path) as database:
        await database.migrate("failures", MIGRATIONS)
        yield FailureHistory(
            database,
            max_age=max_age,
            max_rows=max_rows,
            queue_size=queue_size,
            flush_every=flush_every,
            flush_rows=flush_rows,
            wall_clock=wall_clock,
        )
