"""The 2,500-symbol scan through map_batch on Dask, against the engine's process pool.

The work is the scan's: ``ScanJob`` per symbol, over ``SimulatedCandles``
(250 seeded daily candles generated in the worker, no store), the formula's
indicators computed and the formula evaluated, with a 60 s per-symbol
deadline. The same ``engine.map_batch`` runs it on:

    process    the engine's warm 2-worker process pool (``bridge="process"``)
    dask2      ``engine.DaskRunner`` on a LocalCluster of 2 worker processes
               (1 thread each, ``workers=2``)
    dask1      the same on a LocalCluster of 1 worker process (``workers=1``)
    serial     the job in a plain loop in this process (for the overhead)

Both clusters run beside the pool for the whole run, created once and
warmed by an untimed round. Each round runs every variant, in a new
(seeded) random order; every variant's matches are checked against the
serial loop's. The table shows medians; the figures:

    dask_vs_process_pool       process median / dask2 median (>= 0.7 wanted)
    scaling_2_vs_1             dask1 median / dask2 median (>= 1.6 wanted)
    dask_overhead_ms_per_item  dask2's worker time not spent running items
                               (wall time * 2 - the items' own run times,
                               measured in the workers), per item; median
    dask_ms_per_task           the same per Dask task (call) of the batch

and what the overhead model predicts for 8 and 32 workers (see
``docs/compute.md``).

Run: ``python benchmarks/dask.py`` (``--help`` for sizes). The last line is JSON.
"""

from __future__ import annotations

import sys
from pathlib import Path

# This file's name is the dask package's: run as a script, its folder comes
# first on sys.path and would shadow the package, here and in the workers
# (spawned, they take this path).
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]

import argparse  # noqa: E402  # after the path is fixed
import importlib.metadata  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import random  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from collections.abc import Awaitable, Callable  # noqa: E402

import distributed  # noqa: E402
import trio  # noqa: E402

import engine  # noqa: E402

# The length the batch scheduler aims each call at (docs/batch.md): the model's call count.
TARGET_CALL_SECONDS = 0.1
from services.market.candles import TIMEFRAME_MS, DateRange  # noqa: E402
from services.market.scans import (  # noqa: E402
    ScanConfig,
    ScanJob,
    Scans,
    SimulatedCandles,
    parse_formula,
)

FORMULA = "rsi14 < 30 and macd_hist > 0 and close > sma50 or close > bb_upper20"
ANCHOR_MS = 1_700_000_000_000
ITEM_DEADLINE = 60.0

Variant = Callable[[], Awaitable[tuple[list[str], float]]]


def matches(outcomes: list[engine.Outcome[str, object]]) -> tuple[list[str], float]:
    """The matched symbols, in input order, and the seconds the items ran, in all.

    Every outcome must be ``ok``.
    """
    found = []
    for outcome in outcomes:
        if outcome.status is not engine.Status.OK:
            raise AssertionError(f"{outcome.item}: {outcome.status.value} ({outcome.error!r})")
        if outcome.value.matched:  # type: ignore[attr-defined]  # a SymbolResult
            found.append(outcome.item)
    return found, sum(outcome.ran for outcome in outcomes)


def start_cluster(workers: int) -> tuple[distributed.LocalCluster, distributed.Client]:
    """A LocalCluster of ``workers`` single-threaded worker processes, and its client."""
    cluster = distributed.LocalCluster(  # type: ignore[no-untyped-call]  # distributed's API is untyped
        n_workers=workers,
        threads_per_worker=1,
        processes=True,
        host="127.0.0.1",
        scheduler_port=0,
        dashboard_address=None,
    )
    client = distributed.Client(cluster)  # type: ignore[no-untyped-call]  # distributed's API is untyped
    client.wait_for_workers(workers)
    return cluster, client


