"""Candles: fill the embedded store from an exchange, then read it the way a worker does.

Run it: ``python docs/examples/candles_example.py``. It starts the exchange
simulator on loopback with its clock pinned (so every figure repeats), fills
a temporary SQLite store with 90 days of daily candles for three symbols,
fills again to show that only what is missing is asked for, and reads one
symbol back through ``candles()`` in a worker process, as a scan would.
"""

from __future__ import annotations

import datetime
import json
import tempfile
from pathlib import Path

import trio

import engine
from services.market.candles import (
    CandleRepository,
    DateRange,
    SqliteCandleStore,
    open_candle_fetcher,
)
from services.market.scans import rsi
from services.market.simulator import SimulatorConfig, open_simulator

# The simulator's clock: 2024-03-31T15:00:00Z. Its REST history ends there.
NOW_MS = 1_711_897_200_000
SYMBOLS = ["BTCUSDT", "ETHUSDT", "SOLUSDT"]


def last_rsi(repository: CandleRepository, symbol: str, date_range: DateRange) -> str:
    """What a scan worker does: read candles through the repository, compute."""
    candles = repository.candles(symbol, "1d", date_range)
    last_close, last_rsi = candles.close[-1], rsi(candles.close, 14)[-1]
    return f"{symbol}: {len(candles)} bars, last close {last_close:.2f}, rsi14 {last_rsi:.1f}"


def day(ms: int) -> str:
    return datetime.datetime.fromtimestamp(ms / 1000, datetime.UTC).date().isoformat()


async def main() -> None:
    quarter = DateRange(datetime.date(2024, 1, 1), datetime.date(2024, 3, 31))
    with tempfile.TemporaryDirectory() as directory:
        store = SqliteCandleStore(Path(directory) / "candles.db")
        config = SimulatorConfig(symbols=SYMBOLS, epoch_ms=NOW_MS)
        async with (
            open_simulator(config) as simulator,
            open_candle_fetcher(store, simulator.address.rest_url) as fetcher,
        ):
            stored = await fetcher.fill_many(SYMBOLS, "1d", quarter)
            print(f"first fill: {stored}")
            # March 31 is still open at the exchange: it was not stored.
            before = fetcher.statistics().requests
            again = await fetcher.fill("BTCUSDT", "1d", quarter)
            second_fill_requests = fetcher.statistics().requests - before
            print(f"second fill: {again} new bars, {second_fill_requests} request (server time)")
            print(f"statistics: {fetcher.statistics()}")
        for start, end in store.covered("BTCUSDT", "1d"):
            print(f"BTCUSDT covers [{day(start)}, {day(end)})")
        # The store pickles as its path; the worker opens its own connection.
        print(await engine.to_process(last_rsi, store, "BTCUSDT", quarter))
        store.close()
    figures = {"stored": sum(stored.values()), "second_fill_requests": second_fill_requests}
    print(json.dumps(figures))


if __name__ == "__main__":
    trio.run(main)
