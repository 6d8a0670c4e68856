"""Retry with backoff, and a circuit breaker per symbol, on a virtual clock.

A quote service that refuses the first two connections for each symbol,
and every one for NOPEUSDT. Each quote is retried (three attempts, seeded
full jitter, so the times below are the same on every run) inside the
symbol's circuit: NOPEUSDT's opens after three failed quotes and then fails
fast, BTCUSDT's is not touched. After the cooldown, of two callers at once
only one probes.

Run it: ``python docs/examples/resilience_example.py`` (instant: the clock is virtual).
"""

from __future__ import annotations

import httpx
import trio
import trio.testing

from engine import Backoff, CircuitBreaker, CircuitOpen, Retrying, transient_http_error

connections: dict[str, int] = {}


async def fetch(symbol: str) -> str:
    """One request to the quote service."""
    connections[symbol] = connections.get(symbol, 0) + 1
    await trio.sleep(0.1)
    if symbol == "NOPEUSDT" or connections[symbol] <= 2:
        raise httpx.ConnectError("connection refused")
    return "65000.00"


retrying = Retrying(
    attempts=3,
    backoff=Backoff(initial=0.5, maximum=4, jitter=0, seed=7),
    retry_on=transient_http_error,
    name="quotes",
)
breaker = CircuitBreaker(threshold=3, window=60, cooldown=30, name="quotes")


async def quote(symbol: str) -> None:
    try:
        price = await breaker.call(symbol, retrying.call, fetch, symbol)
    except CircuitOpen as exc:
        outcome = f"refused at once: {exc}"
    except httpx.ConnectError as exc:
        outcome = f"failed: {exc} ({'; '.join(exc.__notes__)})"
    else:
        outcome = f"{price} after {connections[symbol]} connection(s)"
    print(f"t={trio.current_time():7.3f} {symbol}: {outcome}")


async def main() -> None:
    await quote("BTCUSDT")
    for _ in range(4):
        await quote("NOPEUSDT")
    await quote("BTCUSDT")
    retry_at = breaker.retry_at("NOPEUSDT")
    assert retry_at is not None
    await trio.sleep_until(retry_at)
    async with trio.open_nursery() as nursery:  # two callers as the circuit half-opens
        nursery.start_soon(quote, "NOPEUSDT")
        nursery.start_soon(quote, "NOPEUSDT")
    r, b = retrying.statistics(), breaker.statistics()
    print(f"retry: {r.calls} calls, {r.attempts} attempts, {r.exhausted} gave up")
    print(f"breaker: opened {b.opened}, rejected {b.rejected}, states {b.states}")


if __name__ == "__main__":
    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
