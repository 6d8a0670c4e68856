"""The README's five-minute tour: a supervised service with a cycle, a stall, and a graceful stop.

Run it: ``python docs/examples/tour.py``. It stops itself after about a second.
"""

from __future__ import annotations

import itertools
import os
import signal

import trio

import engine

refreshes = itertools.count(1)


async def refresh_quotes() -> None:
    """One refresh of the watchlist; the third one hangs, as seed 001's did."""
    if next(refreshes) == 3:
        await trio.sleep_forever()  # cut by the cycle deadline, not for 27 hours
    await trio.sleep(0.01)


async def ticker() -> None:
    """A worker that beats while it makes progress."""
    while True:
        await trio.sleep(0.05)
        engine.heartbeat()


async def main() -> str:
    shutdown = engine.current_shutdown()
    watchlist = engine.Cycle(refresh_quotes, interval=0.1, cycle_deadline=0.05, name="watchlist")
    async with engine.open_supervisor(name="service") as sup:
        sup.start_soon(watchlist.run, name="watchlist", stall_after=1.0)
        sup.start_soon(ticker, name="ticker", stall_after=0.5)
        await trio.sleep(0.55)
        os.kill(os.getpid(), signal.SIGTERM)  # as Kubernetes would
        await shutdown.wait()  # the first signal asks; nothing is cancelled yet
        stats = sup.statistics()
        await sup.shutdown()  # children stop last started first; the body goes on
    for path, child in stats.walk():
        print(f"{path}: {child.state}, restarts={child.restarts}, stalls={child.stalls}")
    cycle = watchlist.statistics()
    print(f"watchlist: runs={cycle.runs} timeouts={cycle.timeouts} last_error={cycle.last_error}")
    return f"stopped: {shutdown.reason}"


if __name__ == "__main__":
    print(engine.run(main, grace_period=5))
