"""The embedded candle store: SQLite (the standard library) against DuckDB, load and scan read.

The work issue #17 gives the embedded store: 2,500 symbols x one year (365)
of daily candles written symbol by symbol (one ``write`` per symbol, each its
own transaction, as the fetcher writes), then a full scan read: every
symbol's year read back through ``candles()`` on a fresh store object (a new
connection, as a worker process opens). Both engines run in the same process
run, alternating round by round, each into a fresh file in a temporary
directory; the table shows medians.

Variants:
    sqlite   services.market.candles.SqliteCandleStore (WAL, WITHOUT ROWID,
             executemany upsert; rows fetched into numpy)
    duckdb   the same schema and contract on DuckDB, given its fastest paths:
             ``INSERT OR REPLACE ... SELECT`` from numpy arrays for a write,
             ``fetchnumpy`` for a read (needs ``pip install duckdb``;
             skipped when it is not installed)

Run: ``python benchmarks/candle_store.py`` (``--help`` for sizes). The last
line is JSON.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from services.market.candles import Candles, DateRange, SqliteCandleStore, UnknownSymbol

DAY_MS = 86_400_000
YEAR = DateRange(datetime.date(2024, 1, 1), datetime.date(2024, 12, 31))  # the spec's range


def _universe(symbols: int, days: int) -> dict[str, Candles]:
    rng = np.random.default_rng(17)
    start = YEAR.start_ms()
    open_time = start + DAY_MS * np.arange(days, dtype=np.int64)
    universe = {}
    for i in range(symbols):
        closes = 100.0 * np.exp(np.cumsum(rng.normal(0, 0.03, days)))
        opens = np.concatenate(([100.0], closes[:-1]))
        highs = np.maximum(opens, closes) * 1.01
        lows = np.minimum(opens, closes) * 0.99
        universe[f"SYM{i:04d}USDT"] = Candles(open_time, opens, highs, lows, closes, closes * 10)
    return universe


class DuckCandleStore:
    """The candle contract on DuckDB, for this comparison only."""

    def __init__(self, path: str) -> None:
        import duckdb

        self.path = path
        self._connection = duckdb.connect(path)
        self._connection.execute(
            "CREATE TABLE IF NOT EXISTS candles (symbol TEXT NOT NULL, timeframe TEXT NOT NULL,"
            " open_time BIGINT NOT NULL, open DOUBLE NOT NULL, high DOUBLE NOT NULL,"
            " low DOUBLE NOT NULL, close DOUBLE NOT NULL, volume DOUBLE NOT NULL,"
            " PRIMARY KEY (symbol, timeframe, open_time))"
        )

    def write(self, symbol: str, timeframe: str, candles: Candles) -> int:
        frame = {  # noqa: F841 -- read by name by DuckDB's replacement scan below
            "open_time": candles.open_time,
            "open": candles.open,
            "high": candles.high,
            "low": candles.low,
            "close": candles.close,
            "volume": candles.volume,
        }
        self._connection.execute(
            "INSERT OR REPLACE INTO candles SELECT ?, ?, open_time, open, high, low, close,"
            " volume FROM frame",
            [symbol, timeframe],
        )
        return len(candles)

    def candles(self, symbol: str, timeframe: str, date_range: DateRange) -> Candles:
        columns = self._connection.execute(
            "SELECT open_time, open, high, low, close, volume FROM candles WHERE symbol = ?"
            " AND timeframe = ? AND open_time >= ? AND open_time < ? ORDER BY open_time",
            [symbol, timeframe, date_range.start_ms(), date_range.end_ms()],
        ).fetchnumpy()
        if len(columns["open_time"]) == 0:
            raise UnknownSymbol(symbol, timeframe)
        return Candles(*(np.asarray(columns[name]) for name in columns))

    def close(self) -> None:
        self._connection.close()


def _sqlite(path: str) -> Any:
    return SqliteCandleStore(path)


def _round(
    make: Callable[[str], Any], universe: dict[str, Candles], where: str
) -> dict[str, float]:
    writer = make(where)
    began = time.perf_counter()
    for symbol, candles in universe.items():
        writer.write(symbol, "1d", candles)
    load_s = time.perf_counter() - began
    writer.close()
    reader = make(where)
    began = time.perf_counter()
    bars = sum(len(reader.candles(symbol, "1d", YEAR)) for symbol in universe)
    read_s = time.perf_counter() - began
    reader.close()
    expected = sum(len(c) for c in universe.values())
    if bars != expected:
        raise AssertionError(f"read {bars} bars back, wrote {expected}")
    return {"load_s": load_s, "read_s": read_s, "bytes": float(_size(where))}


def _size(path: str) -> int:
    return sum(os.path.getsize(p) for p in (path, path + "-wal") if os.path.exists(p))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--symbols", type=int, default=2500)
    parser.add_argument("--days", type=int, default=365)
    parser.add_argument("--rounds", type=int, default=5)
    options = parser.parse_args()
    universe = _universe(options.symbols, options.days)
    variants: dict[str, Callable[[str], Any]] = {"sqlite": _sqlite}
    try:
        import duckdb  # noqa: F401 -- is it installed?
    except ImportError:
        print("duckdb is not installed: pip install duckdb to compare; sqlite only")
    else:
        variants["duckdb"] = DuckCandleStore
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in variants}
    with tempfile.TemporaryDirectory(prefix="candle-bench-") as directory:
        for number in range(options.rounds):
            for name, make in variants.items():
                where = os.path.join(directory, f"{name}-{number}.db")
                runs[name].append(_round(make, universe, where))
    rows = options.symbols * options.days
    figures: dict[str, Any] = {"symbols": options.symbols, "days": options.days, "rows": rows}
    print(f"{options.symbols} symbols x {options.days} daily bars, median of {options.rounds}")
    print(f"{'engine':8} {'load s':>8} {'rows/s':>10} {'scan read s':>12} {'file MB':>8}")
    for name, results in runs.items():
        load = statistics.median(r["load_s"] for r in results)
        read = statistics.median(r["read_s"] for r in results)
        size = statistics.median(r["bytes"] for r in results) / 1e6
        print(f"{name:8} {load:8.2f} {rows / load:10.0f} {read:12.2f} {size:8.1f}")
        figures[f"{name}_load_s"] = round(load, 3)
        figures[f"{name}_read_s"] = round(read, 3)
        figures[f"{name}_file_mb"] = round(size, 1)
    if "duckdb" in runs:
        figures["duckdb_over_sqlite_load"] = round(
            figures["duckdb_load_s"] / figures["sqlite_load_s"], 2
        )
        figures["duckdb_over_sqlite_read"] = round(
            figures["duckdb_read_s"] / figures["sqlite_read_s"], 2
        )
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
