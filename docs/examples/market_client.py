"""The market service in-process, one WebSocket client, and its metrics (docs/getting-started.md).

Run it: ``python docs/examples/market_client.py``. It starts the service
on the embedded exchange simulator, on free ports; a client subscribes to
trades and reads until every symbol has sent one, then the example reads
/health, /ready and /metrics, and stops the service the way SIGTERM does.
Which trades it sees varies from run to run; what it prints does not.
"""

from __future__ import annotations

import json

import httpx
import trio
import trio_websocket
from prometheus_client.parser import text_string_to_metric_families

import engine
from services.market._service import MarketConfig, MarketService, serve_market


async def read_trades(ws_url: str, symbols: set[str]) -> None:
    """Read trades until every one of ``symbols`` has sent one."""
    seen: set[str] = set()
    async with trio_websocket.open_websocket_url(f"{ws_url}?topics=trades") as ws:
        while not symbols <= seen:
            trade = json.loads(await ws.get_message())
            if not seen:
                print("a trade's fields:", " ".join(sorted(trade)))
            assert trade["type"] == "trade"
            seen.add(trade["symbol"])
    print("trades from", ", ".join(sorted(seen)))


def samples(metrics: str) -> dict[str, float]:
    """Every sample of a Prometheus text exposition, by name and labels."""
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(metrics):
        for sample in family.samples:
            labels = ",".join(f'{key}="{value}"' for key, value in sorted(sample.labels.items()))
            found[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return found


async def main() -> str:
    # Built before the service starts watching the loop: loading CA
    # certificates blocks for ~100 ms, which it would report as a stall.
    client = httpx.AsyncClient()
    config = MarketConfig(port=0, ws_port=0)  # the defaults, on free ports
    async with client, trio.open_nursery() as nursery:
        service: MarketService = await nursery.start(serve_market, config)
        await read_trades(service.ws_url, set(config.symbols))
        # Each part says it is ready on its own schedule (the order log once
        # the simulator has created its file): wait until all of them have.
        with trio.fail_after(10):
            while True:
                if (await client.get(f"{service.url}/ready")).status_code == 200:
                    break
                await trio.sleep(0.05)
        for path in ("/health", "/ready"):
            response = await client.get(f"{service.url}{path}")
            print(path, response.status_code, response.json()["status"])
        metrics = samples((await client.get(f"{service.url}/metrics")).text)
        for name in (
            'engine_feed_published_total{source="feed"}',
            'engine_hub_published_total{hub="bus"}',
            'engine_broadcast_sent_total{source="broadcast"}',
        ):
            print(f"{name} > 0: {metrics[name] > 0}")
        dropped = 'engine_channel_dropped_total{channel="feed_queue"}'
        print(f"{dropped}: {metrics[dropped]:g}")  # the default policy, block, never drops
        # What the first SIGTERM does: ask, and let the service stop on its own.
        engine.current_shutdown().request("the example is done")
    return f"stopped: {engine.current_shutdown().reason}"


if __name__ == "__main__":
    print(engine.run(main, grace_period=10))
