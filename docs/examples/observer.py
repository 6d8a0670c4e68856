"""A supervised service to watch in the browser (docs/observer.md).

Run it and open the URL it prints: a feed that beats, a parser that fails
every few seconds and is restarted, a channel between them, and a task that
blocks the event loop for two seconds now and then, so the page shows the
restarts as they happen and its "event loop blocked" banner. With a token the
page's stop buttons work.

    python docs/examples/observer.py [--port 8000] [--token SECRET] [--seconds N]
"""

from __future__ import annotations

import argparse
import functools
import threading

import trio

import engine


async def feed(send: engine.SendChannel[int]) -> None:
    for n in range(10**12):
        engine.heartbeat()
        send.send_nowait(n)
        await trio.sleep(0.01)


async def parser(receive: engine.ReceiveChannel[int]) -> None:
    async for n in receive:
        engine.heartbeat()
        if n % 500 == 499:
            raise ValueError(f"cannot parse message {n}")


async def blocker(every: float) -> None:
    while True:
        await trio.sleep(every)
        threading.Event().wait(2)  # wrong on purpose: blocks the whole event loop


async def main(port: int, token: str | None, seconds: float | None) -> None:
    send, receive = engine.open_channel[int](200, overflow="drop_oldest")
    async with trio.open_nursery() as nursery, engine.open_supervisor(name="service") as sup:
        sup.start_soon(feed, send, name="feed", stall_after=5)
        sup.start_soon(parser, receive, name="parser", backoff=engine.Backoff(initial=0.1))
        sup.start_soon(blocker, 15.0, name="blocker")
        serve = functools.partial(
            engine.serve_ops, sup, port=port, sources={"queue": send}, ui_token=token
        )
        ops: engine.OpsServer = await nursery.start(serve)
        print(f"observer at {ops.url}/ui", flush=True)
        if seconds is not None:
            await trio.sleep(seconds)
            engine.current_shutdown().request("--seconds ran out")
            sup.cancel()


if __name__ == "__main__":
    arguments = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    arguments.add_argument("--port", type=int, default=8000)
    arguments.add_argument("--token", default=None, help="allow the page's actions")
    arguments.add_argument("--seconds", type=float, default=None, help="stop after this long")
    options = arguments.parse_args()
    engine.run(main, options.port, options.token, options.seconds)
