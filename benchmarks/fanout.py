"""Broadcast fan-out: the market service's broadcast path against a server on ``websockets``.

Both servers deliver the same pre-encoded message (a Binance-style trade,
JSON, about 150 bytes, as a text frame) to 10 WebSocket clients that run in
one separate process, and the figure is the aggregate rate at which the 10
clients receive it: ``clients * messages / elapsed``, where ``elapsed`` runs
from the moment the server starts publishing to the moment the last client
receives its last message (both read ``time.perf_counter``, the system's
monotonic clock, so the two processes' readings compare). Nothing may be
lost: each client must receive every message (the engine's queues are sized
for the whole run; the websockets server applies back-pressure).

Servers (in this process):
    fanout              engine.broadcast.serve_broadcast on trio: a
                        MemoryBus publisher publishes every message on
                        ``trades.BTCUSDT`` and yields to the scheduler every
                        ``--burst`` messages (default 1: after every message,
                        as ``await bus.publish`` does, the hard case for
                        coalescing; a feed that publishes what one socket
                        read brought yields less often); the server frames
                        each message once and writes everything queued for
                        a client with one ``send_all``.
    websockets          the asyncio ``websockets`` library (no compression):
                        ``websockets.broadcast`` per message, yielding every
                        ``--burst`` messages and then waiting, as ``send``
                        does, for any client whose write buffer is over the
                        library's write limit (the library's own fan-out:
                        one frame and one write per client and message).
    websockets_send     the same library, one task per client doing ``await
                        ws.send(message)`` (back-pressure by ``drain``).
The websockets figure is the better of its two variants.

Clients (one separate process, asyncio): ``--client frames`` (default)
reads the socket after the handshake and walks the frame headers to count
messages, checking each frame's opcode and length: it receives over a
million messages/s, so the servers, not the client, are measured.
``--client websockets`` uses the ``websockets`` library's client
(``async for message in ws``, no receive-queue limit), which decodes every
frame into a ``str`` and tops out near 200k messages/s here: with it the
broadcast server is limited by its clients.

Rounds alternate the server order; the table shows the median of the rounds.

Run: ``python benchmarks/fanout.py`` (``--help`` for sizes); it needs the
``websockets`` package (a benchmark-only dependency). The last line is JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import trio
from websockets.asyncio.connection import broadcast
from websockets.asyncio.server import ServerConnection, serve

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from _frames import complete_frames  # noqa: E402  # benchmarks/_frames.py, beside this file

from engine.broadcast import BroadcastConfig, serve_broadcast  # noqa: E402  # idem
from engine.bus import MemoryBus  # noqa: E402  # after the path set-up above

MESSAGE = json.dumps(
    {
        "e": "trade",
        "E": 1_700_000_000_000,
        "s": "BTCUSDT",
        "t": 3_141_592_653,
        "p": "64123.45000000",
        "q": "0.01230000",
        "T": 1_700_000_000_000,
        "m": True,
        "M": True,
    },
    separators=(",", ":"),
).encode()
TOPIC = "trades.BTCUSDT"
coalescing: list[float] = []  # frames per socket write, per fanout run


# -- the client process -------------------------------------------------------


async def _count_with_websockets(url: str, messages: int, ready: asyncio.Event) -> float:
    from websockets.asyncio.client import connect

    async with connect(
        url, compression=None, max_size=None, max_queue=None, ping_interval=None, proxy=None
    ) as ws:
        ready.set()
        received = 0
        async for _ in ws:
            received += 1
            if received == messages:
                return time.perf_counter()
    raise RuntimeError(f"connection ended after {received} of {messages} messages")


class _FrameCounter(asyncio.Protocol):
    """Counts complete unmasked text frames after an HTTP upgrade; checks each header."""

    def __init__(
        self, messages: int, size: int, done: asyncio.Future[float], upgraded: asyncio.Event
    ) -> None:
        self.messages = messages
        self.size = size
        self.done = done
        self.received = 0
        self.buffer = bytearray()
        self.upgraded = upgraded

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer
        buffer += data
        if not self.upgraded.is_set():
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            if not buffer.startswith(b"HTTP/1.1 101"):
                self.done.set_exception(RuntimeError(bytes(buffer[:end]).decode()))
                return
            del buffer[: end + 4]
            self.upgraded.set()
        frames, used = complete_frames(buffer)
        for head, _, length in frames:
            if head == 0x81 and length == self.size:
                self.received += 1
            elif head & 0x0F < 8:  # a data frame that is not ours: a broken stream
                self.done.set_exception(RuntimeError(f"unexpected frame {head:#x} ({length})"))
                return
        del buffer[:used]
        if self.received >= self.messages and not self.done.done():
            self.done.set_result(time.perf_counter())


async def _count_frames(url: str, messages: int, ready: asyncio.Event) -> float:
    host_port, _, path = url.removeprefix("ws://").partition("/")
    host, _, port = host_port.rpartition(":")
    loop = asyncio.get_running_loop()
    done: asyncio.Future[float] = loop.create_future()
    upgraded = asyncio.Event()
    transport, _ = await loop.create_connection(
        lambda: _FrameCounter(messages, len(MESSAGE), done, upgraded), host, int(port)
    )
    key = "dGhlIHNhbXBsZSBub25jZQ=="
    transport.write(
        f"GET /{path} HTTP/1.1\r\nHost: {host_port}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    await upgraded.wait()
    ready.set()
    try:
        return await done
    finally:
        transport.abort()


async def _clients(url: str, clients: int, messages: int, kind: str) -> None:
    count = _count_frames if kind == "frames" else _count_with_websockets
    ready = [asyncio.Event() for _ in range(clients)]
    tasks = [asyncio.create_task(count(url, messages, r)) for r in ready]
    for event in ready:
        await event.wait()
    print("ready", flush=True)
    ends = await asyncio.gather(*tasks)
    print(json.dumps({"end": max(ends)}), flush=True)


def client_process(url: str, clients: int, messages: int, kind: str) -> subprocess.Popen[str]:
    command = [sys.executable, __file__, "--serve-clients", url]
    command += ["--clients", str(clients), "--messages", str(messages), "--client", kind]
    return subprocess.Popen(command, stdout=subprocess.PIPE, text=True)


def _elapsed(result: dict[str, float], published_at: float) -> float:
    # perf_counter is CLOCK_MONOTONIC on Linux: comparable across processes.
    return result["end"] - published_at


# -- the servers ----------------------------------------------------------------


def run_fanout(clients: int, messages: int, burst: int, kind: str) -> float:
    async def main() -> float:
        bus = MemoryBus()
        config = BroadcastConfig(
            queue_size=messages + 1,
            bus_queue_size=messages + 1,
            max_lost=0,
            ping_interval=float("inf"),
        )
        async with trio.open_nursery() as nursery:
            server = await nursery.start(serve_broadcast, bus, config)
            process = client_process(f"{server.url}?topics=trades", clients, messages, kind)
            assert process.stdout is not None
            line = await trio.to_thread.run_sync(process.stdout.readline)
            assert line.strip() == "ready", line
            started = time.perf_counter()
            for i in range(messages):
                bus.publish_nowait(TOPIC, MESSAGE)
                if i % burst == burst - 1:
                    await trio.lowlevel.checkpoint()
            result = json.loads(await trio.to_thread.run_sync(process.stdout.readline))
            await trio.to_thread.run_sync(process.wait)
            stats = server.statistics()
            assert stats.dropped == 0, stats
            assert stats.sent == clients * messages, stats
            coalescing.append(stats.sent / stats.writes)
            nursery.cancel_scope.cancel()
        return clients * messages / _elapsed(result, started)

    return trio.run(main)


def run_websockets(
    clients: int, messages: int, burst: int, kind: str, *, per_client: bool
) -> float:
    text = MESSAGE.decode()

    async def main() -> float:
        connections: set[ServerConnection] = set()
        all_connected = asyncio.Event()

        async def handler(ws: ServerConnection) -> None:
            connections.add(ws)
            if len(connections) == clients:
                all_connected.set()
            try:
                await ws.wait_closed()
            finally:
                connections.discard(ws)

        async with serve(
            handler, "127.0.0.1", 0, compression=None, ping_interval=None, max_size=None
        ) as server:
            port = next(iter(server.sockets)).getsockname()[1]
            process = client_process(f"ws://127.0.0.1:{port}/ws", clients, messages, kind)
            assert process.stdout is not None
            line = await asyncio.to_thread(process.stdout.readline)
            assert line.strip() == "ready", line
            await all_connected.wait()  # the handlers may start after the clients' handshakes
            started = time.perf_counter()
            if per_client:
                await asyncio.gather(*(_send_all(ws, text, messages) for ws in connections))
            else:
                await _broadcast_all(connections, text, messages, burst)
            result = json.loads(await asyncio.to_thread(process.stdout.readline))
            await asyncio.to_thread(process.wait)
        return clients * messages / _elapsed(result, started)

    return asyncio.run(main())


async def _send_all(ws: ServerConnection, text: str, messages: int) -> None:
    send = ws.send
    for _ in range(messages):
        await send(text)


async def _broadcast_all(
    connections: set[ServerConnection], text: str, messages: int, burst: int
) -> None:
    for i in range(messages):
        broadcast(connections, text)
        if i % burst == burst - 1:
            await asyncio.sleep(0)
            # broadcast() never waits: wait as send() does, while a client's
            # write buffer is over the connection's write limit.
            for ws in connections:
                await ws.drain()


# -- the driver -----------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=50_000, help="per client per run")
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--runs", type=int, default=3, help="rounds; medians are reported")
    parser.add_argument("--burst", type=int, default=1, help="messages published per yield")
    parser.add_argument("--client", choices=("frames", "websockets"), default="frames")
    parser.add_argument("--serve-clients", metavar="URL", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_clients:
        asyncio.run(_clients(args.serve_clients, args.clients, args.messages, args.client))
        return

    n, c, b, k = args.messages, args.clients, args.burst, args.client
    variants: dict[str, Callable[[], float]] = {
        "fanout": partial(run_fanout, c, n, b, k),
        "websockets": partial(run_websockets, c, n, b, k, per_client=False),
        "websockets_send": partial(run_websockets, c, n, b, k, per_client=True),
    }
    results: dict[str, list[float]] = {name: [] for name in variants}
    order = list(variants)
    for _ in range(args.runs):
        for name in order:
            results[name].append(variants[name]())
        order.reverse()

    median = {name: statistics.median(values) for name, values in results.items()}
    print(f"{c} clients x {n:,} messages, {k} client, {os.cpu_count()} CPUs")
    print(f"{'server':<18} {'median msg/s':>14}   runs (msg/s, all clients together)")
    for name, values in results.items():
        runs = ", ".join(f"{v:,.0f}" for v in values)
        print(f"{name:<18} {median[name]:>14,.0f}   {runs}")
    print(f"fanout frames per socket write (median): {statistics.median(coalescing):.1f}")
    best_websockets = max(median["websockets"], median["websockets_send"])
    figures = {
        "client": k,
        "fanout10_msgs_s": round(median["fanout"]),
        "websockets_fanout10_msgs_s": round(best_websockets),
        "websockets_broadcast_msgs_s": round(median["websockets"]),
        "websockets_send_msgs_s": round(median["websockets_send"]),
        "fanout_vs_websockets": round(median["fanout"] / best_websockets, 3),
        "fanout_frames_per_write": round(statistics.median(coalescing), 1),
    }
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
