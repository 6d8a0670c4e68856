"""The ops server under load, the cost of the stall detector, and a probe of a blocked loop.

Measures, in one process run:

* /health latency (p50, p99) over ``--requests`` probes while idle, and
  again while a CPU batch runs on the process bridge (``engine.map_batch``)
  and 20k msg/s flow through an engine channel in the same event loop:
  with CPUs - 1 workers (``loaded``: a core stays free for the event loop),
  with one worker per CPU (``loaded_all_cores``), and the same with the
  workers at nice 10 (``loaded_all_cores_niced``). The prober is a separate
  process that opens a new connection per request with ``http.client``, as
  a kubelet does, 200 times a second, so its own CPU and the GIL do not
  count against the server.
* The stall detector's overhead: a producer/consumer pump through an engine
  channel (one message per task step: the detector's worst case), each
  round run with and without ``open_loop_watch``, alternating; the ratio of
  the fastest rounds minus one, in CPU time of the whole process (the watch
  thread included). Reported for the default (lag) detector and for the
  per-step instrument.
* The observer page's cost: /health latency with five viewers streaming
  ``/ui/events`` (each a reader in another process, as browsers are) against
  none, in alternating rounds of the same run; p99 of each condition's
  probes pooled, and their difference (target: within 1 ms).
* How long a liveness request takes to get its 503 while a task blocks the
  loop with ``time.sleep(10)``: one request sent as the block begins (it
  waits out the detection) and one sent 5 s into it.

Run: ``python benchmarks/ops.py`` (``--help`` for sizes). The last line is JSON.
"""

from __future__ import annotations

import argparse
import functools
import http.client
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from typing import Any

import trio

import engine

MESSAGE_RATE = 20_000  # per second, through the channel while loaded
PROBE_INTERVAL = 0.005  # 200 probes per second
_TICK = 0.01  # the paced producer sends a burst every tick


def probe(host: str, port: int, requests: int, strict: bool = True) -> list[float]:
    """``requests`` GET /health, one new connection each, paced; latencies in ms.

    A non-200 answer raises, unless not ``strict``: then it is counted, as a
    negative latency, so that a run on a busy machine (where the loop does
    stall) still says how many there were.
    """
    latencies = []
    next_at = time.perf_counter()
    for _ in range(requests):
        # Paced, like a prober (and so the prober does not eat a core of its own).
        time.sleep(max(0.0, next_at - time.perf_counter()))
        next_at += PROBE_INTERVAL
        started = time.perf_counter()
        conn = http.client.HTTPConnection(host, port, timeout=5)
        conn.request("GET", "/health")
        response = conn.getresponse()
        response.read()
        conn.close()
        latency = (time.perf_counter() - started) * 1000
        if response.status != 200:
            if strict:
                raise RuntimeError(f"/health answered {response.status}")
            latency = -latency
        latencies.append(latency)
    return latencies


async def probe_from_another_process(
    ops: engine.OpsServer, requests: int, strict: bool = True
) -> list[float]:
    command = [sys.executable, __file__, "--probe", ops.host, str(ops.port), str(requests)]
    command += [] if strict else ["--lenient"]
    done = await trio.run_process(command, capture_stdout=True)
    return [float(x) for x in json.loads(done.stdout)]


def view(host: str, port: int, viewers: int) -> None:
    """Stream /ui/events on ``viewers`` connections, reading every byte, until killed.

    Prints ``ready`` once every connection has had its first snapshot.
    """
    first = threading.Barrier(viewers + 1)

    def read() -> None:
        conn = http.client.HTTPConnection(host, port, timeout=60)
        conn.request("GET", "/ui/events")
        response = conn.getresponse()
        response.fp.readline()  # "retry: ..."
        response.fp.readline()
        response.fp.readline()  # the first event
        first.wait()
        while response.fp.read1(65536):
            pass

    for _ in range(viewers):
        threading.Thread(target=read, daemon=True).start()
    first.wait()
    print("ready", flush=True)
    threading.Event().wait()


async def _serve_bench_ops(
    nursery: trio.Nursery, sup: engine.Supervisor
) -> tuple[engine.OpsServer, Any, Any]:
    """Three beating children and a channel as a source, behind an ops server."""
    for name in ("feed", "watchlist", "scans"):
        sup.start_soon(beating, name=name, stall_after=30)
    send, receive = engine.open_channel[int](1000)
    start = functools.partial(engine.serve_ops, sup, "127.0.0.1", 0, sources={"flow": send})
    ops: engine.OpsServer = await nursery.start(start)
    return ops, send, receive


