"""An exchange simulator: Binance-format streams and REST on loopback, from a seed.

The market-data service's default feed, so the service runs with no network:
WebSocket streams (trade, aggTrade, bookTicker, depthUpdate, kline; raw and
combined), REST tickers and klines, deterministic from a seed, paced at a
configurable rate, with fault injection (drop, malformed frame, stall) for
tests; and, on request, a Hyperliquid-style order-status log file. See
``docs/simulator.md`` and ``docs/orders.md``.
"""

from __future__ import annotations

from ._config import DEFAULT_SYMBOLS as DEFAULT_SYMBOLS
from ._config import INTERVALS_MS as INTERVALS_MS
from ._config import MAX_UNIVERSE as MAX_UNIVERSE
from ._config import SimulatorConfig as SimulatorConfig
from ._history import MAX_HISTORY as MAX_HISTORY
from ._history import History as History
from ._instruments import Instrument as Instrument
from ._orderlog import generate_order_lines as generate_order_lines
from ._orderlog import write_order_log as write_order_log
from ._server import Simulator as Simulator
from ._server import SimulatorAddress as SimulatorAddress
from ._server import open_simulator as open_simulator
from ._server import serve_simulator as serve_simulator
from ._state import SimulatorStatistics as SimulatorStatistics
from ._universe import DEFAULT_UNIVERSE as DEFAULT_UNIVERSE
from ._universe import universe as universe
from ._weights import DEFAULT_WEIGHT_LIMIT as DEFAULT_WEIGHT_LIMIT

__all__ = [
    "DEFAULT_SYMBOLS",
    "DEFAULT_UNIVERSE",
    "DEFAULT_WEIGHT_LIMIT",
    "INTERVALS_MS",
    "MAX_HISTORY",
    "MAX_UNIVERSE",
    "History",
    "Instrument",
    "Simulator",
    "SimulatorAddress",
    "SimulatorConfig",
    "SimulatorStatistics",
    "generate_order_lines",
    "open_simulator",
    "serve_simulator",
    "universe",
    "write_order_log",
]
