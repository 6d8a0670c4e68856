"""What the candle stores share: a connection per process, reads, writes, coverage, async wrappers.

Each store supplies its driver's placeholder, how to open and prepare a
connection, and how to hold a write transaction; the SQL both databases
understand and everything else is written once here.
"""

from __future__ import annotations

import os
import threading
from contextlib import AbstractContextManager
from typing import Any, ClassVar, Generic, Protocol, TypeVar

import trio

import engine

from ._model import (
    Candles,
    DateRange,
    MsRange,
    UnknownSymbol,
    check_covers,
    check_symbol,
    check_timeframe,
    default_covers,
    merge_ranges,
)


class _Rows(Protocol):
    """What a statement returns: sqlite3's and psycopg's cursors both are one."""

    def fetchall(self) -> list[Any]: ...

    def fetchone(self) -> Any: ...


class _Executor(Protocol):
    """What runs a statement: a sqlite3 connection, a psycopg connection or cursor."""

    def execute(self, query: str, params: Any = ..., /) -> _Rows: ...


class _BatchExecutor(_Executor, Protocol):
    """What also runs a statement over many rows: a sqlite3 connection, a psycopg cursor."""

    def executemany(self, query: str, params: Any, /) -> object: ...


class _Connection(_Executor, Protocol):
    """A connection a store keeps for its process."""

    def close(self) -> None: ...


ConnectionT = TypeVar("ConnectionT", bound=_Connection)


