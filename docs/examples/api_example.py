"""The service's REST API: start the service, read each dataset, run a scan.

Run it: ``python docs/examples/api_example.py``. It starts the market service
in this process (on free ports, with the embedded simulator), waits for the
first watchlist cycle, then reads ``/api/watchlist``, ``/api/whale_flows``,
``/api/orders`` and ``/api/last_update``, runs a scan through ``/api/scans``,
and stops the service.
"""

from __future__ import annotations

import httpx
import trio

import engine
from services.market._service import MarketConfig, MarketService, serve_market


async def main() -> None:
    config = MarketConfig(port=0, ws_port=0, watchlist_interval=1, scan_symbols=100)
    async with httpx.AsyncClient() as client, trio.open_nursery() as nursery:
        service: MarketService = await nursery.start(serve_market, config)
        client.base_url = httpx.URL(service.url)
        assert service.watchlist is not None
        assert service.orders is not None
        with trio.fail_after(30):  # a clear error, not a hang, if a part is stuck
            await service.watchlist.wait_cycle()
            while True:  # the simulator writes 100 orders a second into its log
                if len(service.orders.recent(2)) == 2:
                    break
                await trio.sleep(0.05)

        watchlist = (await client.get("/api/watchlist")).json()
        print("quotes:", ", ".join(quote["symbol"] for quote in watchlist["quotes"]))
        whales = (await client.get("/api/whale_flows", params={"limit": 3})).json()
        print("whale fields:", sorted(whales))
        orders = (await client.get("/api/orders", params={"limit": 2})).json()
        print("orders:", [order["type"] for order in orders])
        print("datasets:", sorted((await client.get("/api/last_update")).json()))

        started = await client.post("/api/scans", json={"formula": "rsi14 < 30"})
        print("scan:", started.status_code, started.headers["location"])
        while True:
            body = (await client.get(started.headers["location"])).json()
            if body["scan"]["status"] != "running":
                break
            await trio.sleep(0.1)
        print(f"scan {body['scan']['status']}: {body['scan']['completed']} symbols")
        bad = await client.post("/api/scans", json={"formula": "rsi14 <"})
        print("bad formula:", bad.status_code, bad.json()["position"])
        engine.current_shutdown().request("the example is done")


if __name__ == "__main__":
    engine.run(main)
