"""Channel throughput and latency: the engine against trio's memory channel and asyncio.Queue.

Every variant moves the same small messages (ints) from one producer task to
one consumer task through a buffer of 1,000, in the same process, alternating
variants round by round so the noise of a shared machine falls on all of
them alike; the table shows the median of the rounds.

Variants:
    trio             trio.open_memory_channel(1000); ``await send`` / ``async for``
    asyncio_queue    asyncio.Queue(1000) on its own event loop; ``await put`` / ``await get``
    engine_block     engine.open_channel(1000); same code as trio
    engine_drop_oldest  the same with overflow="drop_oldest" (drops reported)
    engine_batch     engine channel, consumer uses ``receive_batch(1000)``; the
                     producer uses ``send_nowait`` and awaits ``send`` only when
                     full: what asyncio's ``put`` does when the queue has room
Also: send-to-receive latency with the producer paced at 50k msg/s (engine
block channel; trio's channel as a reference), and hub fan-out to 10
subscribers (published messages per second, each delivered to all ten),
once with ``await publish`` per message (every publish wakes ten tasks for
one message each) and once publishing with ``publish_nowait``, awaiting only
when a subscription is full (subscribers then take batches).

Run: ``python benchmarks/channels.py`` (``--help`` for sizes). The last line
is JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from collections.abc import Callable

import trio

import engine

BUFFER = 1000


def trio_channel(n: int) -> float:
    async def main() -> float:
        send, receive = trio.open_memory_channel[int](BUFFER)
        return await _pump(send, receive, n)

    return trio.run(main)


def engine_channel(n: int, overflow: str = "block") -> float:
    async def main() -> float:
        send, receive = engine.open_channel[int](BUFFER, overflow=overflow)
        return await _pump(send, receive, n)

    return trio.run(main)


async def _pump(
    send: trio.abc.SendChannel[int], receive: trio.abc.ReceiveChannel[int], n: int
) -> float:
    async def producer() -> None:
        async with send:
            for i in range(n):
                await send.send(i)

    async def consumer() -> None:
        async for _ in receive:
            pass

    started = time.perf_counter()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(producer)
        nursery.start_soon(consumer)
    return n / (time.perf_counter() - started)


def engine_batch(n: int) -> float:
    async def main() -> float:
        send, receive = engine.open_channel[int](BUFFER)

        async def producer() -> None:
            async with send:
                for i in range(n):
                    try:
                        send.send_nowait(i)
                    except trio.WouldBlock:
                        await send.send(i)

        async def consumer() -> None:
            received = 0
            try:
                while True:
                    received += len(await receive.receive_batch(BUFFER))
            except trio.EndOfChannel:
                assert received == n, received

        started = time.perf_counter()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(producer)
            nursery.start_soon(consumer)
        return n / (time.perf_counter() - started)

    return trio.run(main)


def asyncio_queue(n: int) -> float:
    async def main() -> float:
        queue: asyncio.Queue[int | None] = asyncio.Queue(BUFFER)

        async def producer() -> None:
            for i in range(n):
                await queue.put(i)
            await queue.put(None)

        async def consumer() -> None:
            while await queue.get() is not None:
                pass

        started = time.perf_counter()
        await asyncio.gather(producer(), consumer())
        return n / (time.perf_counter() - started)

    return asyncio.run(main())


def paced_latency_us(n: int, rate: float, make: Callable[[], tuple[object, object]]) -> list[float]:
    """Send-to-receive latencies, in µs, with the producer paced at ``rate``."""

    async def main() -> list[float]:
        send, receive = make()
        assert isinstance(send, trio.abc.SendChannel)
        assert isinstance(receive, trio.abc.ReceiveChannel)
        latencies: list[float] = []
        clock = time.perf_counter

        async def producer() -> None:
            async with send:
                start = clock()
                for i in range(n):
                    due = start + i / rate
                    while (ahead := due - clock()) > 0:
                        # Sleep when far ahead; spin through the scheduler when close.
                        if ahead > 0.002:
                            await trio.sleep(ahead - 0.001)
                        else:
                            await trio.lowlevel.checkpoint()
                    await send.send(clock())

        async def consumer() -> None:
            async for sent_at in receive:
                latencies.append((clock() - sent_at) * 1e6)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(producer)
            nursery.start_soon(consumer)
        return latencies

    return trio.run(main)


def hub_fanout(n: int, subscribers: int = 10, *, nowait: bool = False) -> float:
    async def main() -> float:
        hub = engine.Hub[int]()
        ready = trio.Semaphore(0)

        async def subscriber() -> None:
            received = 0
            async with hub.subscribe("ticks", maxsize=BUFFER, overflow="block") as sub:
                ready.release()
                try:
                    while True:
                        received += len(await sub.receive_batch(BUFFER))
                except trio.EndOfChannel:
                    assert received == n, received

        async with trio.open_nursery() as nursery:
            for _ in range(subscribers):
                nursery.start_soon(subscriber)
            for _ in range(subscribers):
                await ready.acquire()
            started = time.perf_counter()
            for i in range(n):
                if nowait:
                    try:
                        hub.publish_nowait("ticks", i)
                        continue
                    except trio.WouldBlock:
                        pass
                await hub.publish("ticks", i)
            hub.close()
        return n / (time.perf_counter() - started)

    return trio.run(main)


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=1_000_000, help="per throughput run")
    parser.add_argument("--runs", type=int, default=3, help="rounds; medians are reported")
    parser.add_argument("--latency-messages", type=int, default=100_000)
    parser.add_argument("--rate", type=float, default=50_000.0, help="paced rate, msg/s")
    args = parser.parse_args()
    n = args.messages

    variants: dict[str, Callable[[], float]] = {
        "trio": lambda: trio_channel(n),
        "asyncio_queue": lambda: asyncio_queue(n),
        "engine_block": lambda: engine_channel(n),
        "engine_drop_oldest": lambda: engine_channel(n, "drop_oldest"),
        "engine_batch": lambda: engine_batch(n),
        "hub_fanout10": lambda: hub_fanout(n // 10),
        "hub_fanout10_nowait": lambda: hub_fanout(n, nowait=True),
    }
    results: dict[str, list[float]] = {name: [] for name in variants}
    engine_latency: list[float] = []
    trio_latency: list[float] = []
    for _ in range(args.runs):
        for name, run in variants.items():
            results[name].append(run())
        engine_latency += paced_latency_us(
            args.latency_messages, args.rate, lambda: engine.open_channel[float](BUFFER)
        )
        trio_latency += paced_latency_us(
            args.latency_messages, args.rate, lambda: trio.open_memory_channel[float](BUFFER)
        )

    median = {name: statistics.median(values) for name, values in results.items()}
    print(f"{'variant':<20} {'median msg/s':>14}   runs (msg/s)")
    for name, values in results.items():
        runs = ", ".join(f"{v:,.0f}" for v in values)
        print(f"{name:<20} {median[name]:>14,.0f}   {runs}")
    print(
        f"latency at {args.rate:,.0f} msg/s: engine p50 {percentile(engine_latency, 0.5):.1f} µs "
        f"p99 {percentile(engine_latency, 0.99):.1f} µs; trio p50 "
        f"{percentile(trio_latency, 0.5):.1f} µs p99 {percentile(trio_latency, 0.99):.1f} µs"
    )
    figures = {
        "trio_msgs_s": round(median["trio"]),
        "asyncio_queue_msgs_s": round(median["asyncio_queue"]),
        "engine_block_msgs_s": round(median["engine_block"]),
        "engine_drop_oldest_msgs_s": round(median["engine_drop_oldest"]),
        "engine_batch_msgs_s": round(median["engine_batch"]),
        "engine_vs_trio": round(median["engine_block"] / median["trio"], 3),
        "engine_batch_vs_asyncio": round(median["engine_batch"] / median["asyncio_queue"], 3),
        "p99_us": round(percentile(engine_latency, 0.99), 1),
        "trio_p99_us": round(percentile(trio_latency, 0.99), 1),
        "hub_fanout10_msgs_s": round(median["hub_fanout10"]),
        "hub_fanout10_nowait_msgs_s": round(median["hub_fanout10_nowait"]),
    }
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
