"""The service's REST API end to end: every endpoint on a running service, and its errors."""

from __future__ import annotations

import functools
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import httpx
import pytest
import trio

from services.market import _service
from services.market._service import MarketConfig, MarketService, serve_market

GUARD = 30


@pytest.fixture
async def service() -> AsyncIterator[tuple[MarketService, httpx.AsyncClient]]:
    config = MarketConfig(
        port=0, ws_port=0, rate=5_000, watchlist_interval=0.5, scan_symbols=40, scan_workers=1
    )
    # Made before the service starts: creating a client blocks the loop ~0.1 s.
    async with httpx.AsyncClient() as client, trio.open_nursery() as nursery:
        running: MarketService = await nursery.start(serve_market, config)
        client.base_url = httpx.URL(running.url)
        yield running, client
        nursery.cancel_scope.cancel()


async def until(check: Callable[[], object]) -> None:
    """Poll a condition of real I/O (the caller bounds the wait)."""
    while True:
        if check():
            return
        await trio.sleep(0.02)


async def test_every_dataset_is_served(service: tuple[MarketService, httpx.AsyncClient]) -> None:
    running, client = service
    assert running.watchlist is not None
    assert running.whales is not None
    assert running.orders is not None
    with trio.fail_after(GUARD):
        await running.watchlist.wait_cycle()
        await until(lambda: running.whales is not None and running.whales.recent(1))
        await until(lambda: running.orders is not None and running.orders.recent(2))
        watchlist = (await client.get("/api/watchlist")).json()
        whales = (await client.get("/api/whale_flows", params={"limit": 1})).json()
        orders = (await client.get("/api/orders", params={"limit": 2})).json()
        last_update = (await client.get("/api/last_update")).json()
    assert [q["symbol"] for q in watchlist["quotes"]] == list(_service.DEFAULT_SYMBOLS)
    assert watchlist["failed"] == {}
    assert watchlist["updated_at"] > 0
    (whale,) = whales["whales"]
    assert whale["notional"] >= _service.SIMULATED_WHALE_USD
    assert whale["symbol"] in whales["flows"]
    assert [o["type"] for o in orders] == ["order", "order"]
    assert set(last_update) == {"watchlist", "whale_flows"}
    assert last_update["watchlist"]["updated_at"] == watchlist["updated_at"]


async def test_a_scan_runs_on_the_services_pool(
    service: tuple[MarketService, httpx.AsyncClient],
) -> None:
    running, client = service
    assert running.scans is not None
    with trio.fail_after(GUARD):
        started = await client.post("/api/scans", json={"formula": "close > 0"})
        assert started.status_code == 202
        scan = running.scans.get(started.json()["id"])
        assert scan is not None
        await scan.wait()
        body = (await client.get(started.headers["location"])).json()
    assert (body["scan"]["status"], body["scan"]["matched"]) == ("done", 40)


@pytest.mark.parametrize(
    ("path", "status", "error"),
    [
        ("/api/whale_flows?limit=0", 400, "limit must be an integer from 1 to 10000, got '0'"),
        ("/api/whale_flows?limit=x", 400, "limit must be an integer from 1 to 10000, got 'x'"),
        ("/api/orders?limit=1001", 400, "limit must be an integer from 1 to 1000, got '1001'"),
        ("/api/orders?limt=5", 400, "unknown query parameter(s) limt; known: limit"),
        ("/api/watchlist?symbol=BTCUSDT", 400, "unknown query parameter(s) symbol; known: none"),
        ("/api/nothing", 404, "Not Found"),
    ],
)
async def test_bad_requests_get_a_reason(
    service: tuple[MarketService, httpx.AsyncClient], path: str, status: int, error: str
) -> None:
    _, client = service
    response = await client.get(path)
    assert response.status_code == status
    assert response.json() == {"error": error}


async def test_wrong_methods_are_refused(service: tuple[MarketService, httpx.AsyncClient]) -> None:
    _, client = service
    response = await client.post("/api/watchlist")
    assert response.status_code == 405
    assert response.json() == {"error": "Method Not Allowed"}


async def test_the_openapi_description_lists_what_is_served(
    service: tuple[MarketService, httpx.AsyncClient],
) -> None:
    _, client = service
    description = (await client.get("/api/openapi.json")).json()
    assert description["openapi"].startswith("3.1")
    assert sorted(description["paths"]) == [
        "/api/history/failures",
        "/api/last_update",
        "/api/orders",
        "/api/scans",
        "/api/scans/{scan_id}",
        "/api/watchlist",
        "/api/whale_flows",
    ]
    schemas = description["components"]["schemas"]
    assert {"Quote", "WhaleTrade", "Order", "ScanSummary", "Problem"} <= set(schemas)
    assert schemas["ScanRequest"]["required"] == ["formula"]


@pytest.mark.subprocess
def test_docs_example_runs() -> None:
    example = Path(__file__).resolve().parent.parent / "docs" / "examples" / "api_example.py"
    result = subprocess.run(
        [sys.executable, str(example)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "quotes: BTCUSDT, ETHUSDT, SOLUSDT, BNBUSDT, XRPUSDT",
        "whale fields: ['flows', 'updated_at', 'whales']",
        "orders: ['order', 'order']",
        "datasets: ['watchlist', 'whale_flows']",
        "scan: 202 /api/scans/1",
        "scan done: 100 symbols",
        "bad formula: 400 7",
    ]


async def test_a_watchlist_cycle_that_fetches_nothing_is_a_warning_on_health() -> None:
    # An exchange that accepts connections and never answers: every request
    # is cut at its deadline, the cycle ends with nothing, and that is a
    # failed run, which /health shows (still 200: the cycle retries).
    async def handler(stream: trio.SocketStream) -> None:
        await trio.sleep_forever()

    async with httpx.AsyncClient() as client, trio.open_nursery() as nursery:
        serve = functools.partial(trio.serve_tcp, handler, 0, host="127.0.0.1")
        (listener,) = await nursery.start(serve)
        port = listener.socket.getsockname()[1]
        config = MarketConfig(
            port=0, ws_port=0, rest_url=f"http://127.0.0.1:{port}", watchlist_interval=0.3
        )
        running: MarketService = await nursery.start(serve_market, config)
        assert running.watchlist is not None
        with trio.fail_after(GUARD):
            await running.watchlist.wait_cycle()
            health = await client.get(f"{running.url}/health")
        nursery.cancel_scope.cancel()
    assert health.status_code == 200
    (warning,) = health.json()["warnings"]
    assert warning["kind"] == "cycle_failing"
    assert warning["subject"] == "market/watchlist"
    assert "NothingFetched: no symbol of 5 answered (request deadline" in warning["message"]
