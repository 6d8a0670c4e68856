"""Batch throughput: engine.map_batch against a serial loop, ProcessPoolExecutor and trio-parallel.

Seed 002's job, per symbol: a seeded random walk of 252 daily closes, then
EMA12, EMA26, MACD, its 9-period signal line and RSI14 in numpy, returning a
small dict. 2,500 symbols, 2 workers. Every variant has its own pool,
created once, warmed by an untimed round, and reused; the variants run in
the same process, alternating round by round so the noise of a shared
machine falls on all of them alike; the table shows the median of the
rounds. Each round runs them in a new (seeded) random order: what ran just
before matters, since a pool whose workers sat idle for a while starts its
next batch some milliseconds slower on a virtual machine, and a fixed or
rotated order would always give each variant the same predecessor. Every
variant's results are checked, item by item, against the serial loop's.

Variants:
    serial                   a plain loop in this process
    ppe_as_completed         ProcessPoolExecutor(2): ``submit`` per item, ``as_completed``
    ppe_map50                ProcessPoolExecutor(2).map(chunksize=50)
    ceiling                  ProcessPoolExecutor(2).map(chunksize=1250): one call per
                             worker, nothing to balance or report; what the machine's two
                             cores allow, for reading the other figures (not a peer)
    trio_parallel_per_item   one ``WorkerContext.run_sync`` per item, CapacityLimiter(2)
    engine                   engine.map_batch(bridge="process", item_deadline=60) on a
                             warm engine.open_process_pool(2); chunks sized by the engine
    engine_cold              the same, timed from opening a fresh pool (worker start-up
                             included) to the last outcome; closing the pool is not timed

Ratios are speedups: the peer's median time over the engine's. The peers
give no per-item deadline; the engine gives each item its own 60 s one.

Worker processes are spawned: they import this file as ``__mp_main__``, so
the job is found by name (``__main__.indicators``) and the script's work
stays behind ``if __name__ == "__main__"``.

Run: ``python benchmarks/batch.py`` (``--help`` for sizes). The last line
is JSON.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import gc
import json
import multiprocessing
import os
import random
import statistics
import time
from collections.abc import Awaitable, Callable

import numpy as np
import numpy.typing as npt
import trio
import trio_parallel

import engine

WORKERS = 2
BARS = 252
ITEM_DEADLINE = 60.0

Result = dict[str, float]
FloatArray = npt.NDArray[np.float64]


def _ema(values: FloatArray, span: int) -> FloatArray:
    """The recursive EMA ``out[i] = a*x[i] + (1-a)*out[i-1]``, seeded with ``x[0]``, vectorised.

    Unrolled, ``out[i] = w**i * (x[0] + a * sum(x[j] / w**j for j in 1..i))``
    with ``w = 1 - a``: one cumulative sum. ``w**-i`` stays below 1e25 for
    spans >= 9 over 252 bars, far inside float64's range.
    """
    alpha = 2 / (span + 1)
    powers = (1 - alpha) ** np.arange(len(values), dtype=np.float64)
    scaled = values / powers
    scaled[1:] *= alpha
    out: FloatArray = np.cumsum(scaled) * powers
    return out


def indicators(symbol_seed: int) -> Result:
    """Seed 002's per-symbol job: closes of a seeded random walk, MACD and RSI14."""
    rng = np.random.default_rng(symbol_seed)
    closes = 100 * np.exp(np.cumsum(rng.normal(0, 0.02, BARS)))
    macd = _ema(closes, 12) - _ema(closes, 26)
    signal_line = _ema(macd, 9)
    deltas = np.diff(closes)
    gains = float(np.clip(deltas, 0, None)[-14:].mean())
    losses = float(-np.clip(deltas, None, 0)[-14:].mean())
    rsi = 100.0 if losses == 0 else 100 - 100 / (1 + gains / losses)
    return {
        "close": float(closes[-1]),
        "macd": float(macd[-1]),
        "signal": float(signal_line[-1]),
        "rsi14": rsi,
    }


# -- the variants: each returns (results in input order, seconds) --------------


