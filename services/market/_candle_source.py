"""The exchange of the ``scan`` command: the embedded simulator, and a fetcher filling a store.

The ``scan`` command reads candles from a store in its worker processes; the
fetcher fills that store first from the simulator's REST klines, with only
what is missing (``CandleFetcher.fill_each``, the scans' ``fill``).
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from .candles import CandleFetcher, CandleStore, FetcherConfig, open_candle_fetcher
from .simulator import DEFAULT_SYMBOLS, SimulatorConfig, open_simulator

#: The request weight a minute the embedded simulator allows the service and
#: the ``scan`` command: a loopback exchange of their own, so far above
#: Binance's 6,000, and the fetcher's budget against it.
SIMULATOR_WEIGHT_LIMIT = 1_000_000


@asynccontextmanager
async def open_simulated_exchange(
    store: CandleStore, *, universe: int, seed: int, anchor_ms: int
) -> AsyncIterator[CandleFetcher]:
    """The embedded simulator listing a ``universe`` of symbols, "now" at ``anchor_ms``.

    Yields:
        A fetcher filling ``store`` from it.
    """
    simulated = SimulatorConfig(
        symbols=DEFAULT_SYMBOLS[:universe],
        universe=universe,
        seed=seed,
        epoch_ms=anchor_ms,
        rate=math.inf,
        weight_limit=SIMULATOR_WEIGHT_LIMIT,
    )
    budget = FetcherConfig(weight_budget=SIMULATOR_WEIGHT_LIMIT)
    async with (
        open_simulator(simulated) as simulator,
        open_candle_fetcher(store, simulator.address.rest_url, budget) as fetcher,
    ):
        yield fetcher
