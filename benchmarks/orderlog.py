"""Order log: lines per second from a log file to orders on the bus, and the longest loop step.

A log of ``--lines`` order-status lines (the simulator's generator, about
425 bytes a line) is written to a temporary file once; each run follows it
from offset 0 until every order has reached a subscriber of a
``MemoryBus`` (``block`` policy, draining with ``receive_batch``), in the
same process, variants alternating round by round; the table shows medians.
The longest event-loop step is measured by a trio instrument timing every
task step of the run, in wall time and in the trio thread's CPU time.

Variants:
    engine_batch            OrderLog as configured by default: worker
                            processes (``--workers``, a warm pool) read and
                            parse regions of the file themselves, never more
                            in flight than workers, and hand back the
                            encoded messages through shared memory; one bus
                            message per coin per region (a JSON array)
    engine_order            the same with ``publish="order"``: one message
                            per order
    engine_batch_loop       ``workers=0``: read in a thread, parsed in the
                            event loop in slices of a few ms
    engine_order_loop       the same, one message per order
    seed_threads            seed 000's design with its fixes: asyncio, blocks
                            read in the executor, ``json.loads`` per line on a
                            ThreadPoolExecutor in chunks never more than its
                            workers, awaited with ``asyncio.gather``; each
                            order (a dict) put on an ``asyncio.Queue`` drained
                            by a consumer task
    plain_json              ``for line in file: json.loads(line)``: parsing
                            alone, no bus, as a reference
    msgspec_decode          the order log's typed decoder alone over the whole
                            file (``decode_lines``, one core, no bus): what
                            one core can decode at best

Besides lines per second of wall time, the table shows the CPU time spent
per line by this process and its worker processes together, which says what
the machine's cores would give if they were idle, and the load average
(the machine is shared) before and after the rounds.

Run: ``python benchmarks/orderlog.py`` (``--help`` for sizes). The last line
is JSON: ``lines_per_s`` and ``max_loop_step_ms`` are the default
configuration's (``engine_batch``); the other variants' figures follow.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import gc
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import psutil
import trio

import engine
from engine.bus import MemoryBus
from services.market.orders import OrderLog, OrderLogConfig
from services.market.orders._records import _DECODER
from services.market.simulator._orderlog import generate_order_lines


class StepTimer(trio.abc.Instrument):
    """The longest task step of a run, in wall time and in the trio thread's CPU time.

    Wall time is what the loop's other tasks wait; on a shared machine it
    includes time the OS gave other processes mid-step. CPU time is the
    step's own work. Garbage-collector passes are timed too: they run inside
    whichever step allocates at the wrong moment.
    """

    def __init__(self) -> None:
        self.started: tuple[float, float] | None = None
        self.longest = self.longest_cpu = self.longest_gc = 0.0
        self.task = ""
        self._gc_started = 0.0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self.started = (time.perf_counter(), time.thread_time())

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        if self.started is None:  # the step that added the instrument
            return
        wall, cpu = time.perf_counter() - self.started[0], time.thread_time() - self.started[1]
        self.started = None
        self.longest_cpu = max(self.longest_cpu, cpu)
        if wall > self.longest:
            self.longest, self.task = wall, task.name

    def gc_callback(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._gc_started = time.perf_counter()
        else:
            self.longest_gc = max(self.longest_gc, time.perf_counter() - self._gc_started)


@attrs.frozen
class Run:
    """One run's figures."""

    lines_per_s: float
    cpu_us_per_line: float
    step: float = -1.0
    step_cpu: float = -1.0
    gc_pause: float = -1.0


def _cpu_seconds(workers: list[psutil.Process]) -> float:
    """This process's CPU time and its workers' (user and system, all threads)."""
    total = time.process_time()
    for worker in workers:
        try:
            times = worker.cpu_times()
        except psutil.NoSuchProcess:  # a worker retired meanwhile: its time is lost
            continue
        total += times.user + times.system
    return total


