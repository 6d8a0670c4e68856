"""map_batch against itself at another git revision: what a change to the engine did.

The engine of the working tree and the engine at ``--against`` (default
``HEAD``) run the same batch in the same process, alternating in a new
(seeded) random order each round, each on its own warm pool of two
workers, so the machine's noise falls on both alike. The revision's
``engine/`` is extracted with ``git archive`` into a temporary folder as a
package of another name; it must import on its own (it uses only relative
imports, as ``engine/`` does).

Job: the per-symbol indicators of ``benchmarks/batch.py``. Per
variant: the median wall time of a batch, the median CPU time of this
process during it (the parent's share of the work), and the median of the
per-round ratio of wall times.

Run: ``python benchmarks/batch_ab.py --against HEAD~1 --symbols 2500 --runs 41``.
The last line is JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import trio

import engine

sys.path.insert(0, str(Path(__file__).resolve().parent))
from batch import indicators  # the job lives beside this script

ROOT = Path(__file__).resolve().parent.parent
OTHER = "engine_at_revision"
ITEM_DEADLINE = 60.0


@contextlib.contextmanager
def engine_at(revision: str) -> Iterator[ModuleType]:
    """The engine package as it was at ``revision``, importable as ``OTHER``."""
    with tempfile.TemporaryDirectory(prefix="engine-ab-") as folder:
        archive = subprocess.run(
            ["git", "-C", str(ROOT), "archive", revision, "engine"],
            check=True,
            capture_output=True,
        ).stdout
        tar = Path(folder) / "engine.tar"
        tar.write_bytes(archive)
        with tarfile.open(tar) as opened:
            opened.extractall(folder, filter="data")
        os.rename(Path(folder) / "engine", Path(folder) / OTHER)
        # Spawned workers get this path too, so they find the package.
        sys.path.insert(0, folder)
        try:
            yield importlib.import_module(OTHER)
        finally:
            sys.path.remove(folder)


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def one_batch(module: Any, pool: Any, seeds: list[int]) -> tuple[float, float]:
    gc.collect()
    cpu, started = cpu_seconds(), time.perf_counter()
    async with module.map_batch(indicators, seeds, pool=pool, item_deadline=ITEM_DEADLINE) as batch:
        pass
    for outcome in batch.results():
        outcome.unwrap()
    return time.perf_counter() - started, cpu_seconds() - cpu


async def bench(other: ModuleType, symbols: int, runs: int) -> dict[str, list[tuple[float, float]]]:
    seeds = list(range(symbols))
    async with engine.open_process_pool(2) as here, other.open_process_pool(2) as there:
        await here.warm()
        await there.warm()
        variants = {"working_tree": (engine, here), "revision": (other, there)}
        times: dict[str, list[tuple[float, float]]] = {name: [] for name in variants}
        for round_number in range(runs + 1):  # round 0 warms both and is not kept
            order = list(variants)
            random.Random(round_number).shuffle(order)
            for name in order:
                module, pool = variants[name]
                measured = await one_batch(module, pool, seeds)
                if round_number:
                    times[name].append(measured)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--against", default="HEAD", help="the git revision to compare with")
    parser.add_argument("--symbols", type=int, default=2500)
    parser.add_argument("--runs", type=int, default=41, help="alternating rounds")
    args = parser.parse_args()
    if args.runs < 1 or args.symbols < 1:
        parser.error("--runs and --symbols must be >= 1")

    with engine_at(args.against) as other:
        times = trio.run(bench, other, args.symbols, args.runs)

    here, there = times["working_tree"], times["revision"]
    ratios = [a[0] / b[0] for a, b in zip(here, there, strict=True)]
    print(f"{args.symbols:,} symbols, 2 workers, {args.runs} rounds, against {args.against}")
    print(f"{'variant':<14} {'wall ms':>8} {'parent CPU ms':>14}")
    for name, values in times.items():
        wall = statistics.median(v[0] for v in values) * 1e3
        cpu = statistics.median(v[1] for v in values) * 1e3
        print(f"{name:<14} {wall:>8.2f} {cpu:>14.2f}")
    print(f"working tree / revision, per-round wall ratio: median {statistics.median(ratios):.3f}")
    figures = {
        "working_tree_s": round(statistics.median(v[0] for v in here), 5),
        "revision_s": round(statistics.median(v[0] for v in there), 5),
        "working_tree_cpu_s": round(statistics.median(v[1] for v in here), 5),
        "revision_cpu_s": round(statistics.median(v[1] for v in there), 5),
        "wall_ratio": round(statistics.median(ratios), 4),
    }
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
