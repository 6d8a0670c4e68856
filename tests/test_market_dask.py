"""The market service's scans on a Dask cluster (``--dask``), a real LocalCluster of processes."""

from __future__ import annotations

import distributed
import httpx
import pytest
import trio

from services.market._service import MarketConfig, MarketService, serve_market
from tests.fixtures_dask import Cluster, dask_client, dask_cluster, dask_session_client

__all__ = ["dask_client", "dask_cluster", "dask_session_client"]  # fixtures, used by name

GUARD = 60


async def test_scans_run_on_the_cluster_and_status_shows_it(
    dask_cluster: Cluster, dask_client: distributed.Client
) -> None:
    # dask_client: the cluster is idle, and the threads Dask makes on a
    # client's first use (process-wide) exist before the test starts.
    config = MarketConfig(port=0, ws_port=0, dask=dask_cluster.address, scan_symbols=200)
    with trio.fail_after(GUARD):
        async with httpx.AsyncClient() as http, trio.open_nursery() as nursery:
            service: MarketService = await nursery.start(serve_market, config)
            assert service.scans is not None
            scan = service.scans.start("rsi14 < 50")
            await scan.wait()
            summary = scan.summary()
            status = (await http.get(f"{service.url}/status")).json()
            health = (await http.get(f"{service.url}/health")).json()
            nursery.cancel_scope.cancel()
    assert (summary.status, summary.completed, summary.failed) == ("done", 200, 0)
    cluster = status["sources"]["dask"]
    assert cluster["address"] == dask_cluster.address
    assert (cluster["workers"], cluster["reachable"]) == (dask_cluster.workers, True)
    assert cluster["tasks"] >= 1
    assert cluster["in_flight"] == 0
    assert health["sources"]["dask"] == {
        "state": "connected",
        "ready": True,
        "workers": dask_cluster.workers,
    }


def test_the_dask_address_is_checked_when_the_config_is_built() -> None:
    with pytest.raises(ValueError, match="must be a scheduler address such as tcp://host:8786"):
        MarketConfig(dask="localhost:8786")