class _StoreBase(Generic[ConnectionT]):
    """A candle store over one SQL database, reached through a path or a DSN.

    It pickles as its one constructor argument (the attribute ``_ARGUMENT``
    names); each process opens its own connection on first use (and again
    after a fork, since a connection must not cross one), and one lock makes
    the connection serve one thread at a time.
    """

    # The SQL both databases understand, written with ``?`` placeholders; a
    # subclass names its driver's placeholder (``placeholder="%s"``) and gets
    # them rewritten once, when the class is made.
    _SELECT: ClassVar[str] = (
        "SELECT open_time, open, high, low, close, volume FROM candles"
        " WHERE symbol = ? AND timeframe = ? AND open_time >= ? AND open_time < ?"
        " ORDER BY open_time"
    )
    _ANY: ClassVar[str] = "SELECT 1 FROM candles WHERE symbol = ? AND timeframe = ? LIMIT 1"
    _UPSERT: ClassVar[str] = (
        "INSERT INTO candles (symbol, timeframe, open_time, open, high, low, close, volume)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
        " ON CONFLICT (symbol, timeframe, open_time) DO UPDATE SET"
        " open = excluded.open, high = excluded.high, low = excluded.low,"
        " close = excluded.close, volume = excluded.volume"
    )
    _COVERAGE: ClassVar[str] = (
        "SELECT start_ms, end_ms FROM candle_coverage WHERE symbol = ? AND timeframe = ?"
        " ORDER BY start_ms"
    )
    _UNCOVER: ClassVar[str] = "DELETE FROM candle_coverage WHERE symbol = ? AND timeframe = ?"
    _COVER: ClassVar[str] = (
        "INSERT INTO candle_coverage (symbol, timeframe, start_ms, end_ms) VALUES (?, ?, ?, ?)"
    )
    _STATEMENTS: ClassVar[tuple[str, ...]] = (
        "_SELECT",
        "_ANY",
        "_UPSERT",
        "_COVERAGE",
        "_UNCOVER",
        "_COVER",
    )

    def __init_subclass__(cls, *, placeholder: str | None = None, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if placeholder is not None:  # otherwise the parent's statements stand
            for name in _StoreBase._STATEMENTS:
                setattr(cls, name, getattr(_StoreBase, name).replace("?", placeholder))

    # The attribute that holds the one constructor argument, the store pickles as.
    _ARGUMENT: ClassVar[str]

    def __init__(self) -> None:
        self._connection: ConnectionT | None = None
        self._pid = 0
        self._lock = threading.Lock()

    def __reduce__(self) -> tuple[type[_StoreBase[ConnectionT]], tuple[str]]:
        return (type(self), (getattr(self, self._ARGUMENT),))

    # -- what each store supplies -----------------------------------------------

    def _open(self) -> ConnectionT:
        """A new connection to the store's database."""
        raise NotImplementedError

    def _prepare(self, connection: ConnectionT) -> None:
        """Set ``connection`` up and migrate the schema; the connection is closed if it raises."""
        raise NotImplementedError

    def _transaction(self, connection: ConnectionT) -> AbstractContextManager[_BatchExecutor]:
        """One write transaction on ``connection``: committed on exit, rolled back on an error."""
        raise NotImplementedError

    def _is_closed(self, connection: ConnectionT) -> bool:
        """Whether ``connection`` was closed under the store (by the server, say)."""
        return False

    def _select(self, connection: ConnectionT, params: tuple[Any, ...]) -> list[Any]:
        """The rows of :attr:`_SELECT`; a store may run it differently (prepared, say)."""
        return connection.execute(self._SELECT, params).fetchall()

    def _cover(self, executor: _BatchExecutor, key: tuple[str, str], span: MsRange) -> None:
        """Merge ``span`` into the key's covered ranges, within the caller's transaction."""
        ranges = [(int(s), int(e)) for s, e in executor.execute(self._COVERAGE, key).fetchall()]
        merged = merge_ranges([*ranges, (int(span[0]), int(span[1]))])
        executor.execute(self._UNCOVER, key)
        executor.executemany(self._COVER, [(*key, start, end) for start, end in merged])

    # -- the CandleStore protocol ---------------------------------------------------

    def _connect(self) -> ConnectionT:
        """This process's connection, opened (and the schema migrated) on first use."""
        pid = os.getpid()
        connection = self._connection
        if connection is None or self._pid != pid or self._is_closed(connection):
            # A connection inherited through fork is the parent's: never used, never closed here.
            connection = self._open()
            try:
                self._prepare(connection)
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
            sqlite3.Error: (:class:`SqliteCandleStore`) the file cannot be read.
            psycopg.Error: (:class:`PostgresCandleStore`) the database cannot be read.
        """
        check_timeframe(timeframe)
        check_symbol(symbol)
        key = (symbol, timeframe)
        with self._lock:
            connection = self._connect()
            rows = self._select(connection, (*key, date_range.start_ms(), date_range.end_ms()))
            if not rows and connection.execute(self._ANY, key).fetchone() is None:
                raise UnknownSymbol(symbol, timeframe)
        return Candles.from_rows(rows)

    def write(
        self, symbol: str, timeframe: str, candles: Candles, *, covers: MsRange | None = None
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
            sqlite3.Error: (:class:`SqliteCandleStore`) the write failed; nothing of it was kept.
            psycopg.Error: (:class:`PostgresCandleStore`) the write failed; nothing of it
                was kept.
        """
        timeframe_ms = check_timeframe(timeframe)
        check_symbol(symbol)
        check_covers(covers)
        span = covers if covers is not None else default_covers(timeframe_ms, candles)
        key = (symbol, timeframe)
        rows = [(*key, *row) for row in candles.rows()]
        with self._lock, self._transaction(self._connect()) as executor:
            executor.executemany(self._UPSERT, rows)
            if span is not None:
                self._cover(executor, key, span)
        return len(rows)

    async def write_async(
        self, symbol: str, timeframe: str, candles: Candles, *, covers: MsRange | None = None
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
        self, symbol: str, timeframe: str, candles: Candles, covers: MsRange | None
    ) -> int:
        return self.write(symbol, timeframe, candles, covers=covers)

    def covered(self, symbol: str, timeframe: str) -> list[MsRange]:
        """The ``[start_ms, end_ms)`` ranges held completely, sorted and disjoint.

        Raises:
            ValueError: ``timeframe`` is not one of :data:`TIMEFRAMES`.
            sqlite3.Error: (:class:`SqliteCandleStore`) the file cannot be read.
            psycopg.Error: (:class:`PostgresCandleStore`) the database cannot be read.
        """
        check_timeframe(timeframe)
        with self._lock:
            rows = self._connect().execute(self._COVERAGE, (symbol, timeframe)).fetchall()
        return [(int(start), int(end)) for start, end in rows]

    async def covered_async(self, symbol: str, timeframe: str) -> list[MsRange]:
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
