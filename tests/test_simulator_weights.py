"""The simulator's REST lists a symbol universe and counts request weight as Binance does."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import httpx
import pytest
import trio

from services.market.simulator import (
    DEFAULT_SYMBOLS,
    SimulatorConfig,
    open_simulator,
    universe,
)
from services.market.simulator._weights import RequestWeights, ticker_weight

EPOCH = 1_700_000_000_000
GUARD = 30


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient() as client:
        yield client


async def test_the_universe_is_listed_on_rest_but_not_streamed(http: httpx.AsyncClient) -> None:
    names = universe(40, seed=3, first=("ETHUSDT",))
    with trio.fail_after(GUARD):
        async with open_simulator(
            SimulatorConfig(symbols=("ETHUSDT",), universe=40, seed=3, epoch_ms=EPOCH)
        ) as sim:
            base = sim.address.rest_url
            info = (await http.get(f"{base}/api/v3/exchangeInfo")).json()
            last = await http.get(
                f"{base}/api/v3/klines", params={"symbol": names[-1], "interval": "1d"}
            )
            unlisted = await http.get(
                f"{base}/api/v3/klines", params={"symbol": "ZZZZZUSDT", "interval": "1d"}
            )
    assert [s["symbol"] for s in info["symbols"]] == list(names)
    assert names[0] == "ETHUSDT"
    assert len(set(names)) == 40
    assert last.status_code == 200
    assert len(last.json()) == 500
    assert unlisted.status_code == 400
    assert unlisted.json()["code"] == -1121


def test_universe_starts_with_the_given_names_and_is_seeded() -> None:
    assert universe(3) == DEFAULT_SYMBOLS[:3]
    assert universe(100, seed=1) == universe(100, seed=1) != universe(100, seed=2)
    with pytest.raises(ValueError, match="count must be at most 100,000"):
        universe(100_001)
    with pytest.raises(ValueError, match="universe must be at most"):
        SimulatorConfig(universe=100_001)
    with pytest.raises(ValueError, match="weight_limit"):
        SimulatorConfig(weight_limit=0)


async def test_answers_carry_the_used_weight_and_refuse_past_the_budget(
    http: httpx.AsyncClient,
) -> None:
    # The budget is per wall-clock minute: a run that straddles a minute is run again.
    while True:
        minute = time.time() // 60
        with trio.fail_after(GUARD):
            async with open_simulator(SimulatorConfig(epoch_ms=EPOCH, weight_limit=24)) as sim:
                base = sim.address.rest_url
                params = {"symbol": "BTCUSDT", "interval": "1d", "limit": "2"}
                first = await http.get(f"{base}/api/v3/klines", params=params)
                bad = await http.get(f"{base}/api/v3/klines", params={"symbol": "BTCUSDT"})
                info = await http.get(f"{base}/api/v3/exchangeInfo")
                refused = await http.get(f"{base}/api/v3/klines", params=params)
        if time.time() // 60 == minute:
            break
    assert first.headers["x-mbx-used-weight-1m"] == "2"
    # A bad request is still counted, as Binance counts it.
    assert bad.status_code == 400
    assert bad.headers["x-mbx-used-weight-1m"] == "4"
    assert info.headers["x-mbx-used-weight-1m"] == "24"
    assert refused.status_code == 429
    assert refused.json()["code"] == -1003
    assert 1 <= int(refused.headers["retry-after"]) <= 60
    assert refused.headers["x-mbx-used-weight-1m"] == "24"  # a refusal spends nothing


def test_the_budget_renews_each_minute_and_retry_after_counts_to_it() -> None:
    now = [120.5]
    weights = RequestWeights(10, clock=lambda: now[0])
    assert weights.take(8) is None
    assert weights.take(3) == 60  # 179.5 rounds up to the minute at 180
    now[0] = 179.2
    assert weights.take(3) == 1
    now[0] = 180.0
    assert weights.take(3) is None
    assert weights.used == 3


def test_ticker_weight_follows_binance() -> None:
    assert ticker_weight({"symbol": "BTCUSDT"}) == 2
    assert ticker_weight({"symbols": ",".join(["A"] * 20)}) == 2
    assert ticker_weight({"symbols": ",".join(["A"] * 21)}) == 40
    assert ticker_weight({"symbols": ",".join(["A"] * 101)}) == 80
    assert ticker_weight({}) == 80
