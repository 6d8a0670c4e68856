"""A full scan through the service's scan path, against the same work serially.

The service's path: ``Scans.start(formula)`` on a warm pool of 2 worker
processes: each symbol's 250 daily candles are generated from the simulator's
seeded history in the worker, its indicators computed (only those the formula
names) and the formula evaluated, one outcome per symbol, with a 60 s
per-symbol deadline. The peer is the same job (`ScanJob`) in a plain loop in
this process. Both run in the same process, alternating, several rounds; the
table shows medians, and every round's matches are checked against the
serial loop's.

Run: ``python benchmarks/scan.py`` (``--help`` for sizes). The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import trio

from services.market.scans import ScanConfig, ScanJob, Scans, SimulatedKlines, parse_formula

WORKERS = 2
FORMULA = "rsi14 < 30 and macd_hist > 0 and close > sma50 or close > bb_upper20"
ANCHOR_MS = 1_700_000_000_000


async def bench(symbols: int, runs: int) -> dict[str, list[float]]:
    klines = SimulatedKlines(anchor_ms=ANCHOR_MS)
    scans = Scans(ScanConfig(symbols=symbols, workers=WORKERS, max_running=1), klines)
    job = ScanJob(parse_formula(FORMULA), klines)
    times: dict[str, list[float]] = {"scan": [], "serial": []}
    async with trio.open_nursery() as nursery:
        await nursery.start(scans.run)
        reference: list[str] | None = None
        for round_number in range(runs + 1):  # round 0 warms the pool and is not kept
            order = ["scan", "serial"] if round_number % 2 else ["serial", "scan"]
            for name in order:
                started = time.perf_counter()
                if name == "scan":
                    scan = scans.start(FORMULA)
                    await scan.wait()
                    matched = [r.symbol for r in scan.matches()]
                    assert scan.summary().completed == symbols, scan.summary()
                else:
                    matched = [r.symbol for r in map(job, scans.symbols) if r.matched]
                elapsed = time.perf_counter() - started
                if reference is None:
                    reference = matched
                if matched != reference:
                    raise AssertionError(f"{name}: matches differ from the first round's")
                if round_number:
                    times[name].append(elapsed)
        nursery.cancel_scope.cancel()
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--symbols", type=int, default=2500)
    parser.add_argument("--runs", type=int, default=5, help="timed rounds; medians are reported")
    args = parser.parse_args()
    if args.runs < 1 or args.symbols < 1:
        parser.error("--runs and --symbols must be >= 1")
    load = os.getloadavg()[0]
    times = trio.run(bench, args.symbols, args.runs)
    median = {name: statistics.median(values) for name, values in times.items()}
    print(
        f"{args.symbols:,} symbols, {WORKERS} workers, {args.runs} rounds, formula {FORMULA!r}; "
        f"load average {load:.2f} before ({os.cpu_count()} CPUs)"
    )
    print(f"{'variant':<8} {'median s':>9} {'best s':>7}   runs (s)")
    for name, values in times.items():
        runs = ", ".join(f"{v:.3f}" for v in values)
        print(f"{name:<8} {median[name]:>9.3f} {min(values):>7.3f}   {runs}")
    figures = {
        "symbols": args.symbols,
        "scan_s": round(median["scan"], 4),
        "serial_s": round(median["serial"], 4),
        "speedup": round(median["serial"] / median["scan"], 3),
    }
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
