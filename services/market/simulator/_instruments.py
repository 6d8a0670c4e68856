"""What the simulator knows about each symbol: price level, precision, ids.

Both the live streams and the REST history start from these values, so a
stream's first prices and ids continue where the REST history ends.
"""

from __future__ import annotations

import math
import zlib

import attrs

# Rough real levels for the common symbols; others get a level from a hash
# of their name, so any symbol works and always looks the same.
_KNOWN_PRICES = {
    "BTCUSDT": 65_000.0,
    "ETHUSDT": 3_500.0,
    "BNBUSDT": 600.0,
    "SOLUSDT": 150.0,
    "XRPUSDT": 0.6,
    "ADAUSDT": 0.45,
    "DOGEUSDT": 0.15,
}


@attrs.frozen
class Instrument:
    """One symbol's fixed parameters.

    Attributes:
        symbol: upper case, as in message bodies.
        lower: lower case, as in stream names.
        key: a stable number derived from the name (``hash`` is salted per run).
        base_price: the price at the anchor time; streams start from it.
        price_decimals: the tick size is ``10 ** -price_decimals``.
        qty_decimals: the lot size is ``10 ** -qty_decimals``.
        quote_per_second: typical traded value per second, for volumes.
        first_trade_id: the first trade id a stream sends.
        first_update_id: the first order-book update id a stream sends.
    """

    symbol: str
    lower: str
    key: int
    base_price: float
    price_decimals: int
    qty_decimals: int
    quote_per_second: float
    first_trade_id: int
    first_update_id: int

    @classmethod
    def create(cls, symbol: str, seed: int) -> Instrument:
        """The parameters of ``symbol`` under ``seed``."""
        key = zlib.crc32(symbol.encode())
        price = _KNOWN_PRICES.get(symbol) or 10 ** ((key % 600) / 100 - 2)
        magnitude = math.floor(math.log10(price))
        salted = zlib.crc32(f"{seed}:{symbol}".encode())
        return cls(
            symbol=symbol,
            lower=symbol.lower(),
            key=key,
            base_price=price,
            price_decimals=min(8, max(2, 4 - magnitude)),
            qty_decimals=min(8, max(0, magnitude + 1)),
            quote_per_second=2_000.0 * (1 + (key >> 10) % 50),
            first_trade_id=1_000_000 + salted % 1_000_000_000,
            first_update_id=10_000_000 + (salted >> 3) % 1_000_000_000,
        )


def instruments(symbols: tuple[str, ...], seed: int) -> dict[str, Instrument]:
    """Every symbol's parameters under ``seed``, by upper-case symbol."""
    return {symbol: Instrument.create(symbol, seed) for symbol in symbols}