async def viewer_cost(requests: int, rounds: int, viewers: int = 5) -> dict[str, Any]:
    """/health latency with ``viewers`` pages streaming against none, alternating rounds."""
    idle: list[float] = []
    viewed: list[float] = []
    async with trio.open_nursery() as nursery, engine.open_supervisor(name="bench") as sup:
        ops, _send, receive = await _serve_bench_ops(nursery, sup)
        command = [sys.executable, __file__, "--view", ops.host, str(ops.port), str(viewers)]
        for _ in range(rounds):
            idle += await probe_from_another_process(ops, requests, strict=False)
            proc = await trio.lowlevel.open_process(command, stdout=subprocess.PIPE)
            try:
                assert proc.stdout is not None
                with trio.fail_after(10):
                    if b"ready" not in await proc.stdout.receive_some():
                        raise RuntimeError("the viewers did not start")
                viewed += await probe_from_another_process(ops, requests, strict=False)
            finally:
                proc.kill()
                await proc.wait()
        sup.cancel()
        nursery.cancel_scope.cancel()
    await receive.aclose()
    failures = {"health_failures_0_viewers": sum(x < 0 for x in idle)}
    failures["health_failures_5_viewers"] = sum(x < 0 for x in viewed)
    idle, viewed = [abs(x) for x in idle], [abs(x) for x in viewed]
    p99_idle, p99_viewed = percentile(idle, 0.99), percentile(viewed, 0.99)
    return {
        **failures,
        "health_p50_ms_0_viewers": percentile(idle, 0.5),
        "health_p50_ms_5_viewers": percentile(viewed, 0.5),
        "health_p99_ms_0_viewers": p99_idle,
        "health_p99_ms_5_viewers": p99_viewed,
        "health_p99_delta_ms": p99_viewed - p99_idle,
        "viewer_rounds": rounds,
    }


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def cpu_work(n: int) -> int:
    total = 0
    for i in range(n):
        total += i * i % 7
    return total


async def beating() -> None:
    while True:
        engine.heartbeat()
        await trio.sleep(0.05)


async def paced_flow(send: engine.SendChannel[int], counter: list[int]) -> None:
    """Send MESSAGE_RATE messages per second, in a burst each tick."""
    burst = int(MESSAGE_RATE * _TICK)
    next_tick = trio.current_time()
    while True:
        for i in range(burst):
            await send.send(i)
        counter[0] += burst
        next_tick += _TICK
        await trio.sleep_until(next_tick)


async def drain(receive: engine.ReceiveChannel[int]) -> None:
    async for _ in receive:
        pass


def lower_priority() -> None:
    os.nice(10)  # batch work yields the CPU to the latency-sensitive event loop


async def cpu_batches(workers: int, niced: bool, batches: list[int]) -> None:
    initializer = lower_priority if niced else None
    async with engine.open_process_pool(workers, initializer=initializer) as pool:
        await pool.warm()
        while True:
            items = [200_000] * (workers * 4)
            async with engine.map_batch(cpu_work, items, workers=workers, pool=pool) as batch:
                async for _ in batch:
                    pass
            batches[0] += 1


async def health_latencies(requests: int, loads: dict[str, tuple[int, bool]]) -> dict[str, Any]:
    """Idle, then under each load: ``{suffix: (workers, niced)}``."""
    results: dict[str, Any] = {}
    async with trio.open_nursery() as nursery, engine.open_supervisor(name="bench") as sup:
        ops, send, receive = await _serve_bench_ops(nursery, sup)
        idle = await probe_from_another_process(ops, requests)
        results["health_p50_ms_idle"] = percentile(idle, 0.5)
        results["health_p99_ms_idle"] = percentile(idle, 0.99)
        async with trio.open_nursery() as flow:
            flow.start_soon(drain, receive)
            for suffix, (workers, niced) in loads.items():
                results.update(await _loaded(ops, send, requests, workers, niced, suffix))
            flow.cancel_scope.cancel()
        sup.cancel()
        nursery.cancel_scope.cancel()
    return results