async def serial(seeds: list[int]) -> tuple[list[Result], float]:
    # Blocking the event loop on purpose: nothing else runs while it is timed.
    started = time.perf_counter()
    results = [indicators(seed) for seed in seeds]
    return results, time.perf_counter() - started


async def ppe_as_completed(
    executor: concurrent.futures.ProcessPoolExecutor, seeds: list[int]
) -> tuple[list[Result], float]:
    started = time.perf_counter()
    futures = {executor.submit(indicators, seed): index for index, seed in enumerate(seeds)}
    results: list[Result] = [{} for _ in seeds]
    for future in concurrent.futures.as_completed(futures):
        results[futures[future]] = future.result()
    return results, time.perf_counter() - started


async def ppe_map50(
    executor: concurrent.futures.ProcessPoolExecutor, seeds: list[int]
) -> tuple[list[Result], float]:
    started = time.perf_counter()
    results = list(executor.map(indicators, seeds, chunksize=50))
    return results, time.perf_counter() - started


async def ceiling(
    executor: concurrent.futures.ProcessPoolExecutor, seeds: list[int]
) -> tuple[list[Result], float]:
    started = time.perf_counter()
    half = -(-len(seeds) // WORKERS)
    results = list(executor.map(indicators, seeds, chunksize=half))
    return results, time.perf_counter() - started


async def trio_parallel_per_item(
    context: trio_parallel.WorkerContext, seeds: list[int]
) -> tuple[list[Result], float]:
    limiter = trio.CapacityLimiter(WORKERS)
    results: list[Result] = [{} for _ in seeds]

    async def one(index: int, seed: int) -> None:
        results[index] = await context.run_sync(indicators, seed, limiter=limiter)

    started = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for index, seed in enumerate(seeds):
            nursery.start_soon(one, index, seed)
    return results, time.perf_counter() - started


async def _engine_batch(pool: engine.ProcessPool, seeds: list[int]) -> list[Result]:
    async with engine.map_batch(
        indicators, seeds, bridge="process", pool=pool, item_deadline=ITEM_DEADLINE
    ) as batch:
        pass
    return [outcome.unwrap() for outcome in batch.results()]


async def engine_warm(pool: engine.ProcessPool, seeds: list[int]) -> tuple[list[Result], float]:
    started = time.perf_counter()
    results = await _engine_batch(pool, seeds)
    return results, time.perf_counter() - started


async def engine_cold(seeds: list[int]) -> tuple[list[Result], float]:
    started = time.perf_counter()
    async with engine.open_process_pool(WORKERS) as pool:
        results = await _engine_batch(pool, seeds)
        elapsed = time.perf_counter() - started
    return results, elapsed


async def engine_profile(pool: engine.ProcessPool, seeds: list[int]) -> dict[str, float]:
    """One more warm engine batch, with what explains its time: calls, worker busy time."""
    started = time.perf_counter()
    async with engine.map_batch(
        indicators, seeds, bridge="process", pool=pool, item_deadline=ITEM_DEADLINE
    ) as batch:
        pass
    elapsed = time.perf_counter() - started
    outcomes = batch.results()
    ran = sum(outcome.ran for outcome in outcomes)
    calls = batch.statistics().calls
    return {
        "seconds": elapsed,
        "calls": calls,
        "items_per_call": len(seeds) / calls,
        "job_us_per_item": ran / len(seeds) * 1e6,
        # Share of the two workers' wall time spent inside the job itself.
        "worker_utilisation": ran / (WORKERS * elapsed),
    }


# -- running ---------------------------------------------------------------------

Variant = Callable[[], Awaitable[tuple[list[Result], float]]]


async def bench(symbols: int, runs: int) -> tuple[dict[str, list[float]], dict[str, float]]:
    seeds = list(range(symbols))
    reference = [indicators(seed) for seed in seeds]
    spawn = multiprocessing.get_context("spawn")  # as the engine and trio-parallel start theirs
    with contextlib.ExitStack() as executors:
        # One executor per variant, as the engine and trio-parallel have their
        # own pools: workers that just ran are quicker off the mark than
        # workers that sat idle, so sharing one would favour its variants.
        as_completed_pool, map50_pool, ceiling_pool = (
            executors.enter_context(
                concurrent.futures.ProcessPoolExecutor(WORKERS, mp_context=spawn)
            )
            for _ in range(3)
        )
        async with (
            trio_parallel.open_worker_context() as context,
            engine.open_process_pool(WORKERS) as pool,
        ):
            await pool.warm()
            variants: dict[str, Variant] = {
                "serial": lambda: serial(seeds),
                "ppe_as_completed": lambda: ppe_as_completed(as_completed_pool, seeds),
                "ppe_map50": lambda: ppe_map50(map50_pool, seeds),
                "ceiling": lambda: ceiling(ceiling_pool, seeds),
                "trio_parallel_per_item": lambda: trio_parallel_per_item(context, seeds),
                "engine": lambda: engine_warm(pool, seeds),
                "engine_cold": lambda: engine_cold(seeds),
            }
            times: dict[str, list[float]] = {name: [] for name in variants}
            names = list(variants)
            for round_number in range(runs + 1):  # round 0 warms every pool and is not kept
                # A new order each round: no variant always follows the same one.
                order = names.copy()
                random.Random(round_number).shuffle(order)
                for name in order:
                    # Each variant starts on a collected heap: a full collection
                    # left over from the one before (tens of ms with all the
                    # results kept) would land on whichever runs next.
                    gc.collect()
                    results, seconds = await variants[name]()
                    if results != reference:
                        wrong = sum(1 for r, e in zip(results, reference, strict=True) if r != e)
                        raise AssertionError(f"{name}: {wrong} of {symbols} results differ")
                    if round_number:
                        times[name].append(seconds)
            profile = await engine_profile(pool, seeds)
    return times, profile


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--symbols", type=int, default=2500)
    parser.add_argument("--runs", type=int, default=7, help="timed rounds; medians are reported")
    args = parser.parse_args()
    if args.runs < 1 or args.symbols < 1:
        parser.error("--runs and --symbols must be >= 1")

    load_before = os.getloadavg()[0]
    times, profile = trio.run(bench, args.symbols, args.runs)
    load_after = os.getloadavg()[0]

    median = {name: statistics.median(values) for name, values in times.items()}
    print(
        f"{args.symbols:,} symbols, {WORKERS} workers, {args.runs} rounds; results verified; "
        f"load average {load_before:.2f} before, {load_after:.2f} after ({os.cpu_count()} CPUs)"
    )
    print(f"{'variant':<24} {'median s':>9} {'best s':>7} {'engine x':>9}   runs (s)")
    for name, values in times.items():
        runs = ", ".join(f"{v:.3f}" for v in values)
        speedup = median[name] / median["engine"]
        print(f"{name:<24} {median[name]:>9.3f} {min(values):>7.3f} {speedup:>9.2f}   {runs}")
    print(
        f"engine profile: {profile['seconds']:.3f} s, {profile['calls']:.0f} calls, "
        f"{profile['items_per_call']:.0f} items/call, "
        f"job {profile['job_us_per_item']:.0f} µs/item in the workers, "
        f"worker utilisation {profile['worker_utilisation']:.0%}"
    )
    figures = {
        "serial_s": round(median["serial"], 4),
        "ppe_as_completed_s": round(median["ppe_as_completed"], 4),
        "ppe_map50_s": round(median["ppe_map50"], 4),
        "trio_parallel_per_item_s": round(median["trio_parallel_per_item"], 4),
        "engine_s": round(median["engine"], 4),
        "engine_cold_s": round(median["engine_cold"], 4),
        "ceiling_s": round(median["ceiling"], 4),
        "engine_vs_serial": round(median["serial"] / median["engine"], 3),
        "engine_vs_ppe_map50": round(median["ppe_map50"] / median["engine"], 3),
        "engine_vs_trio_parallel_per_item": round(
            median["trio_parallel_per_item"] / median["engine"], 3
        ),
        "ceiling_vs_serial": round(median["serial"] / median["ceiling"], 3),
        "engine_vs_ceiling": round(median["ceiling"] / median["engine"], 3),
    }
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
