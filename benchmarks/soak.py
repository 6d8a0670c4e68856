"""Soak: the market service at a steady rate for a long time, and whether anything grows.

The service runs as it is deployed, in its own process: ``python -m
services.market --rate RATE --port 0 --ws-port 0`` (the embedded exchange
simulator feeds it at ``RATE`` messages/s). This process connects two
WebSocket clients to its broadcast:

- a *reader*, subscribed to every topic (``--topics``), that reads
  everything, answers pings and counts messages (it walks the frame headers
  and decodes nothing, so it costs little of the 2 cores the service needs);
  if the server closes it, the close code is counted and it reconnects;
- a *stalled* client, subscribed to the same, that completes the handshake
  and never reads again: the server must bound what it queues for it.

Every ``--interval`` seconds, and at the end of ``--warmup`` and of
``--duration``, it samples the service process: its resident memory (RSS),
its threads and open file descriptors (``psutil``), the trio task count if
``/status`` reports one (a ``tasks`` member; skipped otherwise), the status
of ``/health``, and the feed's counters from ``/status``. The scan workers
are other processes; their RSS is shown apart and not in the figures.

The last line is JSON:

- ``rss_growth``: ``(rss_end - rss_base) / rss_base``, where ``rss_base``
  is the first sample at or after the warm-up and ``rss_end`` the last;
- ``rss_slope_mb_per_min``: the least-squares slope of RSS over the samples
  after the warm-up (still rising at the end, or levelled off);
- ``fds_growth``, ``threads_growth``: the same end minus base, as counts;
- ``lost``: events the feed received that were neither published nor
  counted as dropped, from ``/status``: ``feed.received - feed.malformed -
  feed.published - feed_queue.dropped - feed_queue.depth``. A frame the
  feed received is either malformed (counted, never queued) or queued; a
  queued event is dropped by the queue's policy, still queued, counted
  malformed by a processor, or published. Read while the load runs, the
  difference also holds the few events a processor or the socket reader
  has in hand at that instant, so ``lost`` is the smallest of up to 20
  reads 0.1 s apart, stopping at 0: an event in hand is published by a
  later read, a lost one stays lost;
- ``health_failures``: samples whose ``/health`` was not 200;
- ``reader_msgs_s``, ``reader_closes``: what the reading client got, and
  why the server closed it if it did;
- ``samples``: a summary of the samples (base, end, max) and the RSS
  series in MB.

Each sample's line also shows the highest depth each queue on the way has
had (the feed's queue, each bus subscription, each broadcast client): a
backlog raises the high-water mark of the process's memory, which the
allocator rarely gives back, so a step in RSS that comes with a new peak
is a backlog, not a leak.

``--probe`` hunts where the memory goes. The service then runs through this
script's ``--serve-probed`` mode (``services.market``'s own ``main``, with
two threads beside it). One writes, every interval after the warm-up, the
allocator's figures: Python's allocated blocks, pymalloc's arenas (now, at
the most, given back), the C heap (mallinfo2) and the anonymous and
file-backed resident memory. The other notes each new high of Python's
allocated blocks with the loop thread's stack at that moment. With
``--tracemalloc FRAMES`` (which implies ``--probe``) the service also runs
under ``tracemalloc``, and each report adds the allocations that grew most
since the warm-up, by traceback, and the object types whose count grew
(counting them walks every object, and tracing slows every allocation: a
traced service carries far less, so use a lower ``--rate``; its RSS is not
comparable, only where the growth is). The reports go to ``--probe-out``
(JSON lines) and are printed at the end.

Flags after ``--`` are passed to the service (``-- --whale-threshold 1e12``
leaves out whale detection's state, for one).

Run: ``python benchmarks/soak.py --duration 300 --warmup 60`` (``--help``
for the rest; the defaults are the 30-minute soak at 20,000 messages/s).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import ctypes
import gc
import json
import math
import os
import re
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs
import httpx
import psutil
import trio
from _frames import complete_frames  # benchmarks/_frames.py, beside this file

ROOT = Path(__file__).resolve().parent.parent
TOPICS = "trades,aggtrades,book,depth,klines,whales"
READY = re.compile(r"market service ready at (\S+) \(WebSocket: (\S+)\)")


# -- the WebSocket clients ------------------------------------------------------


def _pong(payload: bytes) -> bytes:
    """A client's (masked) pong answering a ping with ``payload``."""
    mask = os.urandom(4)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return bytes([0x8A, 0x80 | len(payload)]) + mask + masked


