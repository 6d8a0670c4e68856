"""Shutdown under load: SIGTERM to the market service in the middle of a burst.

The exchange simulator runs in this process (``open_simulator``, at
``--rate`` messages/s, the simulator's default 1,000 unless given), so this
script can call its ``burst()``. The market service runs as it is deployed,
in its own process, fed by that simulator::

    python -m services.market --feed-url <simulator ws> --rest-url <simulator rest>
        --port 0 --ws-port 0

and prints ``market service ready at ... (WebSocket: ws://.../ws)`` when it
serves. A WebSocket client in this process (trio-websocket, reading one
message at a time at its own pace and counting) subscribes to
``/ws?topics=trades``. After ``--warmup`` seconds at the steady rate the
simulator bursts ``--burst`` messages (default 20,000) on the service's feed
connection, and once the client has received ``--sigterm-after`` messages
since the burst began (default 1,000; about a fifth of the feed's messages
are trades, so 20,000 feed messages are about 4,000 for this client), the
service gets SIGTERM: in the middle of the burst, with frames in its socket,
its queue and its processors.

Measured, per run:

- ``stop_s``: from SIGTERM to the process's exit (``--kill-after`` seconds
  at most, then it is killed and the run says so);
- ``exit_code``: the process's exit status (0 after a graceful stop);
- ``client_close_code``: the close code the client saw (1001, "going away",
  from a server that closes its clients as it stops; 1006 when the socket
  just ended without a close frame);
- ``client_received``: messages the client received in all, and
  ``client_after_sigterm`` how many of them came after the signal;
- ``burst_sent_at_sigterm``: how much of the burst the simulator had sent
  when the signal went (below ``--burst``: the signal was mid-burst);
- the service's own final counters. At the end of its drain the service
  logs (to stderr, as plain text or as JSON lines) ``market stopped: ``
  followed by a JSON object with ``received`` (feed frames received),
  ``published`` (events published on the bus), ``malformed``, ``dropped``
  (by the feed queue's declared overflow policy) and ``left_in_queue``.
  ``lost_at_shutdown = received - published - malformed - dropped``: frames
  the service took from the exchange and neither published nor accounted
  for (what was left in its queue at exit counts as lost). A service that
  logs no such line gets ``null`` counters and a note saying so.

There is no peer here: no other implementation of this service to stop the
same way, so nothing alternates; the runs are repeated and the table shows
the medians (the codes: the value every run shares, or each run's).
Targets: ``lost_at_shutdown`` 0, ``stop_s`` <= 2, ``client_close_code``
1001, ``exit_code`` 0.

Run: ``python benchmarks/shutdown.py`` (``--help`` for the rest; flags after
``--`` are passed to the service; ``--service-dir`` runs another checkout's
service, an earlier commit's, say). The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import attrs
import trio
from trio_websocket import ConnectionClosed, open_websocket_url

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from services.market.simulator import (  # noqa: E402  # after the path set-up above
    Simulator,
    SimulatorConfig,
    open_simulator,
)

READY = re.compile(r"market service ready at (\S+) \(WebSocket: (\S+)\)")
STOPPED = "market stopped: "
COUNTERS = ("received", "published", "malformed", "dropped", "left_in_queue")
NO_CLOSE = 1006  # the socket ended without a close frame (RFC 6455's "abnormal closure")


# -- the client -------------------------------------------------------------------


@attrs.define
class Client:
    """What the WebSocket client saw."""

    received: int = 0
    close_code: int | None = None
    closed_at: float | None = None
    # Set each time ``received`` reaches ``notify_at``.
    notify_at: float = math.inf
    reached: trio.Event = attrs.Factory(trio.Event)


async def read_everything(
    url: str, client: Client, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """Count every message until the server closes the connection; note its code."""
    try:
        async with open_websocket_url(url) as ws:
            task_status.started()
            while True:
                await ws.get_message()
                client.received += 1
                if client.received >= client.notify_at:
                    client.notify_at = math.inf
                    client.reached.set()
    except ConnectionClosed as exc:
        client.close_code = None if exc.reason is None else exc.reason.code
    finally:
        client.closed_at = trio.current_time()


# -- the service process ------------------------------------------------------------


async def _ready_line(stdout: trio.abc.ReceiveStream) -> str:
    """The service's first line on stdout (empty if it ended first)."""
    data = b""
    while b"\n" not in data:
        chunk = await stdout.receive_some()
        if not chunk:
            break
        data += chunk
    return data.partition(b"\n")[0].decode(errors="replace")


