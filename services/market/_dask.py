"""The Dask cluster scans run on with ``--dask ADDRESS``: its client, its runner, its state.

The client is dask.distributed's synchronous ``Client``, made and closed in
a worker thread (both wait on the network), and handed to
:class:`engine.DaskRunner`. A supervised child looks at the scheduler every
few seconds, in a thread, so ``/status`` shows the cluster (address,
workers, threads, the engine's tasks in flight) and ``/ready`` answers 503
while the scheduler cannot be reached.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import attrs
import trio

import engine

if TYPE_CHECKING:
    import distributed

logger = logging.getLogger("market.dask")

# Seconds between two looks at the scheduler, and how long one may take.
LOOK_EVERY = 2.0
LOOK_TIMEOUT = 5.0
# Seconds the client may take to reach the scheduler at start.
CONNECT_TIMEOUT = 10.0


def check_address(address: str) -> str:
    """``address`` if it names a Dask scheduler (``tcp://host:port`` or ``tls://…``).

    Raises:
        ValueError: another form, in words.
    """
    scheme, sep, rest = address.partition("://")
    if not sep or scheme not in ("tcp", "tls") or not rest or rest.startswith(":"):
        raise ValueError(f"must be a scheduler address such as tcp://host:8786, got {address!r}")
    return address


@engine.metric_source(label="cluster")
@attrs.frozen
class DaskClusterStatistics:
    """The cluster scans run on, for /status and /metrics.

    Attributes:
        address: the scheduler's address.
        reachable: whether the latest look at the scheduler succeeded.
        workers: workers the scheduler knew at the latest look.
        threads: their threads, in all.
        tasks: the engine's Dask tasks submitted so far.
        in_flight: of those, tasks not ended yet.
        abandoned: tasks cancelled while a worker ran them (Dask cannot
            interrupt them).
    """

    address: str
    reachable: bool
    workers: int = attrs.field(metadata=engine.gauge_metric("Workers of the cluster"))
    threads: int = attrs.field(metadata=engine.gauge_metric("Worker threads of the cluster"))
    tasks: int = attrs.field(metadata=engine.counter_metric("Dask tasks submitted"))
    in_flight: int = attrs.field(metadata=engine.gauge_metric("Dask tasks not ended yet"))
    abandoned: int = attrs.field(
        metadata=engine.counter_metric("Dask tasks cancelled while running")
    )


class DaskCluster:
    """A connected Dask cluster: the runner scans use, and what is known of the cluster."""

    def __init__(self, address: str, client: distributed.Client) -> None:
        self.address = address
        self.runner = engine.DaskRunner(client)
        self._client = client
        self._reachable = True
        self._workers, self._threads = _count(client.scheduler_info())
        # One look at a time: a look past its time limit keeps its thread
        # until the scheduler answers, and the next one waits for it here.
        self._looking = trio.CapacityLimiter(1)

    @property
    def threads(self) -> int:
        """Worker threads at the latest look (at least 1): the calls a batch keeps in flight."""
        return max(1, self._threads)

    def statistics(self) -> DaskClusterStatistics:
        """A frozen snapshot of the cluster and the runner."""
        runner = self.runner.statistics()
        return DaskClusterStatistics(
            address=self.address,
            reachable=self._reachable,
            workers=self._workers,
            threads=self._threads,
            tasks=runner.tasks,
            in_flight=runner.in_flight,
            abandoned=runner.abandoned,
        )

    def health(self) -> engine.SourceHealth:
        """``connected`` while the scheduler answers, else ``unreachable`` (not ready)."""
        if self._reachable:
            return engine.SourceHealth("connected", detail={"workers": self._workers})
        return engine.SourceHealth("unreachable", ready=False)

    async def watch(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Look at the scheduler every :data:`LOOK_EVERY` seconds, until cancelled."""
        task_status.started()
        look = functools.partial(self._client.scheduler_info)
        while True:
            info: dict[str, Any] | None = None
            with trio.move_on_after(LOOK_TIMEOUT):
                try:
                    info = await engine.to_thread(look, limiter=self._looking)
                except OSError as exc:
                    logger.warning("the Dask scheduler at %s: %s", self.address, exc)
            if info is None:
                self._reachable = False
            else:
                self._reachable = True
                self._workers, self._threads = _count(info)
            engine.heartbeat()
            await trio.sleep(LOOK_EVERY)


def _count(info: dict[str, Any]) -> tuple[int, int]:
    workers = info.get("workers", {})
    return len(workers), sum(int(w.get("nthreads", 0)) for w in workers.values())


@asynccontextmanager
async def open_dask_cluster(address: str) -> AsyncIterator[DaskCluster]:
    """Connect to the scheduler at ``address`` for the length of the block.

    Raises:
        OSError: the scheduler cannot be reached within :data:`CONNECT_TIMEOUT`.
        RuntimeError: dask.distributed is not installed.
    """
    try:
        import distributed
    except ImportError as exc:
        raise RuntimeError("--dask needs dask.distributed: pip install -e '.[dask]'") from exc

    def connect() -> distributed.Client:
        return distributed.Client(address, timeout=CONNECT_TIMEOUT)  # type: ignore[no-untyped-call]

    # Not abandoned on cancel: a client connected meanwhile must still be
    # closed; CONNECT_TIMEOUT bounds the wait.
    client = await engine.to_thread(connect, abandon_on_cancel=False)
    try:
        cluster = await engine.to_thread(DaskCluster, address, client)
        logger.info(
            "scans run on the Dask cluster at %s (%d workers, %d threads)",
            address,
            cluster.statistics().workers,
            cluster.threads,
        )
        yield cluster
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(CONNECT_TIMEOUT):
            await engine.to_thread(client.close)