async def _upgrade(ws_url: str, topics: str) -> tuple[trio.SocketStream, bytearray]:
    """Connect and complete the handshake; the stream and what came after the answer."""
    host_port, _, path = ws_url.removeprefix("ws://").partition("/")
    host, _, port = host_port.rpartition(":")
    stream = await trio.open_tcp_stream(host, int(port))
    await stream.send_all(
        f"GET /{path}?topics={topics} HTTP/1.1\r\nHost: {host_port}\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    buffer = bytearray()
    while (end := buffer.find(b"\r\n\r\n")) < 0:
        data = await stream.receive_some(65536)
        if not data:
            raise RuntimeError(f"{ws_url}: closed during the handshake")
        buffer += data
    if not buffer.startswith(b"HTTP/1.1 101"):
        raise RuntimeError(f"{ws_url}: refused: {bytes(buffer[:end]).decode(errors='replace')}")
    del buffer[: end + 4]
    return stream, buffer


@attrs.define
class Reader:
    """The reading client's counts."""

    messages: int = 0
    connections: int = 0
    closes: collections.Counter[str] = attrs.Factory(collections.Counter)


async def read_everything(ws_url: str, topics: str, reader: Reader) -> None:
    """The reader: count every message, answer pings; reconnect if the server closes it."""
    while True:
        stream, buffer = await _upgrade(ws_url, topics)
        reader.connections += 1
        why = "connection lost"
        async with stream:
            with contextlib.suppress(trio.BrokenResourceError):
                while True:
                    frames, used = complete_frames(buffer)
                    for head, start, length in frames:
                        opcode = head & 0x0F
                        payload = bytes(buffer[start : start + length]) if opcode >= 8 else b""
                        if opcode in (1, 2):
                            reader.messages += 1
                        elif opcode == 9:
                            await stream.send_all(_pong(payload))
                        elif opcode == 8:
                            code = struct.unpack("!H", payload[:2])[0] if payload else 1005
                            why = f"{code} {payload[2:].decode(errors='replace')}"
                    del buffer[:used]
                    if why != "connection lost":
                        break
                    data = await stream.receive_some(65536)
                    if not data:
                        break
                    buffer += data
        reader.closes[why] += 1


async def stall(ws_url: str, topics: str) -> None:
    """The stalled client: upgrade, then never read (until cancelled)."""
    try:
        stream, _ = await _upgrade(ws_url, topics)
    except (OSError, RuntimeError) as exc:  # refused: the soak goes on without it
        print(f"the stalled client could not connect: {exc}", flush=True)
        return
    async with stream:
        await trio.sleep_forever()


# -- the service process ----------------------------------------------------------


class Service:
    """The service in its own process, started when built; :meth:`stop` ends it."""

    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        service_args = ["--rate", str(args.rate), "--port", "0", "--ws-port", "0"]
        service_args += args.service_args
        if args.probe:
            command = [sys.executable, __file__, "--serve-probed", "--probe-out", args.probe_out]
            command += ["--tracemalloc", str(args.tracemalloc), "--warmup", str(args.warmup)]
            command += ["--interval", str(args.interval), "--top", str(args.top), "--"]
        else:
            command = [sys.executable, "-m", "services.market"]
        self.log_path = workdir / "service.log"
        self._log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            [*command, *service_args],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        match = READY.search(line)
        if match is None:
            self.process.kill()
            self.process.wait()
            tail = self.log_path.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"the service did not start: {line!r}\n{tail}")
        self.url, self.ws_url = match.group(1), match.group(2)
        self.ps = psutil.Process(self.process.pid)

    def stop(self, grace: float = 15.0) -> int | None:
        """SIGTERM, then the exit status (``None``: it had to be killed)."""
        self.process.send_signal(signal.SIGTERM)
        try:
            status: int | None = self.process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            status = None
        assert self.process.stdout is not None
        self.process.stdout.close()
        self._log.close()
        return status


# -- sampling ---------------------------------------------------------------------


def _find(tree: object, key: str) -> object:
    """The first value of ``key`` anywhere in a JSON tree, or ``None``."""
    if isinstance(tree, dict):
        if key in tree:
            return tree[key]
        children: Sequence[object] = list(tree.values())
    elif isinstance(tree, list):
        children = tree
    else:
        return None
    for child in children:
        found = _find(child, key)
        if found is not None:
            return found
    return None


