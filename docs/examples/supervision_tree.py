"""A small supervision tree: a flaky feed, a watchlist worker that hangs, and a sub-tree.

Run it: ``python docs/examples/supervision_tree.py``. It runs for about two
seconds of real time and prints what the supervisor did.
"""

from __future__ import annotations

import itertools
import logging

import attrs
import trio

import engine

attempts = itertools.count(1)


async def feed(*, task_status: trio.TaskStatus[str]) -> None:
    """Connects (fails twice first, like a flaky exchange), then streams."""
    attempt = next(attempts)
    await trio.sleep(0.05)  # connecting...
    if attempt <= 2:
        raise ConnectionError(f"exchange refused connection (attempt {attempt})")
    task_status.started(f"connected on attempt {attempt}")
    while True:
        await trio.sleep(0.05)
        engine.heartbeat()


async def watchlist() -> None:
    """Refreshes quotes; the second refresh hangs the way seed 001's worker did."""
    for refresh in itertools.count(1):
        engine.heartbeat()
        if refresh == 2:
            await trio.sleep_forever()  # a request that never returns
        await trio.sleep(0.1)


async def indicators(*, task_status: trio.TaskStatus[str]) -> None:
    """A sub-tree: its own supervisor with two workers; ready once both run."""
    async with engine.open_supervisor(name="indicators", strategy="one_for_all") as sup:
        sup.start_soon(trio.sleep_forever, name="ema")
        sup.start_soon(trio.sleep_forever, name="rsi")
        task_status.started("ema and rsi running")


async def main() -> None:
    quick = engine.Backoff(initial=0.05, maximum=1.0, jitter=0.0)
    async with engine.open_supervisor(name="market", max_restarts=10, period=60) as sup:
        # start() waits until the child is ready, and raises if it fails first.
        print("indicators:", await sup.start(indicators, name="indicators"))
        # A feed may be down at boot: retry by policy, ready once connected.
        sup.start_soon(feed, name="feed", backoff=quick, reports_ready=True)
        sup.start_soon(watchlist, name="watchlist", stall_after=0.3, backoff=quick)
        await trio.sleep(1.0)
        stats = sup.statistics()
        sup.cancel()
    for path, child in stats.walk():
        print(
            f"{path}: state={child.state} ready={child.ready} restarts={child.restarts} "
            f"stalls={child.stalls} last_error={child.last_error}"
        )
    print("after cancel:", [str(c.state) for c in sup.statistics().children])
    print("json-ready:", sorted(attrs.asdict(stats)["children"][0]))


if __name__ == "__main__":
    logging.basicConfig(level=logging.ERROR)  # the stall warnings are summarised below
    trio.run(main)
