"""An ordered graceful drain: on SIGTERM the source stops, the writers empty the queue.

Run it: ``python docs/examples/graceful_drain.py``. A source fills a queue
faster than two slow writers empty it; mid-stream the process sends itself
SIGTERM. The supervisor stops its children last started first: the source
stops reading, then the writers write every queued item and return. Nothing
received is lost, and the process exits 0.
"""

from __future__ import annotations

import os
import signal
import sys

import trio

import engine

received: list[int] = []
written: list[int] = []


async def source(send: engine.SendChannel[int]) -> None:
    """Reads items (here: makes them up) until asked to stop."""
    stop = engine.current_stop()
    item = 0
    while not stop.requested:  # take nothing new once asked to stop
        await trio.sleep(0.001)  # waiting for the next item
        received.append(item)
        await send.send(item)  # waits while the queue is full
        item += 1
        if item == 500:
            os.kill(os.getpid(), signal.SIGTERM)  # as an orchestrator would


async def write(item: int) -> None:
    await trio.sleep(0.005)  # a slow sink: the queue fills up
    written.append(item)


async def main() -> engine.ShutdownReport:
    send, receive = engine.open_channel[int](1000, overflow="block")
    writers = engine.Consumers(write, workers=2, name="writers")
    async with engine.open_supervisor(name="pipeline") as sup:
        # Consumers first, source last: children stop in reverse start order.
        await sup.start(writers.run, receive, name="writers", holds=lambda: send.statistics().depth)
        sup.start_soon(source, send, name="source", shutdown=1)
        await engine.current_shutdown().wait()  # the first signal asks; nothing is cancelled
        queued = send.statistics().depth
        print("stop requested with items still queued" if queued else "stop requested")
        report = await sup.shutdown("received SIGTERM")
    return report


if __name__ == "__main__":
    try:
        report = engine.run(main, grace_period=10)
    except engine.ForcedShutdown as exc:  # the grace period bounds the whole drain
        print(f"forced: {exc}")
        sys.exit(exc.exit_status)
    for child in report.children:  # in the order they were stopped
        counted = "" if child.dropped is None else f", dropped {child.dropped}"
        print(f"{child.name}: {child.outcome}{counted}")
    print(f"lost {len(received) - len(written)} of the items received; exit status 0")
