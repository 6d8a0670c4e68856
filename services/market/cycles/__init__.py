"""Cycles: the watchlist's REST quotes and whale flows from the trade stream.

The watchlist is an :class:`engine.Cycle` whose requests, batches and
cycles each run under a cancel scope, so none can hang it; whale flows are
a bus consumer with nothing to hang on. See ``docs/watchlist.md`` and
``docs/whale-flows.md``.
"""

from __future__ import annotations

from ._config import WatchlistConfig as WatchlistConfig
from ._config import WhaleFlowConfig as WhaleFlowConfig
from ._quotes import DatasetUpdate as DatasetUpdate
from ._quotes import Quote as Quote
from ._watchlist import CycleReport as CycleReport
from ._watchlist import Watchlist as Watchlist
from ._watchlist import WatchlistStatistics as WatchlistStatistics
from ._watchlist import default_client as default_client
from ._whales import SymbolFlow as SymbolFlow
from ._whales import WhaleFlows as WhaleFlows
from ._whales import WhaleFlowStatistics as WhaleFlowStatistics
from ._whales import WhaleTrade as WhaleTrade

__all__ = [
    "CycleReport",
    "DatasetUpdate",
    "Quote",
    "SymbolFlow",
    "Watchlist",
    "WatchlistConfig",
    "WatchlistStatistics",
    "WhaleFlowConfig",
    "WhaleFlowStatistics",
    "WhaleFlows",
    "WhaleTrade",
    "default_client",
]