async def _follow_once(
    path: Path, lines: int, pool: engine.ProcessPool, **options: Any
) -> tuple[Run, str]:
    """One run of the order log, and the task of its longest step."""
    bus = MemoryBus()
    log = OrderLog(OrderLogConfig(path, poll_interval=0.01, **options), bus, pool=pool)
    timer = StepTimer()
    done = trio.Event()
    subscribed = trio.Event()
    workers = psutil.Process().children()

    async def drain() -> None:
        received = 0
        async with bus.subscribe("orders.>", maxsize=10_000, overflow="block") as sub:
            subscribed.set()
            while True:
                received += len(await sub.receive_batch(10_000))
                stats = log.statistics()
                if stats.orders >= lines and received == stats.messages:
                    done.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(drain)
        await subscribed.wait()
        trio.lowlevel.add_instrument(timer)
        gc.callbacks.append(timer.gc_callback)
        try:
            started, cpu_started = time.perf_counter(), _cpu_seconds(workers)
            await nursery.start(log.follow)
            await done.wait()
            took, cpu = time.perf_counter() - started, _cpu_seconds(workers) - cpu_started
        finally:
            trio.lowlevel.remove_instrument(timer)
            gc.callbacks.remove(timer.gc_callback)
        nursery.cancel_scope.cancel()
    stats = log.statistics()
    assert (stats.orders, stats.malformed, stats.worker_failures) == (lines, 0, 0), stats
    in_processes = stats.chunks_in_processes > 0
    assert in_processes == (options.get("workers") != 0), stats
    run = Run(lines / took, cpu / lines * 1e6, timer.longest, timer.longest_cpu, timer.longest_gc)
    return run, timer.task


