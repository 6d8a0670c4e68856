"""``/api/history/failures``: the watchlist's stored failure history, filtered."""

from __future__ import annotations

import datetime

import msgspec
from starlette.requests import Request
from starlette.routing import Route

from .._symbols import check_symbol
from ..store import KINDS, FailureHistory, FailureRecord
from ._json import JSON
from ._params import BadRequest, integer, limit, only

MAX_FAILURES = 10_000
# Milliseconds since the epoch up to the year 9999: what a client could mean by ``since``.
_MAX_MS = 253_402_300_799_999


class FailureRow(msgspec.Struct):
    """One stored failure.

    Attributes:
        at: when, in UTC, ISO 8601 with milliseconds (``2023-11-14T22:13:20.125Z``).
        at_ms: the same, in milliseconds since the epoch.
        cycle: the watchlist cycle it happened in.
        symbol: the symbol.
        kind: ``"timeout"``, ``"error"`` or ``"breaker"``.
        detail: the reason, or the circuit's change (``"closed->open"``).
    """

    at: str
    at_ms: int
    cycle: int
    symbol: str
    kind: str
    detail: str


class FailuresBody(msgspec.Struct):
    """``GET /api/history/failures``: the matching failures, newest first.

    Attributes:
        failures: at most ``limit`` of them.
        count: how many are in ``failures``.
    """

    failures: list[FailureRow]
    count: int


def _utc(at_ms: int) -> str:
    moment = datetime.datetime.fromtimestamp(at_ms / 1000, datetime.UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _row(record: FailureRecord) -> FailureRow:
    return FailureRow(
        _utc(record.at_ms), record.at_ms, record.cycle, record.symbol, record.kind, record.detail
    )


def _since(request: Request) -> int | None:
    """``since``: milliseconds since the epoch, or an ISO 8601 time with its offset."""
    raw = request.query_params.get("since")
    if raw is None:
        return None
    if raw.isascii() and raw.isdigit():
        return integer(request, "since", default=0, minimum=0, maximum=_MAX_MS)
    try:
        moment = datetime.datetime.fromisoformat(raw)
    except ValueError:
        moment = None
    if moment is None or moment.tzinfo is None:
        raise BadRequest(
            "since must be milliseconds since the epoch (1700000000000) or an ISO 8601 "
            f"time with its offset (2023-11-14T22:13:20Z), got {raw!r}"
        )
    return round(moment.timestamp() * 1000)


def _symbol(request: Request) -> str | None:
    raw = request.query_params.get("symbol")
    if raw is None:
        return None
    try:
        return check_symbol("symbol", raw)
    except ValueError as exc:
        raise BadRequest(str(exc)) from None


def _kind(request: Request) -> str | None:
    raw = request.query_params.get("kind")
    if raw is not None and raw not in KINDS:
        raise BadRequest(f"kind must be one of {', '.join(KINDS)}, got {raw!r}")
    return raw


def routes(history: FailureHistory) -> list[Route]:
    """The endpoint reading ``history``."""

    async def failures(request: Request) -> JSON:
        only(request, ("symbol", "since", "kind", "limit"))
        symbol, since, kind = _symbol(request), _since(request), _kind(request)
        count = limit(request, default=1000, maximum=MAX_FAILURES)
        records = await history.query(symbol=symbol, since_ms=since, kind=kind, limit=count)
        return JSON(FailuresBody([_row(r) for r in records], len(records)))

    return [Route("/history/failures", failures, methods=["GET"])]
