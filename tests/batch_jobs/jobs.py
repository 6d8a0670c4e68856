"""Jobs with known behaviour, run in worker processes by the bridge and batch tests.

Each behaves according to its item, so one batch can mix successes, errors,
hangs and crashes and the tests can assert every item's outcome.
"""

from __future__ import annotations

import os
import signal
import threading
import time


def square(x: int) -> int:
    return x * x


def behave(item: tuple[str, int]) -> int:
    """``("ok", n)`` returns n*n; ``raise``, ``sleep``, ``spin``, ``kill``, ``exit`` misbehave."""
    kind, n = item
    if kind == "raise":
        raise ValueError(f"bad item {n}")
    if kind == "sleep":
        time.sleep(3600)
    if kind == "spin":
        while True:
            pass
    if kind == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if kind == "exit":
        os._exit(3)
    if kind == "segfault":
        import ctypes

        ctypes.string_at(0)
    if kind == "unpicklable_result":
        return threading.Lock()  # type: ignore[return-value]  # deliberately not picklable
    return n * n


def pid() -> int:
    return os.getpid()


def nap(seconds: float) -> float:
    """Work that takes ``seconds`` of wall time (for calls ended by the worker's clock)."""
    time.sleep(seconds)
    return seconds


def indicators(symbol_seed: int) -> dict[str, float]:
    """Seed 002's per-symbol job: a seeded random walk of 252 closes, EMA12/26, MACD, RSI14."""
    import numpy as np

    rng = np.random.default_rng(symbol_seed)
    closes = 100 * np.exp(np.cumsum(rng.normal(0, 0.02, 252)))

    def ema(values: np.ndarray, span: int) -> np.ndarray:
        alpha = 2 / (span + 1)
        out = np.empty_like(values)
        out[0] = values[0]
        for i in range(1, len(values)):
            out[i] = alpha * values[i] + (1 - alpha) * out[i - 1]
        return out

    macd = ema(closes, 12) - ema(closes, 26)
    signal_line = ema(macd, 9)
    deltas = np.diff(closes)
    gains = np.clip(deltas, 0, None)[-14:].mean()
    losses = -np.clip(deltas, None, 0)[-14:].mean()
    rsi = 100.0 if losses == 0 else 100 - 100 / (1 + gains / losses)
    return {
        "close": float(closes[-1]),
        "macd": float(macd[-1]),
        "signal": float(signal_line[-1]),
        "rsi14": float(rsi),
    }


def parse_order_line(line: str) -> dict[str, object] | None:
    """Seed 000's per-line job: one order-status log line to an order, or None if malformed."""
    import json

    try:
        record = json.loads(line)
        return {"oid": int(record["oid"]), "px": float(record["px"]), "status": record["status"]}
    except (ValueError, KeyError, TypeError):
        return None


# Set by the tests in their own process only; spawned workers import this afresh.
REFUSE_TO_LOAD = False


def _refuse_to_load() -> object:
    if REFUSE_TO_LOAD:
        raise RuntimeError("this result cannot be rebuilt in the parent")
    return object()


class LoadsOnlyInWorkers:
    """A result that pickles in the worker but cannot be unpickled in the test process."""

    def __reduce__(self) -> tuple[object, tuple[()]]:
        return (_refuse_to_load, ())


def fragile(x: int) -> object:
    """``x * x``, except 3, whose result cannot be loaded in the test process."""
    return LoadsOnlyInWorkers() if x == 3 else x * x


def slow_fragile(x: int) -> object:
    """:func:`fragile`, taking 60 ms of wall time (for calls ended by the worker's clock)."""
    time.sleep(0.06)
    return fragile(x)


def _never_loads() -> object:
    raise RuntimeError("this argument cannot be rebuilt in a worker")


class FailsToUnpickle:
    """An argument that pickles in the test process but cannot be unpickled anywhere."""

    def __reduce__(self) -> tuple[object, tuple[()]]:
        return (_never_loads, ())


def kind(x: object) -> str:
    return type(x).__name__
