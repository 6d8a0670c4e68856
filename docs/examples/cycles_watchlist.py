"""A watchlist refresh cycle whose third refresh hangs, and the cycle goes on.

Seed 001's worker stalled for 27 hours when one request never answered. Here
the same hang is cut by the cycle deadline, logged, counted, and the next
tick refreshes the watchlist as if nothing happened.

Run it: ``python docs/examples/cycles_watchlist.py`` (about half a second).
"""

from __future__ import annotations

import logging

import attrs
import trio

import engine

SYMBOLS = ("BTCUSDT", "ETHUSDT", "SOLUSDT")


@attrs.define
class FakeExchange:
    """Answers a quote in 2 ms, except during one refresh, when it hangs."""

    hang_on_refresh: int
    refresh: int = 0

    async def quote(self, symbol: str) -> float:
        if self.refresh == self.hang_on_refresh:
            await trio.sleep_forever()  # the request that never answers
        await trio.sleep(0.002)
        return 100.0 + len(symbol)


@attrs.define
class Watchlist:
    prices: dict[str, float] = attrs.Factory(dict)
    refreshed: int = 0


async def refresh_watchlist(
    exchange: FakeExchange, watchlist: Watchlist, enough: trio.Event
) -> None:
    """One cycle: fetch every quote, then publish them together."""
    exchange.refresh += 1
    number = exchange.refresh
    try:
        prices = {symbol: await exchange.quote(symbol) for symbol in SYMBOLS}
    except trio.Cancelled:
        print(f"refresh {number}: cut by the cycle deadline")
        raise
    watchlist.prices = prices
    watchlist.refreshed += 1
    print(f"refresh {number}: updated {len(prices)} symbols")
    if number == 5:
        enough.set()


async def main() -> None:
    exchange = FakeExchange(hang_on_refresh=3)
    watchlist = Watchlist()
    enough = trio.Event()
    cycle = engine.Cycle(
        refresh_watchlist,
        exchange,
        watchlist,
        enough,
        interval=0.1,
        cycle_deadline=0.08,
        name="watchlist",
    )
    # A guard so the example always ends; five refreshes take about 0.45 s.
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            await nursery.start(cycle.run)
            await enough.wait()
            nursery.cancel_scope.cancel()

    stats = cycle.statistics()
    print(
        f"runs={stats.runs} successes={stats.successes} failures={stats.failures} "
        f"timeouts={stats.timeouts} overruns={stats.overruns} "
        f"skipped_ticks={stats.skipped_ticks}"
    )
    print(f"last_error: {stats.last_error}")
    last_ok, last_bad = stats.last_success_at, stats.last_failure_at
    recovered = last_ok is not None and last_bad is not None and last_ok > last_bad
    print(f"succeeded after the hang: {recovered}")
    print(f"watchlist refreshed {watchlist.refreshed} times")


if __name__ == "__main__":
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
    trio.run(main)
