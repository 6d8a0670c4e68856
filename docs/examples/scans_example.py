"""A scan of the simulated market through the service's scan path.

Run it: ``python docs/examples/scans_example.py``. It opens the scans' worker
pool (two processes), scans 500 symbols of the simulated universe with a
formula and a 60 s per-symbol deadline, prints progress every 100 symbols,
then the first matches and the counts. The simulated market's "now" is
fixed, so the output is the same on every run.
"""

from __future__ import annotations

import trio

from services.market.scans import ScanConfig, Scans, SimulatedKlines

FORMULA = "rsi14 < 40 and close < bb_lower20 * 1.02"


async def main() -> None:
    klines = SimulatedKlines(anchor_ms=1_700_000_000_000)  # 250 daily candles per symbol
    scans = Scans(ScanConfig(symbols=500, workers=2, item_deadline=60), klines)
    async with trio.open_nursery() as nursery:
        await nursery.start(scans.run)  # opens the worker pool

        def progress(completed: int, total: int) -> None:
            if completed % 100 == 0:
                print(f"progress {completed}/{total}")

        scan = scans.start(FORMULA, on_progress=progress)
        await scan.wait()
        nursery.cancel_scope.cancel()  # closes the pool: no worker outlives the block

    summary = scan.summary()
    for result in scan.matches()[:3]:
        rsi, band = result.values["rsi14"], result.values["bb_lower20"]
        print(f"{result.symbol}: close {result.close:.4g}, rsi14 {rsi:.1f}, bb_lower20 {band:.4g}")
    print(
        f"{summary.status}: {summary.matched} of {summary.total} matched, {summary.failed} failed"
    )


if __name__ == "__main__":
    trio.run(main)
