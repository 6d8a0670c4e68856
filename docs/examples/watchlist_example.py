"""One watchlist cycle against the embedded exchange simulator.

The simulator serves Binance's REST endpoints on loopback, deterministic by
seed; with ``epoch_ms`` set its "now" is fixed too, so the quotes below are
the same on every run. NOPEUSDT is not listed: the exchange rejects the
batch that holds it, that batch asks for its symbols one at a time, and only
NOPEUSDT fails.

Run it: ``python docs/examples/watchlist_example.py`` (well under a second).
"""

from __future__ import annotations

import logging

import trio

from services.market.cycles import Watchlist, WatchlistConfig
from services.market.simulator import SimulatorConfig, open_simulator

LISTED = ("BTCUSDT", "ETHUSDT", "SOLUSDT", "BNBUSDT")
WATCHED = ("BTCUSDT", "ETHUSDT", "NOPEUSDT", "SOLUSDT", "BNBUSDT")


async def main() -> None:
    exchange = SimulatorConfig(symbols=LISTED, seed=1, epoch_ms=1_700_000_000_000)
    # A guard so the example always ends; the cycle takes a few milliseconds.
    with trio.fail_after(10):
        async with open_simulator(exchange) as simulator:
            config = WatchlistConfig(simulator.address.rest_url, WATCHED, batch_size=2)
            watchlist = Watchlist(config)
            async with trio.open_nursery() as nursery:
                await nursery.start(watchlist.run)
                report = await watchlist.wait_cycle()
                nursery.cancel_scope.cancel()

    print(
        f"cycle {report.number}: {report.outcome}, {len(report.ok)} ok, {len(report.failed)} failed"
    )
    for q in watchlist.quotes().values():
        print(
            f"{q.symbol:<8} last={q.last_price:>9.2f} change={q.change_pct:+7.3f}% "
            f"bid={q.bid:>9.2f} ask={q.ask:>9.2f} volume={q.volume:>13,.2f}"
        )
    for symbol, reason in report.failed.items():
        print(f"{symbol}: {reason}")
    stats = watchlist.statistics()
    print(
        f"requests cut: {stats.request_timeouts}, batches split: {stats.split_batches}, "
        f"symbols rejected: {stats.rejected_symbols}"
    )


if __name__ == "__main__":
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
    trio.run(main)
