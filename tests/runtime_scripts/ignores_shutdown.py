"""A ``main`` that ignores the stop request, so only the runtime can stop it.

Usage: ``python ignores_shutdown.py GRACE_PERIOD``. It prints ``ready``, then
``stop requested: ...`` once it sees the request, and exits with
``ForcedShutdown.exit_status`` when the runtime cancels it.
"""

from __future__ import annotations

import sys

import trio

import engine


def say(line: str) -> None:
    print(line, flush=True)


async def announce_stop() -> None:
    shutdown = engine.current_shutdown()
    await shutdown.wait()
    say(f"stop requested: {shutdown.reason}")


async def main() -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(announce_stop)
        say("ready")
        await trio.sleep_forever()


if __name__ == "__main__":
    try:
        engine.run(main, grace_period=float(sys.argv[1]))
    except engine.ForcedShutdown as exc:
        say(f"forced: {exc}")
        sys.exit(exc.exit_status)
