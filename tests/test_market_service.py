"""python -m services.market as a user runs it: a real process, real sockets, real signals."""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
import trio
import trio_websocket
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, Request

from services.market._settings import SETTINGS

pytestmark = pytest.mark.subprocess

COMMAND = [sys.executable, "-m", "services.market"]


def wait_for(predicate: object, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]  # a zero-argument callable
            return
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


@contextlib.contextmanager
def service_process(*flags: str) -> Iterator[tuple[subprocess.Popen[str], str, str]]:
    """``python -m services.market`` on free ports, once it has printed its ready line.

    Yields the process, its ops URL and its WebSocket URL; kills it at the
    end if it is still running.
    """
    process = subprocess.Popen(
        [*COMMAND, "--port", "0", "--ws-port", "0", *flags],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        stdout = process.stdout
        assert stdout is not None
        ready: list[str] = []
        reader = threading.Thread(target=lambda: ready.append(stdout.readline()))
        reader.start()
        reader.join(30)
        if reader.is_alive():  # the kill below ends the read with EOF
            raise AssertionError("no ready line within 30 s")
        line = ready[0]
        assert line.startswith("market service ready at http://127.0.0.1:"), line
        url = line.split(" at ")[1].split()[0]
        ws_url = line.split("(WebSocket: ")[1].rstrip(")\n")
        yield process, url, ws_url
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        for stream in (process.stdout, process.stderr):
            if stream is not None:
                stream.close()


async def first_message(url: str) -> dict[str, object]:
    with trio.fail_after(10):
        async with trio_websocket.open_websocket_url(url) as ws:
            message: dict[str, object] = json.loads(await ws.get_message())
            return message


def test_service_runs_on_the_simulator_serves_ops_and_stops_on_sigterm() -> None:
    with service_process("--rate", "2000") as (process, url, ws_url):
        with httpx.Client(base_url=url, timeout=5) as client:
            wait_for(lambda: client.get("/ready").status_code == 200, 20)
            assert client.get("/health").json()["status"] == "ok"
            wait_for(lambda: "engine_feed_published" in client.get("/metrics").text, 5)
            metrics = client.get("/metrics").text
            published = [
                float(line.split()[-1])
                for line in metrics.splitlines()
                if line.startswith("engine_feed_published")
            ]
            assert published
            assert published[0] > 0
            status = client.get("/status").json()
            assert status["sources"]["service"]["ws_url"] == ws_url
            # A WebSocket client gets normalised trades, end to end.
            trade = trio.run(first_message, f"{ws_url}?topics=trades")
            assert trade["type"] == "trade"
            assert trade["symbol"] in {"BTCUSDT", "ETHUSDT", "SOLUSDT", "BNBUSDT", "XRPUSDT"}
            children = {c["name"]: c for c in status["supervisor"]["children"]}
            assert children["feed"]["state"] == "running"
            assert children["processors"]["ready"]
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=15) == 0


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--port", "banana"], "--port: must be a port number from 0 to 65535, got 'banana'"),
        (["--overflow", "spill"], "invalid choice"),
        (["--rate", "-5"], "--rate: must be a positive number or inf, got '-5'"),
        (["--port", "70000"], "--port: must be a port number from 0 to 65535, got '70000'"),
        (["--symbols", ","], "--symbols: must name at least one symbol, got ','"),
        # Each of these once ended in a traceback from deep inside a part.
        (["--rate=-inf"], "--rate: must be a positive number or inf, got '-inf'"),
        (["--symbols", "B"], "symbols must hold upper-case Binance symbols like 'BTCUSDT'"),
        (["--host", ""], "--host: must be an address or host name, got ''"),
    ],
)
def test_invalid_flags_exit_2_with_a_clear_message(flags: list[str], message: str) -> None:
    result = subprocess.run(
        [*COMMAND, *flags], capture_output=True, text=True, timeout=30, check=False
    )
    assert result.returncode == 2
    assert message in result.stderr
    assert len(result.stderr.splitlines()) == 1, result.stderr


def test_help_documents_every_flag_and_its_variable() -> None:
    result = subprocess.run(
        [*COMMAND, "--help"], capture_output=True, text=True, timeout=30, check=True
    )
    for setting in SETTINGS:
        assert setting.flag in result.stdout
        assert setting.variable is not None
        assert setting.variable in result.stdout


def _stuck_client(ws_url: str) -> socket.socket:
    """A WebSocket client that completes the handshake and then never reads."""
    host, port = ws_url.removeprefix("ws://").split("/")[0].rsplit(":", 1)
    client = WSConnection(ConnectionType.CLIENT)
    sock = socket.create_connection((host, int(port)), timeout=10)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.sendall(client.send(Request(host=host, target="/ws?topics=>")))
    client.receive_data(sock.recv(4096))
    assert any(isinstance(event, AcceptConnection) for event in client.events())
    return sock


def test_a_forced_stop_does_not_wait_for_a_client_that_never_reads() -> None:
    with (
        service_process("--grace-period", "1") as (process, url, ws_url),
        _stuck_client(ws_url),
    ):
        with httpx.Client(base_url=url, timeout=5) as client:
            wait_for(lambda: client.get("/ready").status_code == 200, 20)
            clients = client.get("/status").json()["sources"]["broadcast"]["clients"]
            assert clients == 1
        process.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        # The client never answers the close handshake: the graceful close
        # waits for it until the 1 s grace period runs out, then the stop is
        # forced (exit 128 + SIGTERM) at once, not after the 5 s close timeout.
        assert process.wait(timeout=15) == 128 + signal.SIGTERM
        assert time.monotonic() - signalled < 4
        assert process.stderr is not None
        assert "grace period of 1 s expired" in process.stderr.read()
