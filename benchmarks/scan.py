"""Seed 002's ProcessingEngine over a year of stored daily candles, against the same work serially.

Setup (not timed): the exchange simulator lists the universe with its clock
at 2024-01-15, and the candle fetcher fills a SQLite store in a temporary
directory with 2023's daily candles and the warm-up bars before them, from
the simulator's REST klines.

Timed, alternating, in one process, several rounds (round 0 warms up and is
not kept):

- ``engine``: ``ProcessingEngine(store, FormulaService(), max_workers=2)``,
  one ``process_batch`` of the year for every symbol; the pool stays open
  between rounds (``async with``), so a round pays no process starts;
- ``scan``: the service's path, ``Scans.start`` with the same range on a warm
  pool of 2 workers (the store is already full, so nothing is fetched);
- ``serial``: the same per-symbol work (read the bars from the store,
  evaluate the formula at every bar) in a plain loop in this process.

Every round's matches are checked against the serial loop's, symbol by
symbol. The ceiling is the two-worker ideal, the serial time halved:
``engine_vs_ceiling`` is that over the engine's time (1.0 would be a
perfect two-way split with no overhead at all).

Run: ``python benchmarks/scan.py`` (``--help`` for sizes). The last line is JSON.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import tempfile
import time

import trio

from services.market.candles import (
    DateRange,
    FetcherConfig,
    SqliteCandleStore,
    open_candle_fetcher,
)
from services.market.processing import FormulaService, ProcessingEngine, ProcessingJob
from services.market.scans import ScanConfig, ScanJob, Scans, parse_formula, universe
from services.market.simulator import SimulatorConfig, open_simulator

WORKERS = 2
FORMULA = "rsi14 < 30 and macd_hist > 0 or close > bb_upper20"
NOW = datetime.datetime(2024, 1, 15, tzinfo=datetime.UTC)
NOW_MS = int(NOW.timestamp() * 1000)
YEAR = DateRange(datetime.date(2023, 1, 1), datetime.date(2023, 12, 31))
# The simulator is this benchmark's own: far above Binance's 6,000 a minute.
WEIGHT = 10_000_000


async def fill(store: SqliteCandleStore, symbols: tuple[str, ...]) -> float:
    """Fill ``store`` with what every variant reads; the seconds it took."""
    started = time.perf_counter()
    reading = ScanJob(parse_formula(FORMULA), store, "1d", YEAR).reading()
    exchange = SimulatorConfig(universe=len(symbols), epoch_ms=NOW_MS, weight_limit=WEIGHT)
    async with (
        open_simulator(exchange) as simulator,
        open_candle_fetcher(
            store, simulator.address.rest_url, FetcherConfig(weight_budget=WEIGHT)
        ) as fetcher,
    ):
        failed = await fetcher.fill_each(symbols, "1d", reading, concurrency=8)
    if failed:
        raise AssertionError(f"could not fill {len(failed)} symbols: {next(iter(failed.values()))}")
    return time.perf_counter() - started


async def bench(
    store: SqliteCandleStore, symbols: tuple[str, ...], runs: int
) -> dict[str, list[float]]:
    serial_job = ScanJob(parse_formula(FORMULA), store, "1d", YEAR)
    job = ProcessingJob(symbols, "1d", YEAR, FORMULA)
    scans = Scans(
        ScanConfig(symbols=len(symbols), workers=WORKERS, max_running=1, warm=True),
        store,
        clock=lambda: NOW_MS,
    )
    times: dict[str, list[float]] = {"engine": [], "scan": [], "serial": []}
    async with (
        ProcessingEngine(store, FormulaService(), max_workers=WORKERS) as processing,
        trio.open_nursery() as nursery,
    ):
        await nursery.start(scans.run)
        reference: dict[str, tuple[int, ...]] = {}
        for round_number in range(runs + 1):  # round 0 warms the pools and is not kept
            order = ["engine", "scan", "serial"]
            shift = round_number % len(order)
            for name in order[shift:] + order[:shift]:
                started = time.perf_counter()
                if name == "engine":
                    results = await processing.process_batch(job)
                    errors = [r for r in results if r.error is not None]
                    assert not errors, errors[:3]
                    matches = {r.symbol: r.matches for r in results}
                elif name == "scan":
                    scan = scans.start(FORMULA, date_range=YEAR)
                    await scan.wait()
                    assert scan.summary().completed == len(symbols), scan.summary()
                    matches = {r.symbol: r.matches for r in scan.results()}
                else:
                    matches = {s: serial_job(s).matches for s in symbols}
                elapsed = time.perf_counter() - started
                if name == "serial" and not reference:
                    reference = matches
                if reference and matches != reference:
                    raise AssertionError(f"{name}: matches differ from the serial loop's")
                if round_number:
                    times[name].append(elapsed)
        nursery.cancel_scope.cancel()
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--symbols", type=int, default=2500)
    parser.add_argument("--runs", type=int, default=5, help="timed rounds; medians are reported")
    parser.add_argument(
        "--candles",
        help="a SQLite file to keep the filled store in, so that a later run fetches nothing"
        " (default: a temporary file)",
    )
    args = parser.parse_args()
    if args.runs < 1 or args.symbols < 1:
        parser.error("--runs and --symbols must be >= 1")
    symbols = universe(args.symbols)
    with tempfile.TemporaryDirectory(prefix="bench-scan-") as directory:
        path = args.candles or os.path.join(directory, "candles.sqlite")
        store = SqliteCandleStore(path)
        filled = trio.run(fill, store, symbols)
        load = os.getloadavg()[0]
        times = trio.run(bench, store, symbols, args.runs)
        store.close()
    median = {name: statistics.median(values) for name, values in times.items()}
    print(
        f"{args.symbols:,} symbols x 2023's daily candles from the store (filled in "
        f"{filled:.1f} s), {WORKERS} workers, {args.runs} rounds, formula {FORMULA!r}; "
        f"load average {load:.2f} before ({os.cpu_count()} CPUs)"
    )
    print(f"{'variant':<8} {'median s':>9} {'best s':>7}   runs (s)")
    for name, values in times.items():
        runs = ", ".join(f"{v:.3f}" for v in values)
        print(f"{name:<8} {median[name]:>9.3f} {min(values):>7.3f}   {runs}")
    figures = {
        "symbols": args.symbols,
        "processing_engine_s": round(median["engine"], 4),
        "scan_s": round(median["scan"], 4),
        "serial_s": round(median["serial"], 4),
        "speedup": round(median["serial"] / median["engine"], 3),
        "engine_vs_ceiling": round(median["serial"] / WORKERS / median["engine"], 3),
    }
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
