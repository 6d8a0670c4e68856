"""The simulator's settings, and the kline intervals it knows."""

from __future__ import annotations

import math
import os

import attrs

from engine.lowlevel import check_count, check_name

from .._symbols import check_symbols, to_symbols
from ._weights import DEFAULT_WEIGHT_LIMIT

DEFAULT_SYMBOLS = ("BTCUSDT", "ETHUSDT", "BNBUSDT", "SOLUSDT", "XRPUSDT")
# The most symbols a universe lists; far below the 475,228 names of three or
# four letters, so drawing them stays quick.
MAX_UNIVERSE = 100_000

# Binance's interval names with a fixed length. "1M" (a calendar month) is
# left out: its length varies, and nothing here needs it.
INTERVALS_MS: dict[str, int] = {
    "1s": 1_000,
    "1m": 60_000,
    "3m": 180_000,
    "5m": 300_000,
    "15m": 900_000,
    "30m": 1_800_000,
    "1h": 3_600_000,
    "2h": 7_200_000,
    "4h": 14_400_000,
    "6h": 21_600_000,
    "8h": 28_800_000,
    "12h": 43_200_000,
    "1d": 86_400_000,
    "3d": 259_200_000,
    "1w": 604_800_000,
}


def _check_rate(instance: object, attribute: attrs.Attribute[float], value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"rate must be a number of messages per second, got {value!r}")
    if math.isnan(value) or value <= 0:
        raise ValueError(
            f"rate must be > 0 messages per second (math.inf: no limit), got {value!r}"
        )


def _to_path(value: str | os.PathLike[str] | None) -> str | None:
    return None if value is None else os.fspath(value)


def _check_order_log_rate(
    instance: object, attribute: attrs.Attribute[float], value: float
) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ValueError(f"order_log_rate must be > 0 lines per second, got {value!r}")


def _check_universe(instance: object, attribute: attrs.Attribute[int], value: int) -> None:
    check_count("universe", value)
    if value > MAX_UNIVERSE:
        raise ValueError(f"universe must be at most {MAX_UNIVERSE:,} symbols, got {value!r}")


def _check_weight_limit(instance: object, attribute: attrs.Attribute[int], value: int) -> None:
    check_count("weight_limit", value, minimum=1)


def _check_seed(instance: object, attribute: attrs.Attribute[int], value: int) -> None:
    check_count("seed", value)


def _check_host(instance: object, attribute: attrs.Attribute[str], value: str) -> None:
    check_name("host", value)


def _check_port(instance: object, attribute: attrs.Attribute[int], value: int) -> None:
    check_count("port", value)
    if value > 65535:
        raise ValueError(f"port must be <= 65535, got {value!r}")


def _check_epoch(
    instance: object, attribute: attrs.Attribute[int | None], value: int | None
) -> None:
    if value is not None:
        check_count("epoch_ms", value)


@attrs.frozen
class SimulatorConfig:
    """What the exchange simulator serves, how fast, and from which seed.

    Args:
        symbols: the upper-case symbols it lists (``"BTCUSDT"``); stream
            names use them in lower case (``"btcusdt@trade"``).
        rate: messages per second sent on each WebSocket connection, across
            all of that connection's streams; ``math.inf`` sends as fast as
            the connection takes them.
        seed: every price, quantity and id derives from it (>= 0).
        host: the address to bind; loopback by default.
        port: the port to bind, for WebSocket and REST alike; 0 picks a free
            one (see :attr:`Simulator.address`).
        epoch_ms: ``None`` stamps messages with the wall clock (so a consumer
            can measure latency). A number of milliseconds since the epoch
            starts a simulated clock there instead: each connection's
            message ``i`` is stamped ``epoch_ms + i * 1000 / rate`` (a rate of
            ``math.inf`` counts as 100,000 per second) and the REST history
            ends at ``epoch_ms``, so whole responses, timestamps included,
            repeat exactly from run to run.
        order_log: a file to append a Hyperliquid-style order-status log to
            (see ``docs/orders.md``), from the same seed, symbols and clock;
            ``None`` (default) writes none.
        order_log_rate: lines per second of that log.
        universe: how many symbols the REST API lists: ``symbols`` first,
            then generated names (see :func:`universe`), each with its
            klines and tickers. ``0`` (default) lists ``symbols`` only.
            Streams serve ``symbols`` alone either way.
        weight_limit: the REST request weight allowed per minute, as
            Binance's (6,000): answers carry ``X-MBX-USED-WEIGHT-1M``, and a
            request past the budget is answered 429 with ``Retry-After``.

    Raises:
        TypeError, ValueError: for a bad argument, named in the message.
    """

    symbols: tuple[str, ...] = attrs.field(
        default=DEFAULT_SYMBOLS, converter=to_symbols, validator=check_symbols
    )
    rate: float = attrs.field(default=1000.0, validator=_check_rate)
    seed: int = attrs.field(default=0, validator=_check_seed)
    host: str = attrs.field(default="127.0.0.1", validator=_check_host)
    port: int = attrs.field(default=0, validator=_check_port)
    epoch_ms: int | None = attrs.field(default=None, validator=_check_epoch)
    order_log: str | None = attrs.field(default=None, converter=_to_path)
    order_log_rate: float = attrs.field(default=100.0, validator=_check_order_log_rate)
    universe: int = attrs.field(default=0, validator=_check_universe)
    weight_limit: int = attrs.field(default=DEFAULT_WEIGHT_LIMIT, validator=_check_weight_limit)
