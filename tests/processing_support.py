"""Picklable candle repositories for the processing tests (they run in worker processes).

Symbols choose their fate by name, so one repository serves every test:
``BAD...`` is unknown, ``SLOW...`` sleeps past any deadline, ``NAP...``
sleeps for ``NAP_SECONDS`` then has candles, ``CRASH...`` kills its worker,
``RAISE...`` raises an error with a message; any other
name has deterministic candles (a random walk seeded by the name).
"""

from __future__ import annotations

import os
import threading
import time
import zlib
from collections.abc import Iterable

import attrs
import numpy as np

from services.market.candles import TIMEFRAME_MS, Candles, DateRange, UnknownSymbol

#: The first bar every symbol has: its walk starts here, so a bar's values do
#: not depend on the range asked for.
ORIGIN_MS = 1_672_531_200_000  # 2023-01-01T00:00:00Z
#: How long a ``NAP...`` symbol sleeps in its worker.
NAP_SECONDS = 1.0


@attrs.frozen
class SyntheticRepository:
    """Deterministic candles from ``ORIGIN_MS`` on; fates by name (see the module)."""

    seed: int = 0

    def candles(self, symbol: str, timeframe: str, date_range: DateRange) -> Candles:
        """``symbol``'s bars opening in ``date_range``."""
        if symbol.startswith("BAD"):
            raise UnknownSymbol(symbol, timeframe)
        if symbol.startswith("RAISE"):
            raise RuntimeError(f"store unavailable for {symbol}")
        if symbol.startswith("SLOW"):
            time.sleep(3600)  # killed at its deadline
        if symbol.startswith("NAP"):
            time.sleep(NAP_SECONDS)
        if symbol.startswith("CRASH"):
            os._exit(3)
        step = TIMEFRAME_MS[timeframe]
        end = date_range.end_ms()
        count = max(0, -(-(end - ORIGIN_MS) // step))
        times = ORIGIN_MS + step * np.arange(count, dtype=np.int64)
        rng = np.random.default_rng([self.seed, zlib.crc32(symbol.encode())])
        returns = rng.normal(0.0, 0.02, count)
        close = 100.0 * np.exp(np.cumsum(returns))
        opens = np.concatenate(([100.0], close[:-1]))
        spread = np.abs(rng.normal(0.0, 0.01, count)) * close
        high = np.maximum(opens, close) + spread
        low = np.minimum(opens, close) - spread
        volume = rng.uniform(1.0, 1000.0, count)
        return Candles(times, opens, high, low, close, volume).between(date_range.start_ms(), end)


@attrs.frozen
class UnpicklableRepository:
    """A repository holding a lock, which cannot be pickled."""

    lock: threading.Lock = attrs.Factory(threading.Lock)

    def candles(self, symbol: str, timeframe: str, date_range: DateRange) -> Candles:
        """Never reached: the engine refuses it before submitting."""
        raise AssertionError("an unpicklable repository reached a worker")


def child_pids() -> set[int]:
    """The live (not zombie) child processes of this process, from ``/proc``."""
    me = os.getpid()
    found: set[int] = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError:
            continue  # ended meanwhile
        if int(fields[1]) == me and fields[0] != "Z":
            found.add(int(entry))
    return found


def exists(pid: int) -> bool:
    """Whether ``pid`` is still a process (a zombie not yet reaped counts)."""
    return os.path.exists(f"/proc/{pid}")


def rss_bytes(pids: Iterable[int]) -> int:
    """The resident memory of these processes together (``VmRSS``), in bytes."""
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
    return total