def _lost(status: dict[str, Any]) -> int | None:
    """Events received and neither published, counted malformed, dropped nor queued."""
    sources = status.get("sources", {})
    feed, queue = sources.get("feed"), sources.get("feed_queue")
    if feed is None or queue is None:
        return None
    return int(
        feed["received"] - feed["malformed"] - feed["published"] - queue["dropped"] - queue["depth"]
    )


def _children_rss(ps: psutil.Process) -> int:
    total = 0
    for child in ps.children(recursive=True):
        with contextlib.suppress(psutil.Error):
            total += child.memory_info().rss
    return total


async def sample(service: Service, http: httpx.AsyncClient, started: float) -> dict[str, Any]:
    """One sample of the service process and its endpoints."""
    ps = service.ps
    with ps.oneshot():
        rss, threads, fds = ps.memory_info().rss, ps.num_threads(), ps.num_fds()
        cpu = ps.cpu_times()
    health = await _get(http, f"{service.url}/health")
    status = await _get(http, f"{service.url}/status")
    tasks = _find(status, "tasks")
    sources = status.get("sources", {})
    feed, broadcast = sources.get("feed", {}), sources.get("broadcast", {})
    # The highest depth each queue on the way has had: a backlog raises the
    # high-water mark of memory, which an allocator rarely gives back.
    peaks = [sources.get("feed_queue", {}).get("peak_depth")]
    peaks += [sub.get("peak_depth") for sub in sources.get("bus", {}).get("subscriptions", [])]
    peaks += [c.get("peak_queued") for c in broadcast.get("connections", [])]
    return {
        "t": round(time.monotonic() - started, 1),
        "rss": rss,
        "children_rss": _children_rss(ps),
        "threads": threads,
        "fds": fds,
        "tasks": tasks if isinstance(tasks, int) else None,
        "health": health.get("code"),
        "cpu": cpu.user + cpu.system,
        "received": feed.get("received"),
        "lost": _lost(status),
        "clients": broadcast.get("clients"),
        "peaks": peaks,
        "stall_max": status.get("loop", {}).get("stall_seconds_max"),
    }


async def _get(http: httpx.AsyncClient, url: str) -> dict[str, Any]:
    """A JSON answer with its status as ``code``; ``{"code": None}`` if there was none.

    A stalled loop gets ``/status`` answered by the ops server's watch thread,
    without the sources: the sample then has no feed counters.
    """
    try:
        response = await http.get(url)
        body = response.json()
    except (httpx.HTTPError, ValueError):
        return {"code": None}
    return {**body, "code": response.status_code} if isinstance(body, dict) else {}


def _schedule(duration: float, warmup: float, interval: float) -> list[float]:
    """When to sample: the start, the end of the warm-up, every interval after, the end."""
    times = {0.0, min(warmup, duration), duration}
    t = warmup + interval
    while t < duration:
        times.add(t)
        t += interval
    return sorted(times)


