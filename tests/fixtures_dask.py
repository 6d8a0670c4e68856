"""A real Dask cluster for tests: a ``LocalCluster`` of worker processes, in a process of its own.

The cluster (its scheduler, its nannies and their worker processes) runs
in a process started through a short-lived launcher, so that it is not a
descendant of the test process: the tests kill and replace worker
processes on purpose, and the engine's leak check, which looks for new
child processes, must not count those. The scheduler listens on
127.0.0.1, on a port it picks itself, and prints its address. The
scheduler's ``worker-saturation`` is 1.0 (a worker is sent a task only
when it has a thread free) and its ``allowed-failures`` is 0, so that a task whose worker dies
ends with ``KilledWorker`` at once and the engine's own policy (run the
items again alone) decides, as on the process pool.

Import the fixtures explicitly::

    from tests.fixtures_dask import dask_client, start_cluster
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import attrs
import distributed
import pytest

ROOT = Path(__file__).resolve().parent.parent

# Real seconds a cluster gets to start, or to stop once asked.
_START_WAIT = 30.0
_STOP_WAIT = 5.0

_CLUSTER = """
import sys
from distributed import LocalCluster

if __name__ == "__main__":
    cluster = LocalCluster(
        n_workers=int(sys.argv[1]), threads_per_worker=1, processes=True,
        host="127.0.0.1", scheduler_port=0, dashboard_address=None,
        death_timeout=120,  # a nanny gives up on a worker that starts slower than this
    )
    print(cluster.scheduler_address, flush=True)
    sys.stdin.read()  # until the test process closes its end
    cluster.close()
"""

_LAUNCHER = """
import subprocess, sys
child = subprocess.Popen(sys.argv[1:], start_new_session=True)
print(child.pid, flush=True)
"""


@attrs.define
class Cluster:
    """A cluster process: its scheduler's address and its process group.

    Attributes:
        address: the scheduler's address (``tcp://127.0.0.1:port``).
        pid: the cluster process, leader of its own process group.
        workers: how many worker processes it keeps.
    """

    address: str
    pid: int
    workers: int
    _stdin: object

    def kill(self) -> None:
        """End the whole cluster at once (scheduler, nannies, workers)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGKILL)
        with contextlib.suppress(OSError):
            self._stdin.close()  # type: ignore[attr-defined]  # the launcher's stdin pipe

    def stop(self) -> None:
        """Close the cluster, or kill it if it does not close in time."""
        with contextlib.suppress(OSError):
            self._stdin.close()  # type: ignore[attr-defined]  # the launcher's stdin pipe
        give_up = time.monotonic() + _STOP_WAIT
        while time.monotonic() < give_up:
            try:
                os.killpg(self.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.05)
        self.kill()


def start_cluster(workers: int) -> Cluster:
    """Start a cluster of ``workers`` worker processes, outside this process's tree."""
    env = dict(os.environ)
    env["DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES"] = "0"
    # One task per worker thread at a time, as the runner expects (see docs/compute.md).
    env["DASK_DISTRIBUTED__SCHEDULER__WORKER_SATURATION"] = "1.0"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    launcher = subprocess.Popen(
        [sys.executable, "-c", _LAUNCHER, sys.executable, "-c", _CLUSTER, str(workers)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
        cwd=ROOT,
    )
    assert launcher.stdout is not None
    pid = int(launcher.stdout.readline())
    launcher.wait(_START_WAIT)
    address = launcher.stdout.readline().strip()
    launcher.stdout.close()
    if not address.startswith("tcp://"):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
        raise RuntimeError(f"the Dask cluster did not start (it printed {address!r})")
    return Cluster(address, pid, workers, launcher.stdin)


def connect(cluster: Cluster, *, timeout: float = 10.0) -> distributed.Client:
    """A synchronous client of ``cluster``, once all its workers are up, its threads started."""
    client = distributed.Client(cluster.address, timeout=timeout)  # type: ignore[no-untyped-call]  # distributed's API is untyped
    client.wait_for_workers(cluster.workers, timeout=_START_WAIT)
    # Start the threads Dask makes on first use (the done-callback
    # executor, the offload pool) now, not inside the first test, whose leak
    # check would count them.
    future = client.submit(abs, -1, pure=False)
    future.add_done_callback(lambda _: None)  # type: ignore[no-untyped-call]  # distributed's API is untyped
    future.result()
    return client


@pytest.fixture(scope="session")
def dask_cluster() -> Iterator[Cluster]:
    """A 2-worker LocalCluster (real worker processes), shared by the session."""
    cluster = start_cluster(2)
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def dask_session_client(dask_cluster: Cluster) -> Iterator[distributed.Client]:
    """The session's client of :func:`dask_cluster`."""
    client = connect(dask_cluster)
    try:
        yield client
    finally:
        client.close()  # type: ignore[no-untyped-call]  # distributed's API is untyped


@pytest.fixture
def dask_client(
    dask_session_client: distributed.Client, dask_cluster: Cluster
) -> distributed.Client:
    """The session's client, once the cluster has all its workers and they are idle."""
    client = dask_session_client
    client.wait_for_workers(dask_cluster.workers, timeout=_START_WAIT)
    wait_until_idle(client)
    return client


def executing(client: distributed.Client) -> dict[str, int]:
    """Tasks each worker is executing now, cancelled ones it cannot interrupt included."""
    counts: dict[str, int] = client.run(_executing)
    return counts


def _executing(dask_worker: distributed.Worker) -> int:
    return len(dask_worker.state.executing)


def wait_until_idle(client: distributed.Client, wait: float = 10.0) -> None:
    """Wait until no worker executes anything (an abandoned task runs to its end)."""
    give_up = time.monotonic() + wait
    while any(executing(client).values()):
        if time.monotonic() > give_up:
            raise AssertionError(f"workers still busy after {wait} s: {executing(client)}")
        time.sleep(0.02)


def poll_until(condition: Callable[[], bool], within: float) -> bool:
    """In a thread: whether ``condition()`` came true within ``within`` seconds."""
    give_up = time.monotonic() + within
    while not condition():
        if time.monotonic() > give_up:
            return False
        time.sleep(0.01)
    return True