async def _loaded(
    ops: engine.OpsServer,
    send: engine.SendChannel[int],
    requests: int,
    workers: int,
    niced: bool,
    suffix: str,
) -> dict[str, Any]:
    sent, batches = [0], [0]
    stalls_before = ops.loop_watch.statistics().stalls if ops.loop_watch else 0
    async with trio.open_nursery() as load:
        load.start_soon(cpu_batches, workers, niced, batches)
        load.start_soon(paced_flow, send, sent)
        await trio.sleep(1.0)  # workers started, flow steady
        started, sent_before = time.perf_counter(), sent[0]
        loaded = await probe_from_another_process(ops, requests)
        rate = (sent[0] - sent_before) / (time.perf_counter() - started)
        load.cancel_scope.cancel()
    stalls = (ops.loop_watch.statistics().stalls if ops.loop_watch else 0) - stalls_before
    return {
        f"health_p50_ms_{suffix}": percentile(loaded, 0.5),
        f"health_p99_ms_{suffix}": percentile(loaded, 0.99),
        f"{suffix}_msg_per_s": rate,
        f"{suffix}_cpu_workers": workers,
        f"{suffix}_cpu_batches": batches[0],
        f"{suffix}_loop_stalls": stalls,
    }


def pump(n: int, watch: str) -> float:
    """CPU seconds of the process (every thread, the watch thread too) to move
    ``n`` messages through an engine channel, one per task step.

    CPU time, not wall time: the detector's cost is CPU, and wall time on a
    shared machine mostly measures the neighbours.
    """

    async def main() -> float:
        send, receive = engine.open_channel[int](1000)

        async def producer() -> None:
            async with send:
                for i in range(n):
                    await send.send(i)

        started = time.process_time()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(producer)
            nursery.start_soon(drain, receive)
        return time.process_time() - started

    async def watched() -> float:
        async with engine.open_loop_watch(per_step=watch == "per_step"):
            return await main()

    return trio.run(main if watch == "off" else watched)


def overheads(n: int, rounds: int) -> dict[str, float]:
    """The detector's cost: alternating rounds, compared by their fastest round.

    As ``timeit``'s documentation says, the minimum is the figure to compare:
    a shared machine only ever adds time. Medians are reported too.
    """
    times: dict[str, list[float]] = {"off": [], "lag": [], "per_step": []}
    for _ in range(rounds):
        for mode, seconds in times.items():
            seconds.append(pump(n, mode))
    best = {mode: min(seconds) for mode, seconds in times.items()}
    median = {mode: statistics.median(seconds) for mode, seconds in times.items()}
    return {
        "pump_msg_per_cpu_s": n / best["off"],
        "stall_detector_overhead": best["lag"] / best["off"] - 1,
        "stall_instrument_overhead": best["per_step"] / best["off"] - 1,
        "stall_detector_overhead_median": median["lag"] / median["off"] - 1,
        "stall_instrument_overhead_median": median["per_step"] / median["off"] - 1,
    }


def _timed_probe(url_host: str, port: int, gate: threading.Event, out: list[float]) -> None:
    gate.wait(15)
    started = time.perf_counter()
    conn = http.client.HTTPConnection(url_host, port, timeout=5)
    conn.request("GET", "/health")
    response = conn.getresponse()
    body = response.read()
    conn.close()
    out.append(time.perf_counter() - started)
    if response.status != 503 or b"loop_stalled" not in body:
        raise RuntimeError(f"expected a 503 naming the stall, got {response.status}: {body!r}")


def block_the_loop(seconds: float, blocked: threading.Event) -> None:
    blocked.set()
    time.sleep(seconds)  # the bug under test: a synchronous call in a task


async def blocked_loop_liveness() -> dict[str, float]:
    async with trio.open_nursery() as nursery:
        ops: engine.OpsServer = await nursery.start(engine.serve_ops, None, "127.0.0.1", 0)
        blocked, midway = threading.Event(), threading.Event()
        at_start: list[float] = []
        at_5s: list[float] = []
        first = threading.Thread(target=_timed_probe, args=(ops.host, ops.port, blocked, at_start))
        second = threading.Thread(target=_timed_probe, args=(ops.host, ops.port, midway, at_5s))
        first.start()
        second.start()
        timer = threading.Timer(5.0, midway.set)  # armed just before the block
        timer.start()
        try:
            async with trio.open_nursery() as tasks:
                tasks.start_soon(_blocker, blocked, name="blocker")
        finally:
            timer.cancel()
            midway.set()
        await trio.to_thread.run_sync(first.join)
        await trio.to_thread.run_sync(second.join)
        nursery.cancel_scope.cancel()
    return {"blocked_loop_liveness_s": at_start[0], "blocked_loop_liveness_s_midway": at_5s[0]}


