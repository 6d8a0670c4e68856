"""Seed 002 rebuilt: an indicator scan over a symbol universe, one outcome per symbol.

Run it: ``python docs/examples/batch_scan.py``. Two workers, 600 symbols, one
symbol whose data makes the job raise and one whose job hangs; it finishes
in a few seconds and prints a summary.
"""

from __future__ import annotations

import time
from collections import Counter

import numpy as np
import trio

import engine


def scan(symbol: int) -> dict[str, float]:
    """RSI14 and the last close over a seeded random walk (runs in a worker process)."""
    if symbol == 13:
        raise ValueError("no klines for symbol 13")
    if symbol == 77:
        time.sleep(3600)  # a data source that never answers
    closes = 100 * np.exp(np.cumsum(np.random.default_rng(symbol).normal(0, 0.02, 252)))
    deltas = np.diff(closes)[-14:]
    gains, losses = deltas.clip(min=0).mean(), (-deltas).clip(min=0).mean()
    rsi = 100.0 if losses == 0 else 100 - 100 / (1 + gains / losses)
    return {"close": float(closes[-1]), "rsi14": float(rsi)}


async def main() -> None:
    progress: list[int] = []
    async with engine.open_process_pool(2) as pool:  # owned by the block, as seed 002 asked
        await pool.warm()
        async with engine.map_batch(
            scan,
            range(600),
            pool=pool,
            item_deadline=1.0,  # seed 002 used 60 s; 1 s keeps the example quick
            on_progress=lambda done, total: progress.append(done),
        ) as batch:
            async for outcome in batch:  # in completion order
                if not outcome.ok:
                    print(f"symbol {outcome.item}: {outcome.status} ({outcome.error})")
    outcomes = batch.results()  # in input order, exactly one per symbol
    print("outcomes:", dict(sorted(Counter(str(o.status) for o in outcomes).items())))
    print("progress reported:", len(progress), "times, last", progress[-1])
    oversold = [o.item for o in outcomes if o.ok and o.unwrap()["rsi14"] < 30]
    print("oversold symbols:", len(oversold))
    stats = batch.statistics()
    print(f"calls: {stats.calls} for {stats.total} symbols, split chunks: {stats.split_chunks}")


if __name__ == "__main__":  # worker processes import this file; the guard is required
    trio.run(main)
