"""The simulated symbol universe: the listed names a scan covers, from a seed."""

from __future__ import annotations

import random
import string
from collections.abc import Iterable

from engine.lowlevel import check_count

from ._config import DEFAULT_SYMBOLS, MAX_UNIVERSE

DEFAULT_UNIVERSE = 2_500


def universe(
    count: int = DEFAULT_UNIVERSE, *, seed: int = 0, first: Iterable[str] = DEFAULT_SYMBOLS
) -> tuple[str, ...]:
    """``count`` distinct symbol names: ``first`` (the simulator's defaults), then generated ones.

    Generated names are three or four upper-case letters plus ``USDT``, drawn
    from ``seed``, so the same arguments give the same universe.

    Raises:
        ValueError: ``count`` is not an integer from 1 to 100,000.
    """
    check_count("count", count, minimum=1)
    if count > MAX_UNIVERSE:
        raise ValueError(f"count must be at most {MAX_UNIVERSE:,}, got {count!r}")
    names = list(dict.fromkeys(first))[:count]
    taken = set(names)
    draw = random.Random(seed)
    while len(names) < count:
        symbol = "".join(draw.choices(string.ascii_uppercase, k=draw.choice((3, 4)))) + "USDT"
        if symbol not in taken:
            taken.add(symbol)
            names.append(symbol)
    return tuple(names)