def seed_threads(path: Path, lines: int, workers: int) -> Run:
    """Seed 000's way, with its fixes: chunks <= workers, asyncio.gather, a queue to a consumer."""

    def parse(chunk: list[bytes]) -> list[dict[str, object]]:
        orders = []
        for line in chunk:
            try:
                record = json.loads(line)
                order = record["order"]
                orders.append(
                    {
                        "coin": order["coin"],
                        "oid": order["oid"],
                        "status": record["status"],
                        "px": float(order["limitPx"]),
                        "sz": float(order["sz"]),
                        "time": record["time"],
                    }
                )
            except (ValueError, KeyError, TypeError):
                pass
        return orders

    async def main() -> Run:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[dict[str, object] | None] = asyncio.Queue(10_000)
        received = 0

        async def consumer() -> None:
            nonlocal received
            while await queue.get() is not None:
                received += 1

        started, cpu_started = time.perf_counter(), time.process_time()
        task = asyncio.create_task(consumer())
        with (
            concurrent.futures.ThreadPoolExecutor(workers) as executor,
            open(path, "rb") as file,  # noqa: ASYNC230  # reads go through the executor
        ):
            pending = b""
            while block := await loop.run_in_executor(executor, file.read, 4 << 20):
                block = pending + block
                cut = block.rfind(b"\n") + 1
                pending = block[cut:]
                batch = block[:cut].split(b"\n")[:-1]
                chunks_count = min(workers, max(1, len(batch) // 1000))
                size = -(-len(batch) // chunks_count)
                chunks = [batch[i : i + size] for i in range(0, len(batch), size)]
                results = await asyncio.gather(
                    *(loop.run_in_executor(executor, parse, chunk) for chunk in chunks)
                )
                for orders in results:
                    for order in orders:
                        await queue.put(order)
        await queue.put(None)
        await task
        took, cpu = time.perf_counter() - started, time.process_time() - cpu_started
        assert received == lines, received
        return Run(lines / took, cpu / lines * 1e6)

    return asyncio.run(main())


def plain_json(path: Path, lines: int) -> Run:
    started, cpu_started = time.perf_counter(), time.process_time()
    count = 0
    with open(path, "rb") as file:
        for line in file:
            json.loads(line)
            count += 1
    assert count == lines
    took, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    return Run(lines / took, cpu / lines * 1e6)


def msgspec_decode(path: Path, lines: int) -> Run:
    """The typed decoder alone, 1 MiB at a time (as a worker's regions), on this one core."""
    data = path.read_bytes()
    started, cpu_started = time.perf_counter(), time.process_time()
    count = start = 0
    while start < len(data):
        stop = data.find(b"\n", start + (1 << 20)) + 1 or len(data)
        count += len(_DECODER.decode_lines(data[start:stop]))
        start = stop
    assert count == lines
    took, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    return Run(lines / took, cpu / lines * 1e6)


VARIANTS: dict[str, dict[str, Any]] = {
    "engine_batch": {},
    "engine_order": {"publish": "order"},
    "engine_batch_loop": {"workers": 0},
    "engine_order_loop": {"publish": "order", "workers": 0},
}
DEFAULT = "engine_batch"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=500_000, help="lines in the log")
    parser.add_argument("--runs", type=int, default=3, help="rounds; medians are reported")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes")
    args = parser.parse_args()

    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "node_order_statuses"
        path.write_bytes(generate_order_lines(args.lines, seed=7))
        results = run_rounds(path, args.lines, args.workers, args.runs)
    load_after = os.getloadavg()[0]

    def median(name: str, field: str) -> float:
        return float(statistics.median(getattr(run, field) for run in results[name]))

    print(
        f"{args.lines:,} lines, {args.workers} workers, {args.runs} rounds;"
        f" load average {load_before:.2f} before, {load_after:.2f} after"
    )
    print(
        f"{'variant':<20} {'lines/s':>10} {'cpu us/line':>11} {'step ms':>8} {'cpu ms':>7}"
        f" {'gc ms':>6}   runs (lines/s)"
    )
    for name, runs in results.items():
        cells = [
            f"{median(name, field) * 1e3:.1f}" if median(name, field) >= 0 else "-"
            for field in ("step", "step_cpu", "gc_pause")
        ]
        listed = ", ".join(f"{run.lines_per_s:,.0f}" for run in runs)
        print(
            f"{name:<20} {median(name, 'lines_per_s'):>10,.0f}"
            f" {median(name, 'cpu_us_per_line'):>11.2f} {cells[0]:>8} {cells[1]:>7} {cells[2]:>6}"
            f"   {listed}"
        )
    figures: dict[str, float] = {
        "lines_per_s": round(median(DEFAULT, "lines_per_s")),
        "max_loop_step_ms": round(median(DEFAULT, "step") * 1e3, 1),
        "max_loop_step_cpu_ms": round(median(DEFAULT, "step_cpu") * 1e3, 1),
        "max_gc_pause_ms": round(median(DEFAULT, "gc_pause") * 1e3, 1),
        "cpu_us_per_line": round(median(DEFAULT, "cpu_us_per_line"), 2),
    }
    for name in results:
        if name == DEFAULT:
            continue
        figures[f"{name}_lines_per_s"] = round(median(name, "lines_per_s"))
        figures[f"{name}_cpu_us_per_line"] = round(median(name, "cpu_us_per_line"), 2)
        if name in VARIANTS:
            figures[f"{name}_max_step_ms"] = round(median(name, "step") * 1e3, 1)
            figures[f"{name}_max_step_cpu_ms"] = round(median(name, "step_cpu") * 1e3, 1)
    seed = median("seed_threads", "lines_per_s")
    figures["engine_batch_vs_seed"] = round(median("engine_batch", "lines_per_s") / seed, 2)
    figures["engine_order_vs_seed"] = round(median("engine_order", "lines_per_s") / seed, 2)
    figures["load_average_before"] = round(load_before, 2)
    figures["load_average_after"] = round(load_after, 2)
    print(json.dumps(figures))


def run_rounds(path: Path, lines: int, workers: int, runs: int) -> dict[str, list[Run]]:
    """Every variant ``runs`` times, alternating."""

    async def engine_round(results: dict[str, list[Run]]) -> None:
        async with engine.open_process_pool(workers) as pool:
            await pool.warm()
            # What a service does once started: the start-up heap is frozen,
            # so the collector's full passes walk only what the run creates.
            gc.collect()
            gc.freeze()
            try:
                for name, options in VARIANTS.items():
                    run, task = await _follow_once(path, lines, pool, **options)
                    results[name].append(run)
                    if run.step > 0.02:
                        print(
                            f"  {name}: longest step {run.step * 1e3:.1f} ms in {task!r}"
                            f" ({run.step_cpu * 1e3:.1f} ms of CPU)"
                        )
            finally:
                gc.unfreeze()

    peers: dict[str, Callable[[], Run]] = {
        "seed_threads": lambda: seed_threads(path, lines, workers),
        "plain_json": lambda: plain_json(path, lines),
        "msgspec_decode": lambda: msgspec_decode(path, lines),
    }
    results: dict[str, list[Run]] = {name: [] for name in [*VARIANTS, *peers]}
    for _ in range(runs):
        trio.run(engine_round, results)
        for name, peer in peers.items():
            results[name].append(peer())
    return results


if __name__ == "__main__":
    main()