async def _blocker(blocked: threading.Event) -> None:
    block_the_loop(10.0, blocked)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=500, help="probes per latency run")
    parser.add_argument(
        "--workers", type=int, default=0, help="CPU workers of the main loaded run (CPUs - 1)"
    )
    parser.add_argument("--messages", type=int, default=100_000, help="per overhead round")
    parser.add_argument("--rounds", type=int, default=9, help="overhead rounds")
    parser.add_argument("--viewer-rounds", type=int, default=6, help="observer cost rounds")
    parser.add_argument("--only-viewers", action="store_true", help="measure the page's cost only")
    parser.add_argument("--probe", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--view", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--lenient", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe:
        host, port, requests = args.probe
        print(json.dumps(probe(host, int(port), int(requests), strict=not args.lenient)))
        return
    if args.view:
        host, port, viewers = args.view
        view(host, int(port), int(viewers))
        return
    if args.only_viewers:
        only = trio.run(viewer_cost, args.requests, args.viewer_rounds)
        _report_viewers(only)
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in only.items()}))
        return

    cores = os.cpu_count() or 1
    workers = args.workers or max(1, cores - 1)
    loads = {
        "loaded": (workers, False),
        "loaded_all_cores": (cores, False),
        "loaded_all_cores_niced": (cores, True),
    }
    results: dict[str, Any] = {}
    results.update(trio.run(health_latencies, args.requests, loads))
    results.update(overheads(args.messages, args.rounds))
    results.update(trio.run(blocked_loop_liveness))
    results.update(trio.run(viewer_cost, args.requests, args.viewer_rounds))
    results["requests"] = args.requests
    _report(results)
    _report_viewers(results)
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in results.items()}))


def _report(r: dict[str, Any]) -> None:
    print(
        f"/health idle:   p50 {r['health_p50_ms_idle']:.2f} ms  "
        f"p99 {r['health_p99_ms_idle']:.2f} ms"
    )
    for suffix in ("loaded", "loaded_all_cores", "loaded_all_cores_niced"):
        print(
            f"/health {suffix}: p50 {r[f'health_p50_ms_{suffix}']:.2f} ms  "
            f"p99 {r[f'health_p99_ms_{suffix}']:.2f} ms  ({r[f'{suffix}_msg_per_s']:.0f} msg/s, "
            f"{r[f'{suffix}_cpu_workers']} CPU workers, {r[f'{suffix}_cpu_batches']} batches, "
            f"{r[f'{suffix}_loop_stalls']} loop stalls)"
        )
    print(
        f"stall detector overhead: {r['stall_detector_overhead']:+.1%} (lag, default), "
        f"{r['stall_instrument_overhead']:+.1%} (per-step instrument) "
        f"of CPU time on a {r['pump_msg_per_cpu_s']:.0f} msg/s channel pump "
        f"(medians: {r['stall_detector_overhead_median']:+.1%}, "
        f"{r['stall_instrument_overhead_median']:+.1%})"
    )
    print(
        f"liveness while blocked by time.sleep(10): {r['blocked_loop_liveness_s']:.3f} s "
        f"(sent as the block began), {r['blocked_loop_liveness_s_midway']:.3f} s (sent 5 s in)"
    )


def _report_viewers(r: dict[str, Any]) -> None:
    print(
        f"/health with 5 observer viewers: p50 {r['health_p50_ms_5_viewers']:.2f} ms  "
        f"p99 {r['health_p99_ms_5_viewers']:.2f} ms; with none: p50 "
        f"{r['health_p50_ms_0_viewers']:.2f} ms  p99 {r['health_p99_ms_0_viewers']:.2f} ms; "
        f"p99 delta {r['health_p99_delta_ms']:+.2f} ms ({r['viewer_rounds']} rounds alternating; "
        f"non-200 answers: {r['health_failures_0_viewers']} without viewers, "
        f"{r['health_failures_5_viewers']} with)"
    )


if __name__ == "__main__":
    main()
