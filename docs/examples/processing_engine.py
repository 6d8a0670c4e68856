"""The spec's ProcessingEngine over the embedded candle store.

Run it: ``python docs/examples/processing_engine.py``. It writes two years of
daily candles for 200 symbols (a seeded random walk) into a SQLite candle
store in a temporary directory, then runs one job over those symbols and one
the store does not know: ``rsi(period) < 30 and close > sma(trend)``
with ``period=14`` and ``trend=200``, reported for every bar of 2024. The output is the same on
every run.
"""

from __future__ import annotations

import datetime
import tempfile
from pathlib import Path

import numpy as np
import trio

from services.market.candles import Candles, DateRange, SqliteCandleStore
from services.market.processing import FormulaService, ProcessingEngine, ProcessingJob

DAY_MS = 86_400_000
FIRST_MS = 1_672_531_200_000  # 2023-01-01, UTC
BARS = 731  # 2023 and 2024


def fill(store: SqliteCandleStore, symbols: list[str]) -> None:
    """Write a seeded random walk of daily candles for each symbol."""
    rng = np.random.default_rng(7)
    times = FIRST_MS + DAY_MS * np.arange(BARS)
    for symbol in symbols:
        close = 100.0 * np.exp(np.cumsum(rng.normal(0.0, 0.03, BARS)))
        opens = np.concatenate(([100.0], close[:-1]))
        high, low = np.maximum(opens, close) * 1.01, np.minimum(opens, close) * 0.99
        volume = rng.uniform(1.0, 1000.0, BARS)
        store.write(symbol, "1d", Candles(times, opens, high, low, close, volume))


def day(open_time_ms: int) -> str:
    return datetime.datetime.fromtimestamp(open_time_ms / 1000, datetime.UTC).date().isoformat()


async def main(folder: Path) -> None:
    store = SqliteCandleStore(folder / "candles.sqlite")
    symbols = [f"SYM{i:03d}USDT" for i in range(200)]
    fill(store, symbols)
    job = ProcessingJob(
        symbols=[*symbols, "NOSUCHUSDT"],
        timeframe="1d",
        date_range=DateRange(datetime.date(2024, 1, 1), datetime.date(2024, 12, 31)),
        formula="rsi(period) < 30 and close > sma(trend)",
        parameters={"period": 14, "trend": 200},
    )
    progress: list[tuple[int, int]] = []

    # The pool is opened by the block and shut down, workers reaped, when it ends.
    async with ProcessingEngine(store, FormulaService(), max_workers=2) as processing:
        results = await processing.process_batch(
            job, lambda done, total: progress.append((done, total))
        )

    print(f"formula: {job.formula}")
    print(f"results: {len(results)}, progress reported {len(progress)} times, last {progress[-1]}")
    for failed in sorted((r for r in results if not r.ok), key=lambda r: r.symbol):
        print(f"error: {failed.symbol}: {failed.error}")
    matched = sorted((r for r in results if r.matches), key=lambda r: r.symbol)
    bars = sum(len(r.matches) for r in matched)
    print(f"matched: {len(matched)} of {len(symbols)} symbols, {bars} bars in 2024")
    for result in matched[:3]:
        print(f"{result.symbol}: {', '.join(day(t) for t in result.matches)}")


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as folder:
        trio.run(main, Path(folder))