def final_counters(log: str) -> dict[str, int] | None:
    """The service's ``market stopped: {...}`` counters from its log, or ``None``.

    The log may be plain text or JSON lines (where the message, counters
    included, is one escaped string field); the last such line wins.
    """
    found = None
    for line in log.splitlines():
        if STOPPED not in line:
            continue
        for text in (line, *_strings(line)):
            start = text.find(STOPPED)
            if start < 0:
                continue
            try:
                value, _ = json.JSONDecoder().raw_decode(text, start + len(STOPPED))
            except ValueError:
                continue
            if isinstance(value, dict) and all(isinstance(value.get(k), int) for k in COUNTERS):
                found = {k: int(value[k]) for k in COUNTERS}
                break
    return found


def _strings(line: str) -> list[str]:
    """The string values of a JSON-object log line (none if it is not one)."""
    try:
        record = json.loads(line)
    except ValueError:
        return []
    return [v for v in record.values() if isinstance(v, str)] if isinstance(record, dict) else []


def lost_at_shutdown(counters: dict[str, int]) -> int:
    """Frames received and neither published, malformed nor dropped by policy."""
    return (
        counters["received"] - counters["published"] - counters["malformed"] - counters["dropped"]
    )


# -- one run --------------------------------------------------------------------------


async def one_run(args: argparse.Namespace, workdir: Path, index: int) -> dict[str, Any]:
    """Start the service, burst, SIGTERM it mid-burst; what every side saw."""
    async with open_simulator(SimulatorConfig(rate=args.rate)) as simulator:
        log_path = workdir / f"service-{index}.log"
        with log_path.open("wb") as log:
            command = [sys.executable, "-m", "services.market"]
            command += ["--feed-url", simulator.address.ws_url]
            command += ["--rest-url", simulator.address.rest_url]
            command += ["--port", "0", "--ws-port", "0", *args.service_args]
            process = await trio.lowlevel.open_process(
                command, cwd=args.service_dir, stdout=subprocess.PIPE, stderr=log
            )
            try:
                figures = await _drive(args, simulator, process)
            finally:
                if process.returncode is None:
                    process.kill()
                    await process.wait()
        figures["log"] = str(log_path)
        counters = final_counters(log_path.read_text(errors="replace"))
    figures["counters"] = counters
    figures["lost_at_shutdown"] = None if counters is None else lost_at_shutdown(counters)
    return figures


async def _drive(
    args: argparse.Namespace, simulator: Simulator, process: trio.Process
) -> dict[str, Any]:
    assert process.stdout is not None
    with trio.fail_after(args.start_timeout):
        line = await _ready_line(process.stdout)
    match = READY.search(line)
    if match is None:
        raise RuntimeError(f"the service did not start: {line!r} (see its log)")
    ws_url = match.group(2)
    client = Client()
    async with trio.open_nursery() as nursery:
        await nursery.start(read_everything, f"{ws_url}?topics=trades", client)
        with trio.fail_after(args.start_timeout):
            while not simulator.statistics().connections_open:  # noqa: ASYNC110  # a counter, no event to wait on
                await trio.sleep(0.01)
        await trio.sleep(args.warmup)
        before = simulator.statistics().burst_messages
        client.notify_at = client.received + args.sigterm_after
        connections = simulator.burst(args.burst)
        with trio.move_on_after(args.kill_after) as waited:
            await client.reached.wait()
        if waited.cancelled_caught:
            print(f"  the client saw fewer than {args.sigterm_after} messages of the burst")
        burst_sent = simulator.statistics().burst_messages - before
        at_sigterm = client.received
        signalled = trio.current_time()
        process.send_signal(signal.SIGTERM)
        killed = False
        with trio.move_on_after(args.kill_after) as waited:
            await process.wait()
        if waited.cancelled_caught:
            process.kill()
            await process.wait()
            killed = True
        stopped = trio.current_time()
        # The process is gone: its socket is closed, and the client sees it.
        with trio.move_on_after(5):
            while client.closed_at is None:  # noqa: ASYNC110  # set by the reader as it ends
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    return {
        "stop_s": stopped - signalled,
        "killed": killed,
        "exit_code": process.returncode,
        "client_close_code": client.close_code,
        "client_closed_s": None if client.closed_at is None else client.closed_at - signalled,
        "client_received": client.received,
        "client_after_sigterm": client.received - at_sigterm,
        "burst_connections": connections,
        "burst_sent_at_sigterm": burst_sent,
    }