def _slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of ``(x, y)`` points; 0 for fewer than two."""
    if len(points) < 2:
        return 0.0
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    return sum((x - mx) * (y - my) for x, y in points) / sxx if sxx else 0.0


def _print_sample(s: dict[str, Any], base: dict[str, Any] | None, rate: float) -> None:
    growth = f"{(s['rss'] - base['rss']) / base['rss']:+.2%}" if base else "   (warm-up)"
    print(
        f"{s['t']:>7.0f} s  rss {s['rss'] / 2**20:7.1f} MB {growth:>8}  "
        f"threads {s['threads']:>3}  fds {s['fds']:>4}  tasks {s['tasks'] or '-':>5}  "
        f"health {s['health']}  clients {s['clients']}  feed {s['received'] or 0:,} "
        f"(lost {s['lost']})  reader {s['reader']:,}  peak depths {s['peaks']}",
        flush=True,
    )


async def soak(args: argparse.Namespace, service: Service) -> dict[str, Any]:
    """Run the clients and the samples for ``--duration`` seconds; the figures."""
    reader = Reader()
    samples: list[dict[str, Any]] = []
    base: dict[str, Any] | None = None
    async with httpx.AsyncClient(timeout=10) as http, trio.open_nursery() as nursery:
        nursery.start_soon(read_everything, service.ws_url, args.topics, reader)
        nursery.start_soon(stall, service.ws_url, args.topics)
        started = time.monotonic()
        for at in _schedule(args.duration, args.warmup, args.interval):
            await trio.sleep_until(trio.current_time() + max(0.0, started + at - time.monotonic()))
            s = await sample(service, http, started)
            s["reader"] = reader.messages
            samples.append(s)
            if base is None and at >= args.warmup:
                base = s
            _print_sample(s, base, args.rate)
        lost = await _final_lost(http, service.url)
        nursery.cancel_scope.cancel()
    assert base is not None
    return _figures(args, samples, base, lost, reader)


async def _final_lost(http: httpx.AsyncClient, url: str) -> int | None:
    """The smallest ``lost`` of up to 20 reads 0.1 s apart (see the module's docstring)."""
    known = []
    for _ in range(20):
        lost = _lost(await _get(http, f"{url}/status"))
        if lost is not None:
            known.append(lost)
            if lost == 0:
                break
        await trio.sleep(0.1)
    return min(known) if known else None


def _figures(
    args: argparse.Namespace,
    samples: list[dict[str, Any]],
    base: dict[str, Any],
    lost: int | None,
    reader: Reader,
) -> dict[str, Any]:
    end = samples[-1]
    after = [s for s in samples if s["t"] >= base["t"]]
    span = max(end["t"] - base["t"], 1e-9)
    tasks = [s["tasks"] for s in after if s["tasks"] is not None]
    counted = [s for s in after if s["received"] is not None]
    feed_rate = (
        (counted[-1]["received"] - counted[0]["received"])
        / max(counted[-1]["t"] - counted[0]["t"], 1e-9)
        if len(counted) >= 2
        else None
    )
    return {
        "rate": args.rate,
        "duration": args.duration,
        "warmup": args.warmup,
        "interval": args.interval,
        "rss_growth": round((end["rss"] - base["rss"]) / base["rss"], 4),
        "rss_slope_mb_per_min": round(_slope([(s["t"] / 60, s["rss"] / 2**20) for s in after]), 3),
        "fds_growth": end["fds"] - base["fds"],
        "threads_growth": end["threads"] - base["threads"],
        "tasks_growth": tasks[-1] - tasks[0] if tasks else None,
        "lost": lost,
        "health_failures": sum(s["health"] != 200 for s in samples),
        "feed_msgs_s": None if feed_rate is None else round(feed_rate),
        "reader_msgs_s": round((end["reader"] - base["reader"]) / span),
        "reader_connections": reader.connections,
        "reader_closes": dict(reader.closes),
        "service_cpu_share": round((end["cpu"] - base["cpu"]) / span, 3),
        "samples": {
            "count": len(samples),
            "rss_mb": [round(s["rss"] / 2**20, 1) for s in samples],
            "rss_mb_base": round(base["rss"] / 2**20, 1),
            "rss_mb_end": round(end["rss"] / 2**20, 1),
            "rss_mb_max": round(max(s["rss"] for s in after) / 2**20, 1),
            "children_rss_mb_end": round(end["children_rss"] / 2**20, 1),
            "threads": [base["threads"], end["threads"], max(s["threads"] for s in after)],
            "fds": [base["fds"], end["fds"], max(s["fds"] for s in after)],
            "health": sorted({s["health"] for s in samples}),
        },
    }


# -- the probed service (--probe, --tracemalloc) -----------------------------------


class _MallInfo2(ctypes.Structure):
    """glibc's ``struct mallinfo2``."""

    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


def _allocator() -> dict[str, float]:
    """Where the process's memory is, in MB: the C heap (in use, free), mmapped blocks,
    anonymous and file-backed resident memory; and Python's allocated blocks."""
    figures: dict[str, float] = {"py_blocks": sys.getallocatedblocks(), **_pymalloc()}
    with contextlib.suppress(OSError, AttributeError):
        mallinfo2 = ctypes.CDLL(None).mallinfo2
        mallinfo2.restype = _MallInfo2
        info = mallinfo2()
        figures |= {
            "heap_mb": info.arena / 2**20,
            "heap_used_mb": info.uordblks / 2**20,
            "heap_free_mb": info.fordblks / 2**20,
            "mmapped_mb": info.hblkhd / 2**20,
        }
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("Rss", "Anonymous", "Private_Clean", "Shared_Clean"):
                figures[f"{key.lower()}_mb"] = int(value.split()[0]) / 1024
    return {k: round(v, 2) for k, v in figures.items()}


_ARENAS = re.compile(r"# arenas (allocated current|highwater mark|reclaimed) += +([\d,]+)")


def _pymalloc() -> dict[str, float]:
    """pymalloc's arenas now, at their highest, and given back, from its debug statistics.

    ``sys._debugmallocstats`` writes to file descriptor 2, with the GIL held
    (no other thread of this process writes meanwhile), so it goes to a file
    for that moment.
    """
    with tempfile.TemporaryFile() as capture:
        saved = os.dup(2)
        try:
            os.dup2(capture.fileno(), 2)
            sys._debugmallocstats()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        capture.seek(0)
        text = capture.read().decode(errors="replace")
    names = {"allocated current": "arenas", "highwater mark": "arenas_peak"}
    names["reclaimed"] = "arenas_freed"
    return {names[m[1]]: int(m[2].replace(",", "")) for m in _ARENAS.finditer(text)}


def _frames_text(stat: tracemalloc.StatisticDiff, frames: int) -> str:
    lines = [f"{f.filename.removeprefix(str(ROOT) + '/')}:{f.lineno}" for f in stat.traceback]
    return " <- ".join(reversed(lines[-frames:]))


def _type_counts() -> collections.Counter[str]:
    return collections.Counter(type(o).__qualname__ for o in gc.get_objects())


def _traced(base: tracemalloc.Snapshot, top: int) -> dict[str, Any]:
    exclude = [tracemalloc.Filter(False, tracemalloc.__file__)]
    snapshot = tracemalloc.take_snapshot().filter_traces(exclude)
    grown = snapshot.compare_to(base, "traceback")
    return {
        "traced_mb": round(tracemalloc.get_traced_memory()[0] / 2**20, 2),
        "top": [
            {
                "kib": round(g.size_diff / 1024, 1),
                "count": g.count_diff,
                "where": _frames_text(g, 6),
            }
            for g in grown[:top]
        ],
    }


def _probe(out: Path, warmup: float, interval: float, top: int) -> None:
    """In the probed service, a thread: after the warm-up, report what grew every interval."""
    time.sleep(warmup)
    # Walking every object (for the types) and snapshotting hold the loop
    # for a while: only when tracing, which costs more anyway.
    tracing = tracemalloc.is_tracing()
    exclude = [tracemalloc.Filter(False, tracemalloc.__file__)]
    base = tracemalloc.take_snapshot().filter_traces(exclude) if tracing else None
    base_types = _type_counts() if tracing else None
    started = time.monotonic()
    while True:
        report: dict[str, Any] = {"t": round(warmup + time.monotonic() - started, 1)}
        report |= _allocator()
        if base is not None and base_types is not None:
            types = _type_counts()
            report["tasks"] = types.get("Task", 0)
            report["types"] = (types - base_types).most_common(top)
            del types
            report |= _traced(base, top)
        with out.open("a") as file:
            file.write(json.dumps(report) + "\n")
        time.sleep(interval)


def _loop_stack(thread_id: int, frames: int) -> list[str]:
    """The innermost ``frames`` lines of the loop's thread, application code only."""
    frame = sys._current_frames().get(thread_id)
    lines: list[str] = []
    while frame is not None and len(lines) < frames:
        name = frame.f_code.co_filename
        if name.startswith(str(ROOT)) and "/.venv/" not in name:
            lines.append(f"{name.removeprefix(str(ROOT) + '/')}:{frame.f_lineno}")
        frame = frame.f_back
    return lines


def _watch_highs(out: Path, warmup: float, loop_thread: int) -> None:
    """In the probed service, a thread: each new high of Python's allocated blocks after
    the warm-up (by more than 2,000), with what the loop's thread was running then."""
    time.sleep(warmup)
    high = sys.getallocatedblocks()
    started = time.monotonic()
    while True:
        time.sleep(0.002)  # in effect every switch interval: the loop holds the GIL
        blocks = sys.getallocatedblocks()
        if blocks > high + 2000:
            high = blocks
            report = {
                "t": round(warmup + time.monotonic() - started, 2),
                "high": blocks,
                "stack": _loop_stack(loop_thread, 8),
            }
            with out.open("a") as file:
                file.write(json.dumps(report) + "\n")


def serve_probed(args: argparse.Namespace, service_args: list[str]) -> int:
    """Run ``services.market`` with ``service_args``, probed (and traced if asked)."""
    sys.path.insert(0, str(ROOT))
    from services.market.__main__ import main as service_main

    if args.tracemalloc:
        tracemalloc.start(args.tracemalloc)
    thread = threading.Thread(
        target=_probe,
        args=(Path(args.probe_out), args.warmup, args.interval, args.top),
        name="soak-probe",
        daemon=True,
    )
    thread.start()
    highs = threading.Thread(
        target=_watch_highs,
        args=(Path(args.probe_out + ".highs"), args.warmup, threading.get_ident()),
        name="soak-highs",
        daemon=True,
    )
    highs.start()
    return service_main(service_args)


def _print_probe(path: Path, top: int) -> None:
    reports = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    if not reports:
        print("probe: no report (the run ended before the first)")
        return
    keys = [k for k in reports[0] if k not in ("t", "traced_mb", "top", "types")]
    print("\nprobe: the allocator's figures (_mb: MB; py_blocks: Python's allocated blocks;")
    print("arenas: pymalloc's 1 MiB arenas now, at the most, given back so far)")
    print("      t " + " ".join(f"{k.removesuffix('_mb'):>13}" for k in keys))
    for r in reports:
        print(f"{r['t']:>7.0f} " + " ".join(f"{r.get(k, math.nan):>13,.2f}" for k in keys))
    highs_path = Path(f"{path}.highs")
    if highs_path.exists():
        print("new highs of Python's allocated blocks after the warm-up, and the loop's stack:")
        for line in highs_path.read_text().splitlines():
            high = json.loads(line)
            print(f"  {high['t']:>7.2f} s {high['high']:>9,}  " + " <- ".join(high["stack"]))
    last = reports[-1]
    if "top" in last:
        print("objects whose count grew since the warm-up: ")
        print("  " + ", ".join(f"{t} {n:+}" for t, n in last["types"]))
        print(
            f"tracemalloc at {last['t']:.0f} s (traced {last['traced_mb']} MB): growth by traceback"
        )
        for stat in last["top"][:top]:
            print(f"  {stat['kib']:>+9.1f} KiB {stat['count']:>+7} blocks  {stat['where']}")


# -- the driver ---------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=20_000.0, help="simulator msg/s")
    parser.add_argument("--duration", type=float, default=1800.0, help="seconds of soak")
    parser.add_argument("--warmup", type=float, default=60.0, help="seconds before the base")
    parser.add_argument("--interval", type=float, default=30.0, help="seconds between samples")
    parser.add_argument("--topics", default=TOPICS, help=f"the clients' topics ({TOPICS})")
    parser.add_argument(
        "--probe",
        action="store_true",
        help="run the service with a thread that reports the allocator's figures",
    )
    parser.add_argument(
        "--tracemalloc",
        type=int,
        default=0,
        metavar="FRAMES",
        help="also trace allocations with FRAMES frames, and report growth (implies --probe)",
    )
    parser.add_argument("--probe-out", help="the probe's reports (default: a temporary file)")
    parser.add_argument("--top", type=int, default=15, help="entries shown per report")
    parser.add_argument("--serve-probed", action="store_true", help=argparse.SUPPRESS)
    arguments, service_args = sys.argv[1:], []
    if "--" in arguments:  # what follows is more of the service's flags
        split = arguments.index("--")
        arguments, service_args = arguments[:split], arguments[split + 1 :]
    args = parser.parse_args(arguments)
    args.service_args = service_args
    if args.serve_probed:
        sys.exit(serve_probed(args, service_args))
    args.probe = args.probe or args.tracemalloc > 0
    for name in ("duration", "interval"):
        if not 0 < getattr(args, name) < math.inf:
            parser.error(f"--{name} must be > 0 and finite")
    if not 0 <= args.warmup < args.duration:
        parser.error("--warmup must be >= 0 and less than --duration")

    with tempfile.TemporaryDirectory(prefix="soak-") as scratch:
        workdir = Path(scratch)
        if args.probe and not args.probe_out:
            args.probe_out = str(workdir / "probe.jsonl")
        print(
            f"{os.cpu_count()} CPUs; the service at {args.rate:,.0f} msg/s for "
            f"{args.duration:,.0f} s (warm-up {args.warmup:,.0f} s, a sample every "
            f"{args.interval:,.0f} s), a reading and a stalled client on {args.topics}"
            + (f"; tracemalloc with {args.tracemalloc} frames" if args.tracemalloc else "")
        )
        service = Service(args, workdir)
        try:
            figures = trio.run(soak, args, service)
        finally:
            figures_status = service.stop()
        figures["exit_status"] = figures_status
        if args.probe:
            _print_probe(Path(args.probe_out), args.top)
            figures["probe"] = {"tracemalloc": args.tracemalloc}
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
