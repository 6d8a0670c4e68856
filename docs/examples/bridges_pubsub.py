"""Seed 004 rebuilt: a blocking pub/sub source drained in a thread while the loop stays live.

Run it: ``python docs/examples/bridges_pubsub.py``. It takes about a second.
A stand-in for redis-py's ``pubsub.get_message(timeout=...)`` blocks its
caller; through ``engine.iterate_in_thread`` the event loop keeps turning
(the "health" ticker below never misses a beat), messages arrive in batches,
and the source stops within one poll interval when the block ends.
"""

from __future__ import annotations

import queue
import threading
import time

import trio

import engine


class BlockingPubSub:
    """Like redis-py's PubSub: ``get_message(timeout)`` blocks up to ``timeout`` seconds."""

    def __init__(self) -> None:
        self._queue: queue.Queue[dict[str, object]] = queue.Queue()
        self.closed_in: str | None = None

    def publish(self, data: object) -> None:
        self._queue.put({"type": "message", "channel": "trade_events", "data": data})

    def get_message(self, timeout: float) -> dict[str, object] | None:
        try:
            return self._queue.get(timeout=timeout)
        except queue.Empty:
            return None

    def close(self) -> None:
        self.closed_in = threading.current_thread().name


async def main() -> None:
    pubsub = BlockingPubSub()
    ticks = 0

    async def health_ticker() -> None:  # stands in for /health: it must keep answering
        nonlocal ticks
        while True:
            await trio.sleep(0.01)
            ticks += 1

    def publisher() -> None:  # another process publishing trades, in bursts
        for burst in range(5):
            for i in range(200):
                pubsub.publish({"trade": burst * 200 + i})
            time.sleep(0.05)

    received = 0
    largest_batch = 0
    async with trio.open_nursery() as nursery:
        nursery.start_soon(health_ticker)
        nursery.start_soon(engine.to_thread, publisher)
        with trio.move_on_after(0.6):
            async with engine.iterate_in_thread(
                poll=pubsub.get_message, poll_interval=0.05, close=pubsub.close
            ) as messages:
                while received < 1000:
                    batch = await messages.receive_batch()
                    received += len(batch)
                    largest_batch = max(largest_batch, len(batch))
        nursery.cancel_scope.cancel()
    print(f"received {received} messages, up to {largest_batch} per wakeup")
    print(f"the loop stayed live: {ticks > 20}")
    print(f"source closed in its own thread: {pubsub.closed_in}")


if __name__ == "__main__":
    trio.run(main)