# -- the driver -------------------------------------------------------------------------


def _summary(values: list[Any]) -> Any:
    """The median, or null if no run has the figure (each run's if only some have)."""
    if any(v is None for v in values):
        return None if all(v is None for v in values) else values
    return statistics.median(values)


def _shared(values: list[Any]) -> Any:
    return values[0] if len(set(values)) == 1 else values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="repetitions; medians are reported")
    parser.add_argument("--burst", type=int, default=20_000, help="messages the simulator bursts")
    parser.add_argument(
        "--rate",
        type=float,
        default=SimulatorConfig().rate,
        help="the simulator's steady messages/s (its default unless given)",
    )
    parser.add_argument("--warmup", type=float, default=1.5, help="seconds at the steady rate")
    parser.add_argument(
        "--sigterm-after",
        type=int,
        default=1_000,
        help="messages the client receives after the burst starts before SIGTERM",
    )
    parser.add_argument(
        "--kill-after", type=float, default=20.0, help="seconds after SIGTERM before SIGKILL"
    )
    parser.add_argument(
        "--start-timeout", type=float, default=60.0, help="seconds the service may take to start"
    )
    parser.add_argument(
        "--service-dir",
        type=Path,
        default=ROOT,
        help="the checkout whose services.market runs (default: this one)",
    )
    parser.add_argument("service_args", nargs="*", help="after --: flags for the service")
    args = parser.parse_args()

    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="shutdown-") as tmp:
        for index in range(args.runs):
            figures = trio.run(one_run, args, Path(tmp), index)
            runs.append(figures)
            _print_run(index, figures)
            if figures["counters"] is None:
                print(f"  its log, last lines:\n{_tail(Path(figures['log']))}")

    def column(key: str) -> list[Any]:
        return [run[key] for run in runs]

    print(f"{args.runs} runs, burst {args.burst:,} at {args.rate:g} msg/s, {os.cpu_count()} CPUs")
    if any(run["counters"] is None for run in runs):
        print(
            f"no '{STOPPED}{{...}}' line in the service's log in "
            f"{sum(run['counters'] is None for run in runs)} of {args.runs} runs: "
            "the service does not report its final counters (yet); lost_at_shutdown is null"
        )
    figures = {
        "lost_at_shutdown": _summary(column("lost_at_shutdown")),
        "stop_s": round(statistics.median(column("stop_s")), 3),
        "client_close_code": _shared(column("client_close_code")),
        "exit_code": _shared(column("exit_code")),
        "client_received": round(statistics.median(column("client_received"))),
        "client_after_sigterm": round(statistics.median(column("client_after_sigterm"))),
        "burst_sent_at_sigterm": round(statistics.median(column("burst_sent_at_sigterm"))),
        "killed": sum(column("killed")),
        "left_in_queue": _summary(
            [None if run["counters"] is None else run["counters"]["left_in_queue"] for run in runs]
        ),
        "burst": args.burst,
        "rate": args.rate,
        "runs": args.runs,
    }
    print(json.dumps(figures))


def _print_run(index: int, figures: dict[str, Any]) -> None:
    counters = figures["counters"]
    lost = figures["lost_at_shutdown"]
    print(
        f"run {index + 1}: stop {figures['stop_s']:.3f} s, exit {figures['exit_code']}"
        f"{' (killed)' if figures['killed'] else ''}, client close "
        f"{figures['client_close_code']}, client received {figures['client_received']:,} "
        f"({figures['client_after_sigterm']:,} after SIGTERM), burst sent at SIGTERM "
        f"{figures['burst_sent_at_sigterm']:,}, lost {lost}, counters {counters}",
        flush=True,
    )


def _tail(path: Path, lines: int = 8) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


if __name__ == "__main__":
    main()
