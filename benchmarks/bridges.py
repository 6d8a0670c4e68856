"""Bridges: cancel latency, leftover processes, call rates, and iterate_in_thread throughput.

Cancel latency is the time from a deadline to the awaiting task resuming
after its cancel scope, for a call that will never return on its own:

    thread            engine.to_thread(fn) where fn waits 3,600 s on an Event
                      (abandoned at once; the Event is set at the end so no
                      thread is left running, and the abandoned threads are
                      counted by engine.bridge_statistics())
    process_sleep     pool.run(fn) where fn is time.sleep(3600)
    process_spin      pool.run(fn) where fn is a busy loop
The deadline is ``trio.current_time() + d``, and trio's clock is
``time.perf_counter()`` plus a fixed offset, so resume minus deadline is a
perf_counter interval. Before each process sample the pool is warmed, so the
deadline always falls on a call that is running, never on a worker start-up.
``cancel_process_ms`` is the worse of the two process medians.

Leftover processes: live children of this process (zombies and
multiprocessing's resource tracker excluded) once every pool has closed and
every trio run has ended.

Call rates (calls/s, one awaited call after another, trivial function):
    engine.to_thread           against trio.to_thread.run_sync
    engine.to_process          (the run's default pool) and ProcessPool.run,
                               against trio_parallel's WorkerContext.run_sync

iterate_in_thread: a plain Python generator of small items drained through
engine.iterate_in_thread (``async for`` one item at a time, and
``receive_batch()``), against one ``trio.to_thread.run_sync(next, it)`` per
item (on fewer items; rates are compared).

Rates run in the same process, alternating variant by variant each round;
the table shows the median of the rounds.

Run: ``python benchmarks/bridges.py`` (``--help`` for sizes). The last line
is JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from functools import partial

import psutil
import trio
import trio_parallel

import engine

# Set at the end of the thread-cancel run so every hung thread returns.
_release = threading.Event()


def hang_thread() -> None:
    _release.wait(3600)


def hang_sleep() -> None:
    time.sleep(3600)


def hang_spin() -> None:
    while True:
        pass


def noop(value: int) -> int:
    return value


def generate(count: int) -> Iterator[int]:
    yield from range(count)


# -- cancel latency ------------------------------------------------------------------


async def _cancel_latency(call: Callable[[], Awaitable[object]], delay: float) -> float:
    """Seconds from a deadline ``delay`` ahead to this task resuming after the scope."""
    deadline = trio.current_time() + delay
    with trio.CancelScope(deadline=deadline):
        await call()
    return trio.current_time() - deadline


async def cancel_threads(
    samples: int, delay: float
) -> tuple[list[float], engine.BridgeStatistics, engine.BridgeStatistics]:
    # Hung threads hold a token until they end: give them their own limiter.
    limiter = trio.CapacityLimiter(math.inf)
    latencies = [
        await _cancel_latency(lambda: engine.to_thread(hang_thread, limiter=limiter), delay)
        for _ in range(samples)
    ]
    abandoned = engine.bridge_statistics()
    _release.set()
    # The released threads end within µs, but the counter they decrement has no
    # event to wait on: poll it, for at most about a second.
    for _ in range(1000):
        if not engine.bridge_statistics().threads_abandoned_running:
            break
        await trio.sleep(0.001)
    return latencies, abandoned, engine.bridge_statistics()


async def cancel_processes(samples: int, delay: float) -> dict[str, list[float]]:
    latencies: dict[str, list[float]] = {"process_sleep": [], "process_spin": []}
    async with engine.open_process_pool(1) as pool:
        for _ in range(samples):
            for name, hang in (("process_sleep", hang_sleep), ("process_spin", hang_spin)):
                await pool.warm()  # the previous sample's worker was killed
                latencies[name].append(await _cancel_latency(partial(pool.run, hang), delay))
    return latencies


def leftover_processes() -> list[psutil.Process]:
    live = []
    for child in psutil.Process().children(recursive=True):
        try:
            if child.status() == psutil.STATUS_ZOMBIE:
                continue
            if any("resource_tracker" in part for part in child.cmdline()):
                continue
        except psutil.NoSuchProcess:
            continue
        live.append(child)
    return live


# -- call rates ------------------------------------------------------------------------


async def _rate(call: Callable[[int], Awaitable[int]], count: int) -> float:
    started = time.perf_counter()
    for value in range(count):
        assert await call(value) == value
    return count / (time.perf_counter() - started)


async def call_rates(runs: int, thread_calls: int, process_calls: int) -> dict[str, list[float]]:
    async with (
        engine.open_process_pool(1) as pool,
        trio_parallel.open_worker_context() as context,
    ):
        variants: dict[str, Callable[[], Awaitable[float]]] = {
            "engine.to_thread": lambda: _rate(lambda v: engine.to_thread(noop, v), thread_calls),
            "trio.to_thread": lambda: _rate(
                lambda v: trio.to_thread.run_sync(noop, v), thread_calls
            ),
            "engine.to_process": lambda: _rate(lambda v: engine.to_process(noop, v), process_calls),
            "ProcessPool.run": lambda: _rate(lambda v: pool.run(noop, v), process_calls),
            "trio_parallel": lambda: _rate(lambda v: context.run_sync(noop, v), process_calls),
        }
        rates: dict[str, list[float]] = {name: [] for name in variants}
        for round_number in range(runs + 1):  # round 0 starts the workers and is not kept
            for name, run in variants.items():
                rate = await run()
                if round_number:
                    rates[name].append(rate)
    return rates


# -- iterate_in_thread -------------------------------------------------------------------


async def iterate_engine(count: int) -> float:
    received = 0
    started = time.perf_counter()
    async with engine.iterate_in_thread(generate(count)) as items:
        async for _ in items:
            received += 1
    elapsed = time.perf_counter() - started
    assert received == count, received
    return count / elapsed


async def iterate_engine_batches(count: int) -> float:
    received = 0
    started = time.perf_counter()
    async with engine.iterate_in_thread(generate(count)) as items:
        try:
            while True:
                received += len(await items.receive_batch())
        except trio.EndOfChannel:
            pass
    elapsed = time.perf_counter() - started
    assert received == count, received
    return count / elapsed


async def iterate_per_item(count: int) -> float:
    done = object()
    iterator = generate(count)
    received = 0
    started = time.perf_counter()
    while await trio.to_thread.run_sync(next, iterator, done) is not done:
        received += 1
    elapsed = time.perf_counter() - started
    assert received == count, received
    return count / elapsed


async def iterate_rates(runs: int, items: int, per_item: int) -> dict[str, list[float]]:
    variants: dict[str, Callable[[], Awaitable[float]]] = {
        "iterate_in_thread": lambda: iterate_engine(items),
        "iterate_in_thread_batch": lambda: iterate_engine_batches(items),
        "to_thread_per_item": lambda: iterate_per_item(per_item),
    }
    rates: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(runs):
        for name, run in variants.items():
            rates[name].append(await run())
    return rates


# -- report ----------------------------------------------------------------------------


def _ms(seconds: list[float]) -> float:
    return statistics.median(seconds) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=20, help="cancel samples per kind")
    parser.add_argument("--deadline", type=float, default=0.1, help="seconds into a hung call")
    parser.add_argument("--runs", type=int, default=3, help="rounds of rates; medians reported")
    parser.add_argument("--thread-calls", type=int, default=5000)
    parser.add_argument("--process-calls", type=int, default=1000)
    parser.add_argument("--items", type=int, default=200_000, help="for iterate_in_thread")
    parser.add_argument("--per-item-items", type=int, default=20_000, help="for one call per item")
    args = parser.parse_args()

    thread_latency, abandoned, released = trio.run(cancel_threads, args.samples, args.deadline)
    process_latency = trio.run(cancel_processes, args.samples, args.deadline)
    rates = trio.run(call_rates, args.runs, args.thread_calls, args.process_calls)
    rates |= trio.run(iterate_rates, args.runs, args.items, args.per_item_items)
    left = leftover_processes()

    cancels = {"thread": thread_latency, **process_latency}
    print(f"cancel latency, deadline to resume ({args.samples} samples each)")
    print(f"{'kind':<16} {'median ms':>10} {'max ms':>8}")
    for name, values in cancels.items():
        print(f"{name:<16} {_ms(values):>10.2f} {max(values) * 1000:>8.2f}")
    print(
        f"threads abandoned: {abandoned.threads_abandoned} "
        f"(running when released: {abandoned.threads_abandoned_running}, "
        f"after: {released.threads_abandoned_running}); "
        f"leftover processes: {len(left)} {[p.cmdline() for p in left] if left else ''}"
    )
    median = {name: statistics.median(values) for name, values in rates.items()}
    print(f"{'rate':<24} {'median /s':>12}   runs (/s)")
    for name, values in rates.items():
        runs = ", ".join(f"{v:,.0f}" for v in values)
        print(f"{name:<24} {median[name]:>12,.0f}   {runs}")
    figures = {
        "cancel_thread_ms": round(_ms(thread_latency), 3),
        "cancel_process_ms": round(max(_ms(v) for v in process_latency.values()), 3),
        "cancel_process_sleep_ms": round(_ms(process_latency["process_sleep"]), 3),
        "cancel_process_spin_ms": round(_ms(process_latency["process_spin"]), 3),
        "leftover_processes": len(left),
        "threads_abandoned": abandoned.threads_abandoned,
        "threads_left_running": released.threads_abandoned_running,
        "iter_items_per_s": round(median["iterate_in_thread"]),
        "iter_batch_items_per_s": round(median["iterate_in_thread_batch"]),
        "iter_vs_per_item": round(median["iterate_in_thread"] / median["to_thread_per_item"], 2),
        "to_thread_calls_s": round(median["engine.to_thread"]),
        "trio_to_thread_calls_s": round(median["trio.to_thread"]),
        "to_process_calls_s": round(median["engine.to_process"]),
        "pool_run_calls_s": round(median["ProcessPool.run"]),
        "trio_parallel_calls_s": round(median["trio_parallel"]),
    }
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
