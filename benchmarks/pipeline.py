"""The market pipeline end to end: ingest, fan-out and latency, each against a peer.

Three parts, each run several times in alternation with its peer in this one
process run (the machine is shared and noisy); the table shows medians.

Ingest (``ingest_msgs_s``): the exchange simulator runs in its own process
(``python -m services.market.simulator --rate inf``: as fast as the
connection takes messages; in production the exchange is elsewhere) and
serves the service's default subscription: 5 symbols x 5 stream kinds
(trade, aggTrade, bookTicker, depth, kline_1m), the combined stream. This
process runs the service's pieces as ``serve_market`` wires them: the
``Feed`` (socket client, decoder, the bounded queue with its default
``block`` policy, 4 processors normalising and publishing), a ``MemoryBus``
and ``serve_broadcast``, with one WebSocket client in a separate process
subscribed to every topic. After a warm-up, the figure is the number of
messages the broadcast server wrote to that client per second: each was
read, decoded, queued, normalised, published, routed, framed and written
by this process (the client must then have received every one). Also
shown: this process's CPU time per message, which says what one core
would carry when the machine is busy with other work, and the CPU shares
of this process and the simulator's. ``dropped`` adds up every loss on
the way, in the ingest and latency runs: the feed queue's, the bus
subscription's and the broadcast client queue's. The client's queue is
``--client-queue`` frames (default 4,096, below the broadcast's own default
of 32,768, so that a client that falls behind shows as losses here): a
queue under the 1,024 messages the broadcast dispatches at once loses some
even for a client that keeps up (``--client-queue 1000`` shows it).
Peer: the same pipeline with trio-websocket's client (0.12,
``open_websocket_url`` with its defaults, ``get_message`` per message) as
the feed's socket reader, everything else identical
(``ingest_trio_websocket_msgs_s``).

Fan-out (``fanout10_msgs_s``): ``benchmarks/fanout.py``'s measurement, run
from here: the same pre-encoded trade message (about 150 bytes) to 10
WebSocket clients in one separate process, the service's broadcast path
(``MemoryBus`` + ``serve_broadcast``, the publisher yielding after every
message) against a server on the asyncio ``websockets`` library (the better
of its ``broadcast()`` and a ``send`` loop per client). The clients walk
the frame headers and count frames (over a million messages/s here), so
the servers, not the clients, are measured; ``fanout.py --client
websockets`` measures with the ``websockets`` library's client instead.

Latency (``p50_ms``, ``p99_ms``): the ingest set-up with the simulator at
5,000 messages/s. For every trade, aggTrade and depth message the client
records its receive time (``time.time()`` when the bytes arrive) and the
message's own time, which is the simulator's event time (``E``; ``T`` for
trades): the wall clock in whole milliseconds, read when the simulator
builds a burst, before it encodes and writes it. Both processes read the
same system clock. The stamp is *floored* to the millisecond, so
``receive - stamp`` exceeds the true send-to-receive time by between 0 and
1 ms: ``p50_ms`` and ``p99_ms`` are upper bounds (a p99 of 2 ms or less
here is a true one), and millisecond stamps cannot say more; Binance's
format has no finer one. So a second clock: the feed notes
``time.time()`` when it has each socket read's messages, and
``service_p50_ms`` / ``service_p99_ms`` are from there to the client's
receive, at microsecond resolution: everything this process and the
client's loopback hop add, without the simulator's own write and the
first hop. Peer: the trio-websocket reader, as above.

Clients: one asyncio process per run that reads its socket and walks the
WebSocket frame headers (the handshake is a fixed request; no library), so
that on 2 cores the client takes little of the CPU the service needs.

Run: ``python benchmarks/pipeline.py`` (``--help`` for sizes; about two
minutes). Needs the ``websockets`` package (``pip install -e '.[bench]'``).
The last line is JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path
from typing import Any

import psutil
import trio
import trio_websocket

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import fanout  # noqa: E402  # benchmarks/fanout.py, beside this file

import engine  # noqa: E402  # after the path set-up above
from engine.broadcast import BroadcastConfig, serve_broadcast  # noqa: E402  # idem
from engine.bus import MemoryBus  # noqa: E402  # idem
from services.market._events import MalformedMessage, decode, normalise  # noqa: E402  # idem
from services.market._service import DEFAULT_SYMBOLS  # noqa: E402  # idem
from services.market.feed import Feed, FeedConfig  # noqa: E402  # idem

TOPICS = "trades,aggtrades,book,depth,klines"
# Message kinds whose "time" is the simulator's send stamp (a kline's is its
# candle's close time, a book ticker has none).
STAMPED = (b'"type":"trade"', b'"type":"aggTrade"', b'"type":"depth"')


# -- the client process -------------------------------------------------------


class _Reader(asyncio.Protocol):
    """Walks WebSocket frames after the upgrade: counts them, keeps stamped ones with times."""

    def __init__(self, upgraded: asyncio.Future[None], keep: bool) -> None:
        self.upgraded = upgraded
        self.keep = keep
        self.buffer = bytearray()
        self.received = 0
        self.kept: list[tuple[float, bytes]] = []

    def data_received(self, data: bytes) -> None:
        now = time.time()
        buffer = self.buffer
        buffer += data
        if not self.upgraded.done():
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            if not buffer.startswith(b"HTTP/1.1 101"):
                self.upgraded.set_exception(RuntimeError(bytes(buffer[:end]).decode()))
                return
            del buffer[: end + 4]
            self.upgraded.set_result(None)
        frames, used = fanout.complete_frames(buffer)
        for head, start, length in frames:
            if head == 0x81:  # a complete text frame: every message is one
                self.received += 1
                if self.keep:
                    self.kept.append((now, bytes(buffer[start : start + length])))
        del buffer[:used]


def _stamped(kept: list[tuple[float, bytes]], since: float) -> list[list[Any]]:
    """``[receive time, type, symbol, id, stamp]`` of each stamped message since ``since``."""
    out = []
    for received_at, payload in kept:
        if received_at >= since and any(kind in payload for kind in STAMPED):
            body = json.loads(payload)
            out.append([received_at, body["type"], body["symbol"], body["id"], body["time"]])
    return out


async def _client(url: str, keep: bool) -> None:
    host_port, _, path = url.removeprefix("ws://").partition("/")
    host, _, port = host_port.rpartition(":")
    loop = asyncio.get_running_loop()
    upgraded: asyncio.Future[None] = loop.create_future()
    transport, reader = await loop.create_connection(
        lambda: _Reader(upgraded, keep), host, int(port)
    )
    transport.write(
        f"GET /{path} HTTP/1.1\r\nHost: {host_port}\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    await upgraded
    print("ready", flush=True)
    # "measure <wall time>" starts the latency window; "report" ends the run.
    since = math.inf
    while True:
        line = await asyncio.to_thread(sys.stdin.readline)
        if line.startswith("measure"):
            since = float(line.split()[1])
        elif line.startswith("report") or not line:
            break
    await asyncio.sleep(0.2)  # the last writes in flight
    result: dict[str, Any] = {"received": reader.received}
    if keep:
        result["stamped"] = _stamped(reader.kept, since)
    transport.abort()
    print(json.dumps(result), flush=True)


class ClientProcess:
    """One client process: ``--serve-client URL``; ready when it has upgraded."""

    def __init__(self, url: str, *, keep: bool) -> None:
        command = [sys.executable, __file__, "--serve-client", url]
        if keep:
            command.append("--keep")
        self.process = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )

    async def ready(self) -> None:
        assert self.process.stdout is not None
        line = await trio.to_thread.run_sync(self.process.stdout.readline)
        if line.strip() != "ready":
            raise RuntimeError(f"client failed to start: {line!r}")

    def tell(self, line: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(line + "\n")
        self.process.stdin.flush()

    async def report(self) -> dict[str, Any]:
        assert self.process.stdout is not None
        self.tell("report")
        line = await trio.to_thread.run_sync(self.process.stdout.readline)
        await trio.to_thread.run_sync(self.process.wait)
        self.process.stdin.close()  # type: ignore[union-attr]  # opened with stdin=PIPE
        self.process.stdout.close()
        return json.loads(line)  # type: ignore[no-any-return]  # a JSON object


# -- the simulator process ------------------------------------------------------


class SimulatorProcess:
    """``python -m services.market.simulator --port 0 --rate RATE`` for the length of a block."""

    def __init__(self, rate: str) -> None:
        self.rate = rate
        self.process: subprocess.Popen[str] | None = None
        self.url = ""

    def __enter__(self) -> SimulatorProcess:
        command = [sys.executable, "-m", "services.market.simulator", "--port", "0"]
        self.process = subprocess.Popen(
            [*command, "--rate", self.rate], stdout=subprocess.PIPE, text=True, cwd=ROOT
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line.startswith("streams: "):
            raise RuntimeError(f"simulator failed to start: {line!r}")
        self.url = line.split()[1]
        self.process.stdout.readline()  # "rest: ..."
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def __exit__(self, *exc: object) -> None:
        assert self.process is not None
        assert self.process.stdout is not None
        self.process.terminate()
        self.process.wait(timeout=10)
        self.process.stdout.close()


# -- the service side -----------------------------------------------------------


class TrioWebsocketFeed(Feed):
    """The peer: the same feed with trio-websocket's client reading the socket."""

    async def connect(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        async with trio_websocket.open_websocket_url(self.config.stream_url()) as ws:
            task_status.started()
            while True:
                frame = await ws.get_message()
                engine.heartbeat()
                await self._ingest([frame])


READERS: dict[str, type[Feed]] = {"engine": Feed, "trio_websocket": TrioWebsocketFeed}


Reads = list[tuple[float, list[str | bytes]]]


def probed(reader: type[Feed], reads: Reads) -> type[Feed]:
    """``reader`` noting in ``reads`` when it had each read's frames (the second clock)."""

    class Probed(reader):  # type: ignore[valid-type,misc]  # a class chosen at run time
        async def _ingest(self, frames: list[str | bytes]) -> None:
            reads.append((time.time(), frames))
            await super()._ingest(frames)

    return Probed


def _read_times(reads: Reads) -> dict[tuple[str, str, int], float]:
    """When the feed had each stamped message, by the key the client reports."""
    times = {}
    for read_at, frames in reads:
        for frame in frames:
            with contextlib.suppress(MalformedMessage):
                body = json.loads(normalise(decode(frame)[1])[1])
                if body.get("id") is not None:
                    times[body["type"], body["symbol"], body["id"]] = read_at
    return times


def _latencies(stamped: list[list[Any]], read_times: dict[Any, float]) -> dict[str, list[float]]:
    """Simulator stamp -> client (upper bound), and feed read -> client (high resolution)."""
    total, service = [], []
    for received_at, kind, symbol, ident, stamp in stamped:
        total.append(received_at * 1000.0 - stamp)
        read_at = read_times.get((kind, symbol, ident))
        if read_at is not None:
            service.append((received_at - read_at) * 1000.0)
    return {"total": total, "service": service}


def _dropped(feed: Feed, bus: MemoryBus, broadcast: Any) -> dict[str, int]:
    """Every loss on the way: the feed queue's, the bus subscription's, the client queue's."""
    return {
        "feed_queue": feed.queue.statistics().dropped,
        "bus": sum(s.dropped for s in bus.statistics().subscriptions),
        "broadcast": broadcast.statistics().dropped,
    }


def _cpu(process: psutil.Process) -> float:
    times = process.cpu_times()
    return float(times.user + times.system)


def run_pipeline(
    reader: str,
    simulator: SimulatorProcess,
    seconds: float,
    warmup: float,
    *,
    latency: bool,
    client_queue: int = 4096,
) -> dict[str, Any]:
    """One run of the service's pieces against the simulator; its figures."""

    async def main() -> dict[str, Any]:
        bus = MemoryBus()
        reads: Reads = []
        kind = probed(READERS[reader], reads) if latency else READERS[reader]
        feed = kind(FeedConfig(simulator.url, DEFAULT_SYMBOLS), bus)
        config = BroadcastConfig(ping_interval=math.inf, queue_size=client_queue)
        async with trio.open_nursery() as nursery:
            broadcast = await nursery.start(serve_broadcast, bus, config)
            client = ClientProcess(f"{broadcast.url}?topics={TOPICS}", keep=latency)
            await client.ready()
            processes = {
                "service": psutil.Process(),
                "simulator": psutil.Process(simulator.pid),
                "client": psutil.Process(client.process.pid),
            }
            with trio.CancelScope() as feed_scope:
                async with trio.open_nursery() as pipeline:
                    await pipeline.start(feed.process)
                    await pipeline.start(feed.connect)
                    await trio.sleep(warmup)
                    client.tell(f"measure {time.time()}")
                    sent, started = broadcast.statistics().sent, time.perf_counter()
                    received = feed.statistics().received
                    cpu = {name: _cpu(p) for name, p in processes.items()}
                    await trio.sleep(seconds)
                    elapsed = time.perf_counter() - started
                    cpu = {name: (_cpu(p) - cpu[name]) / elapsed for name, p in processes.items()}
                    sent = broadcast.statistics().sent - sent
                    received = feed.statistics().received - received
                    feed_scope.cancel()
            # Let the broadcast hand the client what is still queued for it.
            while any(c.queued for c in broadcast.statistics().connections):  # noqa: ASYNC110  # a counter, no event to wait on
                await trio.sleep(0.01)
            result = await client.report()
            stats = broadcast.statistics()
            if result["received"] != stats.sent:
                raise RuntimeError(f"client got {result['received']} of {stats.sent}")
            figures = {
                "msgs_s": sent / elapsed,
                "feed_msgs_s": received / elapsed,
                "dropped": _dropped(feed, bus, broadcast),
                "disconnected": stats.disconnected,
                "frames_per_write": stats.sent / max(stats.writes, 1),
                "cpu": cpu,
            }
            if latency:
                figures["latencies_ms"] = _latencies(result["stamped"], _read_times(reads))
            nursery.cancel_scope.cancel()
        return figures

    return trio.run(main)


# -- the driver -----------------------------------------------------------------


def _median(values: list[float]) -> float:
    return statistics.median(values)


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _alternate(variants: Mapping[str, Callable[[], Any]], runs: int) -> dict[str, list[Any]]:
    results: dict[str, list[Any]] = {name: [] for name in variants}
    order = list(variants)
    for _ in range(runs):
        for name in order:
            results[name].append(variants[name]())
        order.reverse()
    return results


def _pipelines(args: argparse.Namespace, rate: str, *, latency: bool) -> dict[str, Any]:
    with SimulatorProcess(rate) as simulator:
        variants = {
            name: partial(
                run_pipeline,
                name,
                simulator,
                args.seconds,
                args.warmup,
                latency=latency,
                client_queue=args.client_queue,
            )
            for name in READERS
        }
        return _alternate(variants, args.runs)


def ingest(args: argparse.Namespace) -> dict[str, list[dict[str, Any]]]:
    return _pipelines(args, "inf", latency=False)


def latency(args: argparse.Namespace) -> dict[str, list[dict[str, Any]]]:
    return _pipelines(args, str(args.rate), latency=True)


def fan_out(args: argparse.Namespace) -> dict[str, list[float]]:
    n, c = args.fanout_messages, 10
    variants: dict[str, Callable[[], float]] = {
        "fanout": partial(fanout.run_fanout, c, n, 1, "frames"),
        "websockets": partial(fanout.run_websockets, c, n, 1, "frames", per_client=False),
        "websockets_send": partial(fanout.run_websockets, c, n, 1, "frames", per_client=True),
    }
    return _alternate(variants, args.runs)


def _lost(run: dict[str, Any]) -> int:
    return sum(run["dropped"].values())


def report_ingest(ingested: dict[str, list[dict[str, Any]]]) -> dict[str, float]:
    print("\ningest: simulator (own process, rate inf) -> feed -> bus -> broadcast -> 1 client")
    print("  per run: msg/s, service CPU per message (µs), CPU share of service / simulator")
    medians = {}
    for name, runs in ingested.items():
        medians[name] = _median([r["msgs_s"] for r in runs])
        cells = [
            f"{r['msgs_s']:,.0f} ({r['cpu']['service'] / r['msgs_s'] * 1e6:.1f} µs, "
            f"{r['cpu']['service']:.2f}/{r['cpu']['simulator']:.2f})"
            for r in runs
        ]
        lost = sum(_lost(r) for r in runs)
        print(f"{name:<16} {medians[name]:>9,.0f} msg/s  dropped {lost}   " + ", ".join(cells))
    return medians


def report_latency(
    timed: dict[str, list[dict[str, Any]]], rate: float
) -> dict[str, dict[str, float]]:
    print(f"\nlatency at {rate:,.0f} msg/s, ms: p50 / p99 per run")
    print("  total: simulator stamp (floored to the ms: an upper bound) -> client receive")
    print("  service: the feed's socket read -> client receive (µs resolution)")
    figures: dict[str, dict[str, float]] = {}
    for name, runs in timed.items():
        figures[name] = {}
        for part in ("total", "service"):
            p50s = [_quantile(r["latencies_ms"][part], 0.50) for r in runs]
            p99s = [_quantile(r["latencies_ms"][part], 0.99) for r in runs]
            figures[name][f"{part}_p50"] = _median(p50s)
            figures[name][f"{part}_p99"] = _median(p99s)
            samples = sum(len(r["latencies_ms"][part]) for r in runs)
            cells = ", ".join(f"{a:.2f} / {b:.2f}" for a, b in zip(p50s, p99s, strict=True))
            print(
                f"{name:<16} {part:<8} {_median(p50s):>6.2f} / {_median(p99s):<6.2f}"
                f" ({samples} samples)   {cells}"
            )
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="rounds of each part (medians)")
    parser.add_argument("--seconds", type=float, default=3.0, help="measured seconds per run")
    parser.add_argument("--warmup", type=float, default=0.5, help="seconds before measuring")
    parser.add_argument("--rate", type=float, default=5000.0, help="latency part's msg/s")
    parser.add_argument(
        "--fanout-messages", type=int, default=30_000, help="fan-out: messages per client per run"
    )
    parser.add_argument(
        "--client-queue",
        type=int,
        default=4096,
        help="the broadcast client's queue_size in ingest and latency (default 4096; see above)",
    )
    parser.add_argument("--serve-client", metavar="URL", help=argparse.SUPPRESS)
    parser.add_argument("--keep", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_client:
        asyncio.run(_client(args.serve_client, args.keep))
        return

    print(f"{os.cpu_count()} CPUs; {args.runs} runs of each part, alternating with the peer")
    ingested = ingest(args)
    spread = fan_out(args)
    timed = latency(args)

    ingest_rate = report_ingest(ingested)
    fan = {name: _median(values) for name, values in spread.items()}
    print(f"\nfan-out: 10 clients x {args.fanout_messages:,} messages (frame-counting clients)")
    for name, values in spread.items():
        cells = ", ".join(f"{v:,.0f}" for v in values)
        print(f"{name:<16} {fan[name]:>9,.0f} msg/s   {cells}")
    best_websockets = max(fan["websockets"], fan["websockets_send"])
    lat = report_latency(timed, args.rate)

    engine_runs = ingested["engine"] + timed["engine"]
    figures = {
        "ingest_msgs_s": round(ingest_rate["engine"]),
        "fanout10_msgs_s": round(fan["fanout"]),
        "websockets_fanout10_msgs_s": round(best_websockets),
        "fanout_vs_websockets": round(fan["fanout"] / best_websockets, 3),
        "p50_ms": round(lat["engine"]["total_p50"], 2),
        "p99_ms": round(lat["engine"]["total_p99"], 2),
        "dropped": sum(_lost(r) for r in engine_runs),
        "ingest_trio_websocket_msgs_s": round(ingest_rate["trio_websocket"]),
        "ingest_vs_trio_websocket": round(ingest_rate["engine"] / ingest_rate["trio_websocket"], 3),
        "ingest_service_cpu_us_per_msg": round(
            _median([r["cpu"]["service"] / r["msgs_s"] * 1e6 for r in ingested["engine"]]), 1
        ),
        "service_p50_ms": round(lat["engine"]["service_p50"], 3),
        "service_p99_ms": round(lat["engine"]["service_p99"], 3),
        "trio_websocket_p99_ms": round(lat["trio_websocket"]["total_p99"], 2),
        "client": "frames",
        "client_queue": args.client_queue,
    }
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
