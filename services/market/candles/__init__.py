"""Candles: the repository seam that scans read history through, its stores, and a fetcher.

A :class:`CandleRepository` answers ``candles(symbol, timeframe, date_range)``
synchronously, inside worker processes, and pickles as a path or a DSN.
:class:`SqliteCandleStore` (one SQLite file, the embedded default) and
:class:`PostgresCandleStore` (psycopg 3) implement it and can be written;
:class:`CandleFetcher` fills either from an exchange's REST klines,
incrementally and within its rate limits. See ``docs/candles.md``.
"""

from __future__ import annotations

from ._fetcher import CandleFetcher as CandleFetcher
from ._fetcher import CandleFetchError as CandleFetchError
from ._fetcher import FetcherConfig as FetcherConfig
from ._fetcher import FetcherStatistics as FetcherStatistics
from ._fetcher import KlinesUnavailable as KlinesUnavailable
from ._fetcher import MalformedKlines as MalformedKlines
from ._fetcher import RateLimited as RateLimited
from ._fetcher import open_candle_fetcher as open_candle_fetcher
from ._model import TIMEFRAME_MS as TIMEFRAME_MS
from ._model import TIMEFRAMES as TIMEFRAMES
from ._model import CandleRepository as CandleRepository
from ._model import Candles as Candles
from ._model import CandleStore as CandleStore
from ._model import DateRange as DateRange
from ._model import UnknownSymbol as UnknownSymbol
from ._postgres import PostgresCandleStore as PostgresCandleStore
from ._sqlite import SqliteCandleStore as SqliteCandleStore

__all__ = [
    "TIMEFRAMES",
    "TIMEFRAME_MS",
    "CandleFetchError",
    "CandleFetcher",
    "CandleRepository",
    "CandleStore",
    "Candles",
    "DateRange",
    "FetcherConfig",
    "FetcherStatistics",
    "KlinesUnavailable",
    "MalformedKlines",
    "PostgresCandleStore",
    "RateLimited",
    "SqliteCandleStore",
    "UnknownSymbol",
    "open_candle_fetcher",
]
