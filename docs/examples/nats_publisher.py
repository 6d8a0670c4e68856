"""Seed 003's client done right: every message to NATS JetStream, stored once, through reconnects.

Run it: ``NATS_URL=nats://localhost:4222 python docs/examples/nats_publisher.py``
(or give the URL as the first argument; ``--messages N``, ``--rate R``).

A source, standing in for the exchange's WebSocket, puts trades on a bounded
queue that makes it wait when the publishers fall behind: nothing is dropped
without a count, because nothing is dropped. Five publishers, in one
nursery, empty the queue into the stream ``TRADES``, each message with a
``msg_id`` made from its trade (``<run>-BTCUSDT-17``). A publish returns once the
stream stored the message; while the server is away it waits, and the bus
sends it again when the server is back, with the same id, so the stream
keeps one copy. At the end the stream is read back; the summary (all but
its last line, the bus's counters) is the same on every run, server
restarts or not.
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
import os
import uuid
from collections.abc import Iterator

import trio

import engine
from engine.bus import NatsBus, open_nats_bus

SYMBOLS = ("BTCUSDT", "ETHUSDT", "SOLUSDT", "BNBUSDT", "XRPUSDT")
Trade = tuple[str, str, bytes]  # topic, msg_id, payload


def trades(run: str, count: int) -> Iterator[Trade]:
    """``count`` trades, round robin over the symbols, each with its own id."""
    for index in range(count):
        symbol, trade_id = SYMBOLS[index % len(SYMBOLS)], index // len(SYMBOLS)
        data = {"e": "trade", "s": symbol, "t": trade_id, "p": f"{100 + trade_id % 7:.2f}"}
        yield f"trades.{symbol}", f"{run}-{symbol}-{trade_id}", json.dumps(data).encode()


async def source(send: engine.SendChannel[Trade], run: str, count: int, rate: float) -> None:
    """Queue ``count`` trades at about ``rate`` per second, then close the queue."""
    async with send:
        for trade in trades(run, count):
            await send.send(trade)  # waits while the queue is full
            await trio.sleep(1 / rate)


async def read_back(bus: NatsBus, run: str, count: int) -> collections.Counter[str]:
    """How many times the stream holds each of this run's msg_ids.

    A consumer of this run's own reads the stream from its start, until all
    came and then 0.5 s more (earlier runs' messages are skipped).
    """
    seen: collections.Counter[str] = collections.Counter()
    async with bus.subscribe("trades.>", maxsize=1000, queue=f"readback-{run}") as sub:
        while True:
            with trio.move_on_after(0.5 if len(seen) >= count else 5) as idle:
                for message in await sub.receive_batch(1000):
                    if message.msg_id is not None and message.msg_id.startswith(run):
                        seen[message.msg_id] += 1
                    await message.ack()
            if idle.cancelled_caught:
                return seen


async def main(url: str, count: int, rate: float) -> None:
    stored = 0

    async def publish(trade: Trade) -> None:
        nonlocal stored
        topic, msg_id, data = trade
        await bus.publish(topic, data, msg_id=msg_id)  # returns once the stream stored it
        stored += 1
        if stored == count // 2:
            print(f"halfway: {stored} stored", flush=True)

    run = uuid.uuid4().hex[:8]  # ids unique to this run: the stream outlives it
    send, receive = engine.open_channel[Trade](1000, overflow="block")
    async with open_nats_bus(
        url, stream="TRADES", subjects=["trades.>"], reconnect_wait=0.25
    ) as bus:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(source, send, run, count, rate)
            publishers = functools.partial(engine.consume, workers=5, on_error="raise")
            nursery.start_soon(publishers, receive, publish)
        print(f"published {stored} of {count} trades to stream TRADES, each with its own msg_id")
        with trio.fail_after(30):
            seen = await read_back(bus, run, count)
        twice = sum(1 for n in seen.values() if n > 1)
        missing = sum(1 for _, msg_id, _ in trades(run, count) if msg_id not in seen)
        print(f"read back {len(seen)} distinct msg_ids: {twice} stored twice, {missing} missing")
        statistics = bus.statistics()
        print(f"(reconnects: {statistics.reconnects}, sent again: {statistics.publish_retries})")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "url", nargs="?", default=os.environ.get("NATS_URL", "nats://127.0.0.1:4222")
    )
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--rate", type=float, default=1000.0, help="trades per second")
    args = parser.parse_args()
    engine.run(main, args.url, args.messages, args.rate)
