"""A service that finishes its in-flight item when asked to stop.

Run it: ``python docs/examples/runtime_graceful.py``. After starting three
items it sends itself SIGTERM, as an operator or an orchestrator would; the
third item still completes, no fourth one starts, and the process exits 0.
"""

from __future__ import annotations

import logging
import os
import signal
import sys

import trio

import engine

ITEM_SECONDS = 0.1
STOP_DURING_ITEM = 3


async def process(item: int) -> None:
    print(f"processing item {item}")
    if item == STOP_DURING_ITEM:
        # Stands in for Ctrl-C, `kill`, or Kubernetes stopping the pod.
        os.kill(os.getpid(), signal.SIGTERM)
    await trio.sleep(ITEM_SECONDS)  # the work itself: a stop request does not cut it short
    print(f"finished item {item}")


async def main() -> int:
    shutdown = engine.current_shutdown()
    done = 0
    while not shutdown.requested:  # take no new item once a stop is requested ...
        await process(done + 1)  # ... but finish the one in flight
        done += 1
    print(f"stopped after {done} items ({shutdown.reason})")
    return done


if __name__ == "__main__":
    logging.basicConfig(stream=sys.stdout, level=logging.INFO, format="%(name)s: %(message)s")
    try:
        done = engine.run(main, grace_period=5)
    except engine.ForcedShutdown as exc:  # the grace expired, or a second signal came
        print(f"forced: {exc}")
        sys.exit(exc.exit_status)
    print(f"engine.run returned {done}; exit status 0")
