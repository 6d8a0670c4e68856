"""The REST side's past: deterministic candles for any symbol, interval and time.

Each (symbol, interval) has its own seeded random walk of the log price,
indexed by candle number relative to the anchor (the simulator's start, or
``epoch_ms``), where the walk is 0: the candle holding the anchor closes at
the symbol's base price, the price the live streams start from. Steps come
in blocks of 1,024 candles, each block drawn from its own seed, so any range
of the past costs only the blocks between it and the anchor, and the same
candle always has the same values whichever request asks for it. Different
intervals are independent walks that meet at the anchor. Far from the anchor
the walk is squashed (``A * tanh(W / A)``) so prices stay within a factor of
about 20 of the base price however long the history asked for.
"""

from __future__ import annotations

import functools
import math

import attrs
import numpy as np
import numpy.typing as npt

from ._instruments import Instrument

_BLOCK = 1024
# How many candles before the anchor exist (91 days of 1m, 15 years of 1h);
# earlier ones are not returned, as before a symbol was listed. It also caps
# the work of one request (about 130 blocks, tens of milliseconds).
MAX_HISTORY = 2**17
# Standard deviation of the log price over one second (about 6 % a day).
_SIGMA_PER_SECOND = 2e-4
# The log price's bound away from the base price (a factor of e**3 ~ 20 either way).
_LEVEL_BOUND = 3.0
# Blocks are seeded by index; offsetting keeps every seed word non-negative.
_BLOCK_OFFSET = 2**40
_TRADE_VALUE = 400.0

Floats = npt.NDArray[np.float64]


@functools.lru_cache(maxsize=128)
def _block(seed: int, key: int, interval_ms: int, block: int) -> Floats:
    """Four standard normals per candle for one block of 1,024 candles."""
    rng = np.random.default_rng([seed, key, interval_ms, block + _BLOCK_OFFSET])
    draws = rng.standard_normal((_BLOCK, 4))
    draws.flags.writeable = False  # cached and shared between requests
    return draws


@attrs.frozen
class Candles:
    """Consecutive candles, one array element each (private).

    Attributes:
        open_time: milliseconds since the epoch.
        open, high, low, close: prices.
        volume: base-asset volume; ``quote`` the quote-asset volume.
        trades: number of trades.
        taker_base, taker_quote: the part bought by takers.
    """

    open_time: npt.NDArray[np.int64]
    open: Floats
    high: Floats
    low: Floats
    close: Floats
    volume: Floats
    quote: Floats
    trades: npt.NDArray[np.int64]
    taker_base: Floats
    taker_quote: Floats

    def __len__(self) -> int:
        return len(self.open_time)


@attrs.frozen
class History:
    """Candles of every instrument, anchored at ``anchor_ms``.

    Args:
        seed: the simulator's seed.
        anchor_ms: where every walk is at its base price.
    """

    seed: int
    anchor_ms: int

    def candles(
        self, instrument: Instrument, interval_ms: int, first_open: int, count: int
    ) -> Candles:
        """``count`` candles from the one opening at ``first_open`` (a multiple
        of ``interval_ms``)."""
        first = first_open // interval_ms - self.anchor_ms // interval_ms
        draws = self._draws(instrument, interval_ms, first, first + count - 1)
        sigma = _SIGMA_PER_SECOND * math.sqrt(interval_ms / 1000)
        levels = self._levels(instrument, interval_ms, first, first + count - 1, sigma)
        opens = instrument.base_price * np.exp(levels[:-1])
        closes = instrument.base_price * np.exp(levels[1:])
        highs = np.maximum(opens, closes) * np.exp(0.5 * sigma * np.abs(draws[:, 1]))
        lows = np.minimum(opens, closes) * np.exp(-0.5 * sigma * np.abs(draws[:, 2]))
        quote = instrument.quote_per_second * interval_ms / 1000 * np.exp(0.5 * draws[:, 3] - 0.125)
        volume = quote / ((opens + highs + lows + closes) / 4)
        taker = 0.5 + 0.15 * np.tanh(draws[:, 1] - draws[:, 2])
        return Candles(
            open_time=first_open + interval_ms * np.arange(count, dtype=np.int64),
            open=opens,
            high=highs,
            low=lows,
            close=closes,
            volume=volume,
            quote=quote,
            trades=np.maximum(1, np.round(quote / _TRADE_VALUE)).astype(np.int64),
            taker_base=volume * taker,
            taker_quote=quote * taker,
        )

    def _draws(self, instrument: Instrument, interval_ms: int, first: int, last: int) -> Floats:
        """The normals of candles ``first..last`` (relative to the anchor)."""
        blocks = [
            _block(self.seed, instrument.key, interval_ms, block)
            for block in range(first // _BLOCK, last // _BLOCK + 1)
        ]
        start = first - (first // _BLOCK) * _BLOCK
        return np.concatenate(blocks)[start : start + last - first + 1]

    def _levels(
        self, instrument: Instrument, interval_ms: int, first: int, last: int, sigma: float
    ) -> Floats:
        """The walk ``W`` at ``first - 1 .. last``, where ``W(0) = 0`` and
        ``W(x) - W(x - 1)`` is candle ``x``'s step."""
        low, high = min(first - 1, 0), max(last, 0)
        steps = self._draws(instrument, interval_ms, low + 1, high)[:, 0] * sigma
        walk = np.concatenate(([0.0], np.cumsum(steps)))  # W(x) - W(low) at x = low..high
        walk -= walk[-low]  # now W(0) = 0
        levels = walk[first - 1 - low : last - low + 1]
        return _LEVEL_BOUND * np.tanh(levels / _LEVEL_BOUND)

    def earliest_open(self, interval_ms: int) -> int:
        """The open time of the first candle that exists at this interval."""
        return max(0, (self.anchor_ms // interval_ms - MAX_HISTORY) * interval_ms)
