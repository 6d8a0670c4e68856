"""A test module as a user of the engine would write it (see docs/testing.md).

It tests ``refresh``, a small piece of a service: fetch a quote per symbol,
at most ``workers`` at once, giving each fetch ``fetch_deadline`` seconds.
The fetcher is a :class:`engine.testing.Scripted` fake, so the tests decide
how long each fetch "takes" and whether it fails or hangs; under pytest-trio's
``autojump_clock`` a 60 s deadline takes milliseconds and is asserted exactly.

Run it with ``pytest docs/examples/testing_example.py`` in a project whose
pytest configuration sets ``trio_mode = true``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable

import trio

from engine.testing import Fail, Finish, Hang, Scripted, Stopwatch

Fetch = Callable[[str], Awaitable[float]]


# --- the code under test ----------------------------------------------------


async def refresh(
    fetch: Fetch, symbols: list[str], *, fetch_deadline: float = 60, workers: int = 4
) -> dict[str, float | None]:
    """Fetch every symbol; a fetch that raises ValueError or times out gives None."""
    results: dict[str, float | None] = {}
    limiter = trio.CapacityLimiter(workers)

    async def fetch_one(symbol: str) -> None:
        results[symbol] = None
        async with limiter:
            with trio.move_on_after(fetch_deadline):
                with contextlib.suppress(ValueError):
                    results[symbol] = await fetch(symbol)

    async with trio.open_nursery() as nursery:
        for symbol in symbols:
            nursery.start_soon(fetch_one, symbol)
    return results


# --- the tests --------------------------------------------------------------


async def test_a_hung_fetch_is_cut_at_exactly_the_deadline(autojump_clock: trio.abc.Clock) -> None:
    fetch = Scripted(Hang())  # a stuck exchange: never answers

    with Stopwatch() as stopwatch:
        results = await refresh(fetch, ["BTCUSDT"])

    assert results == {"BTCUSDT": None}
    assert stopwatch.elapsed == 60  # 60 virtual seconds, a few real milliseconds
    assert fetch.records[0].status == "cancelled"


async def test_each_symbol_gets_its_own_script(autojump_clock: trio.abc.Clock) -> None:
    fakes = {
        "BTCUSDT": Scripted(Finish(64000.5, after=0.25)),
        "ETHUSDT": Scripted(Fail(ValueError, "malformed quote", after=1)),
        "SOLUSDT": Scripted(Hang(), Finish(150.0, after=2)),  # hangs once, then answers
    }

    async def fetch(symbol: str) -> float:
        quote: float = await fakes[symbol](symbol)
        return quote

    with Stopwatch() as first:
        results = await refresh(fetch, list(fakes))
    assert results == {"BTCUSDT": 64000.5, "ETHUSDT": None, "SOLUSDT": None}
    assert first.elapsed == 60
    assert fakes["BTCUSDT"].ended_at == [0.25]
    assert fakes["ETHUSDT"].ended_at == [1]

    with Stopwatch() as second:
        results = await refresh(fetch, ["SOLUSDT"])
    assert results == {"SOLUSDT": 150.0}
    assert second.elapsed == 2
    assert fakes["SOLUSDT"].started_at == [0, 60]


async def test_never_more_than_four_fetches_at_once(autojump_clock: trio.abc.Clock) -> None:
    fetch = Scripted(Finish(1.0, after=1))
    symbols = [f"SYM{i}" for i in range(10)]

    with Stopwatch() as stopwatch:
        await refresh(fetch, symbols, workers=4)

    assert fetch.calls == 10
    assert fetch.max_in_flight == 4
    assert stopwatch.elapsed == 3  # waves of 4, 4 and 2 one-second fetches
    assert sorted(call.args[0] for call in fetch.records) == sorted(symbols)
