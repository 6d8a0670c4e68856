"""map_batch on a Dask cluster: one outcome per item, a hung item cut at its deadline.

A LocalCluster of two worker processes scans 200 "symbols": symbol 13
raises, symbol 77 hangs (Dask cannot interrupt it: the runner cancels its
task, and kills and replaces the worker running it). ``docs/compute.md``
shows this file's output, and a test checks that the two agree.

Run: ``python docs/examples/dask_batch.py``, or, to use a cluster that is
running already, ``python docs/examples/dask_batch.py tcp://host:8786``.
"""

from __future__ import annotations

import collections
import sys
import time

import distributed
import trio

import engine


def scan(symbol: int) -> int:
    if symbol == 13:
        raise LookupError(f"no klines for symbol {symbol}")
    if symbol == 77:
        time.sleep(3600)  # hangs: only killing its worker ends it
    return symbol * symbol


async def main(client: distributed.Client) -> None:
    runner = engine.DaskRunner(client)
    workers = sum(client.nthreads().values())  # type: ignore[no-untyped-call]  # distributed's API is untyped
    async with engine.map_batch(
        scan, range(200), bridge=runner, workers=workers, item_deadline=1
    ) as batch:
        async for outcome in batch:
            if outcome.status is not engine.Status.OK:
                print(f"symbol {outcome.item}: {outcome.status.value} ({outcome.error})")
    outcomes = batch.results()
    counts = collections.Counter(o.status.value for o in outcomes)
    print(f"outcomes: {dict(sorted(counts.items()))}")
    print(f"sum of squares: {sum(o.value or 0 for o in outcomes)}")
    stats = runner.statistics()
    print(
        f"tasks cancelled={stats.cancelled} abandoned={stats.abandoned}"
        f" workers killed={stats.workers_killed} in flight={stats.in_flight}"
    )


def on_a_new_cluster() -> None:
    with (
        distributed.LocalCluster(  # type: ignore[no-untyped-call]  # distributed's API is untyped
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
        ) as cluster,
        distributed.Client(cluster) as client,  # type: ignore[no-untyped-call]  # distributed's API is untyped
    ):
        trio.run(main, client)


if __name__ == "__main__":
    if len(sys.argv) > 1:
        with distributed.Client(sys.argv[1]) as client:  # type: ignore[no-untyped-call]  # distributed's API is untyped
            trio.run(main, client)
    else:
        on_a_new_cluster()