async def bench(
    symbols: int, runs: int, clients: dict[str, distributed.Client]
) -> tuple[dict[str, list[float]], dict[str, list[tuple[float, int]]]]:
    candles = SimulatedCandles(anchor_ms=ANCHOR_MS)
    universe = Scans(ScanConfig(symbols=symbols, workers=2, max_running=1), candles).symbols
    day = TIMEFRAME_MS["1d"]
    window = DateRange.from_ms(ANCHOR_MS // day * day - 250 * day, ANCHOR_MS // day * day)
    job = ScanJob(parse_formula(FORMULA), candles, "1d", window)
    runners = {name: engine.DaskRunner(client) for name, client in clients.items()}
    times: dict[str, list[float]] = {name: [] for name in ("process", *clients, "serial")}
    idle: dict[str, list[tuple[float, int]]] = {name: [] for name in clients}
    shuffle = random.Random(2026).shuffle
    async with engine.open_process_pool(2) as pool:
        await pool.warm()

        async def process() -> tuple[list[str], float]:
            return matches(
                await engine.run_batch(job, universe, pool=pool, item_deadline=ITEM_DEADLINE)
            )

        def on_dask(name: str, workers: int) -> Variant:
            async def run() -> tuple[list[str], float]:
                outcomes = await engine.run_batch(
                    job,
                    universe,
                    bridge=runners[name],
                    workers=workers,
                    item_deadline=ITEM_DEADLINE,
                )
                return matches(outcomes)

            return run

        async def serial() -> tuple[list[str], float]:
            started = time.perf_counter()
            found = [r.symbol for r in map(job, universe) if r.matched]
            return found, time.perf_counter() - started

        variants: dict[str, Variant] = {"process": process, "serial": serial}
        for name, client in clients.items():
            threads: dict[str, int] = client.nthreads()  # type: ignore[no-untyped-call]  # distributed's API is untyped
            variants[name] = on_dask(name, sum(threads.values()))
        reference, _ = await serial()
        for round_number in range(runs + 1):  # round 0 warms everything and is not kept
            order = list(variants)
            shuffle(order)
            for name in order:
                before = runners[name].statistics().tasks if name in runners else 0
                started = time.perf_counter()
                found, ran = await variants[name]()
                elapsed = time.perf_counter() - started
                if found != reference:
                    raise AssertionError(f"{name}: matches differ from the serial loop's")
                if round_number:
                    times[name].append(elapsed)
                    if name in runners:
                        count = runners[name].statistics().tasks - before
                        width = 2 if name == "dask2" else 1
                        # Worker time not spent running items: the tasks' overhead.
                        idle[name].append((elapsed * width - ran, count))
    return times, idle


def predict(serial: float, per_task: float, workers: int) -> float:
    """The overhead model's wall time for ``workers`` workers (see docs/compute.md)."""
    share = serial / workers
    calls = max(1, math.ceil(share / TARGET_CALL_SECONDS))
    return share + calls * per_task


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--symbols", type=int, default=2500)
    parser.add_argument("--runs", type=int, default=7, help="timed rounds; medians are reported")
    args = parser.parse_args()
    if args.runs < 1 or args.symbols < 1:
        parser.error("--runs and --symbols must be >= 1")
    load = os.getloadavg()[0]
    clusters = {"dask2": start_cluster(2), "dask1": start_cluster(1)}
    try:
        clients = {name: client for name, (_, client) in clusters.items()}
        times, idle = trio.run(bench, args.symbols, args.runs, clients)
    finally:
        for cluster, client in clusters.values():
            client.close()  # type: ignore[no-untyped-call]  # distributed's API is untyped
            cluster.close()
    median = {name: statistics.median(values) for name, values in times.items()}
    print(
        f"{args.symbols:,} symbols, {args.runs} rounds, formula {FORMULA!r}; "
        f"load average {load:.2f} before ({os.cpu_count()} CPUs); "
        f"distributed {importlib.metadata.version('distributed')}"
    )
    print(f"{'variant':<8} {'median s':>9} {'best s':>7}   runs (s)")
    for name, values in times.items():
        runs = ", ".join(f"{v:.3f}" for v in values)
        print(f"{name:<8} {median[name]:>9.3f} {min(values):>7.3f}   {runs}")
    overhead = statistics.median(seconds for seconds, _ in idle["dask2"]) / args.symbols
    tasks_per_batch = statistics.median(count for _, count in idle["dask2"])
    per_task = statistics.median(seconds / count for seconds, count in idle["dask2"])
    print(
        f"dask2: {tasks_per_batch:g} tasks a batch (median); "
        f"overhead {overhead * 1e3:.3f} ms an item, {per_task * 1e3:.1f} ms a task"
    )
    for workers in (1, 2, 8, 32):
        wall = predict(median["serial"], per_task, workers)
        print(
            f"model, {workers:>2} workers: {wall:.3f} s, "
            f"{median['serial'] / wall:.2f}x the serial loop"
        )
    figures = {
        "symbols": args.symbols,
        "process_s": round(median["process"], 4),
        "dask2_s": round(median["dask2"], 4),
        "dask1_s": round(median["dask1"], 4),
        "serial_s": round(median["serial"], 4),
        "dask_vs_process_pool": round(median["process"] / median["dask2"], 3),
        "dask_overhead_ms_per_item": round(overhead * 1e3, 4),
        "dask_ms_per_task": round(per_task * 1e3, 2),
        "scaling_2_vs_1": round(median["dask1"] / median["dask2"], 3),
        "model_speedup_8": round(median["serial"] / predict(median["serial"], per_task, 8), 2),
        "model_speedup_32": round(median["serial"] / predict(median["serial"], per_task, 32), 2),
    }
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
