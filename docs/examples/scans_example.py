"""A scan of the simulated market through the service's scan path.

Run it: ``python docs/examples/scans_example.py``. It starts the exchange
simulator listing 500 symbols, with its clock fixed, and a candle store in a
temporary file. Then it opens the scans' worker pool (two processes) and
scans the 500 symbols with a formula. The scan first has the fetcher fill
the store from the simulator's REST klines, then reads each symbol's daily
candles in the workers, with a 60 s deadline per symbol. It prints progress
every 100 symbols, then the first matches and the counts. The simulated
market's "now" is fixed, so the output is the same on every run.
"""

from __future__ import annotations

import functools
import os
import tempfile

import trio

from services.market.candles import FetcherConfig, SqliteCandleStore, open_candle_fetcher
from services.market.scans import ScanConfig, Scans
from services.market.simulator import SimulatorConfig, open_simulator

FORMULA = "rsi14 < 40 and close < bb_lower20 * 1.02"
NOW_MS = 1_700_000_000_000  # 2023-11-14T22:13:20Z
# The simulator is ours, so it may allow far more than Binance's 6,000 a minute.
WEIGHT = 100_000


async def main() -> None:
    with tempfile.TemporaryDirectory() as directory:
        store = SqliteCandleStore(os.path.join(directory, "candles.sqlite"))
        exchange = SimulatorConfig(universe=500, epoch_ms=NOW_MS, weight_limit=WEIGHT)
        async with (
            open_simulator(exchange) as simulator,
            open_candle_fetcher(
                store, simulator.address.rest_url, FetcherConfig(weight_budget=WEIGHT)
            ) as fetcher,
            trio.open_nursery() as nursery,
        ):
            scans = Scans(
                ScanConfig(symbols=500, workers=2, item_deadline=60),
                store,  # the workers read it: it pickles as its path
                fill=functools.partial(fetcher.fill_each, concurrency=8),
                clock=lambda: NOW_MS,
            )
            await nursery.start(scans.run)  # opens the worker pool

            def progress(completed: int, total: int) -> None:
                if completed % 100 == 0:
                    print(f"progress {completed}/{total}")

            scan = scans.start(FORMULA, on_progress=progress)
            await scan.wait()
            nursery.cancel_scope.cancel()  # closes the pool: no worker outlives the block
        store.close()

    summary = scan.summary()
    for result in scan.matches()[:3]:
        rsi, band = result.values["rsi14"], result.values["bb_lower20"]
        print(f"{result.symbol}: close {result.close:.4g}, rsi14 {rsi:.1f}, bb_lower20 {band:.4g}")
    print(
        f"{summary.status}: {summary.matched} of {summary.total} matched at the last bar, "
        f"{summary.matched_in_range} at some bar of {summary.timeframe} bars, "
        f"{summary.failed} failed"
    )


if __name__ == "__main__":
    trio.run(main)
