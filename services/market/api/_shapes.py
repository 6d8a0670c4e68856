"""The bodies the API answers with, as typed values: the responses and the OpenAPI schema."""

from __future__ import annotations

import msgspec

from ..cycles import DatasetUpdate, Quote, SymbolFlow, WhaleTrade
from ..orders import Order
from ..scans import ScanSummary, SymbolError, SymbolResult


class Problem(msgspec.Struct):
    """Why a request was refused (400, 404, 405, 413, 429).

    Attributes:
        error: what is wrong, in words.
        position: for a formula error, the 0-based character it points at.
        formula: for a formula error, the formula as sent.
    """

    error: str
    position: int | None = None
    formula: str | None = None


class WatchlistBody(msgspec.Struct):
    """``GET /api/watchlist``.

    Attributes:
        updated_at: wall-clock seconds of the latest quote, ``null`` before one.
        quotes: the latest quote of each symbol that has answered.
        failed: symbols the latest cycle could not fetch, with the reason.
    """

    updated_at: float | None
    quotes: list[Quote]
    failed: dict[str, str]


class WhaleFlowsBody(msgspec.Struct):
    """``GET /api/whale_flows``.

    Attributes:
        updated_at: wall-clock seconds of the latest trade examined.
        whales: the latest whale trades, newest first, at most ``limit``.
        flows: each symbol's whale flow over the window.
    """

    updated_at: float | None
    whales: list[WhaleTrade]
    flows: dict[str, SymbolFlow]


class ScanDetail(msgspec.Struct):
    """``GET /api/scans/{id}``.

    Attributes:
        scan: where the scan is.
        results: the matches so far (every symbol's values with ``all=true``),
            in universe order, at most ``limit``.
        errors: symbols without a result, and why, at most ``limit``.
    """

    scan: ScanSummary
    results: list[SymbolResult]
    errors: list[SymbolError]


LastUpdate = dict[str, DatasetUpdate]
Orders = list[Order]
