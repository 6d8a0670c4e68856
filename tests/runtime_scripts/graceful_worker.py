"""A worker under ``engine.run`` that finishes its in-flight item when stopped.

Run by tests/test_runtime.py, which sends it signals. It prints one line per
event so the test can follow it without sleeping.
"""

from __future__ import annotations

import trio

import engine

ITEM_SECONDS = 0.3


def say(line: str) -> None:
    print(line, flush=True)


async def announce_stop() -> None:
    shutdown = engine.current_shutdown()
    await shutdown.wait()
    say(f"stop requested: {shutdown.reason}")


async def work() -> int:
    shutdown = engine.current_shutdown()
    finished = 0
    while not shutdown.requested:
        item = finished + 1
        say(f"started item {item}")
        if item == 1:
            say("ready")
        await trio.sleep(ITEM_SECONDS)  # the in-flight work a stop must not cut short
        finished = item
        say(f"finished item {item}")
    return finished


async def main() -> int:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(announce_stop)
        finished = await work()
    say("stopped cleanly")
    return finished


if __name__ == "__main__":
    engine.run(main, grace_period=10)
