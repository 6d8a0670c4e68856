"""``/api/scans``: start a scan with a formula, follow it, read its results, cancel it."""

from __future__ import annotations

import datetime

import msgspec
from starlette.requests import Request
from starlette.routing import Route

from ..candles import DateRange
from ..scans import FormulaError, Scans, ScansBusy
from ._body import read_body
from ._json import JSON
from ._params import BadRequest, limit, only
from ._shapes import ScanDetail

MAX_BODY = 16_384


class ScanRequest(msgspec.Struct, forbid_unknown_fields=True):
    """The body of ``POST /api/scans``.

    Attributes:
        formula: the condition, such as ``"rsi(period) < 30"``.
        symbols: the symbols to scan; the whole universe by default.
        timeframe: the bars' length (``"1d"``, ``"4h"`` ...); the service's default if omitted.
        start: the first day scanned (UTC, inclusive), ``"2024-01-01"``; with
            no ``start``, the service's default window of closed bars up to now.
        end: the last day scanned (UTC, inclusive); now if omitted.
        parameters: values of the formula's named parameters (``{"period": 14}``).
    """

    formula: str
    symbols: list[str] | None = None
    timeframe: str | None = None
    start: datetime.date | None = None
    end: datetime.date | None = None
    parameters: dict[str, int] = msgspec.field(default_factory=dict)


_DECODER = msgspec.json.Decoder(ScanRequest)


def routes(scans: Scans) -> list[Route]:
    """The scan endpoints, served by ``scans``."""

    async def start(request: Request) -> JSON:
        only(request, ())
        body = await read_body(request, MAX_BODY)
        try:
            wanted = _DECODER.decode(body)
        except msgspec.DecodeError as exc:
            example = '{"formula": "rsi14 < 30"}'
            raise BadRequest(f"the body must be JSON like {example}: {exc}") from None
        except msgspec.ValidationError as exc:
            raise BadRequest(f"invalid body: {exc}") from None
        unknown = sorted(set(wanted.symbols or ()) - set(scans.symbols))
        if unknown:
            raise BadRequest(f"unknown symbols: {', '.join(unknown[:10])}")
        try:
            scan = scans.start(
                wanted.formula,
                wanted.symbols,
                timeframe=wanted.timeframe,
                date_range=_date_range(wanted, scans.now_ms()),
                parameters=wanted.parameters,
            )
        except FormulaError as exc:
            raise BadRequest(str(exc), position=exc.position, formula=wanted.formula) from exc
        except ValueError as exc:
            raise BadRequest(str(exc)) from exc
        except ScansBusy as exc:
            return JSON({"error": str(exc)}, 429, headers={"retry-after": "1"})
        location = f"{request.scope.get('root_path', '')}/scans/{scan.id}"
        return JSON(scan.summary(), 202, headers={"location": location})

    async def listing(request: Request) -> JSON:
        only(request, ())
        return JSON([scan.summary() for scan in scans.list()])

    async def one(request: Request) -> JSON:
        only(request, ("limit", "all", "in_range"))
        scan = scans.get(request.path_params["scan_id"])
        if scan is None:
            return JSON({"error": f"no scan {request.path_params['scan_id']!r}"}, 404)
        if request.method == "DELETE":
            scan.cancel()
            return JSON(scan.summary(), 202)
        count = limit(request, default=100, maximum=len(scan.symbols))
        every, in_range = _flag(request, "all"), _flag(request, "in_range")
        if every and in_range:
            raise BadRequest("all and in_range are two views: ask for one")
        if every:
            results = scan.results()
        else:
            results = scan.matches_in_range() if in_range else scan.matches()
        return JSON(ScanDetail(scan.summary(), results[:count], scan.errors()[:count]))

    return [
        Route("/scans", start, methods=["POST"]),
        Route("/scans", listing, methods=["GET"]),
        Route("/scans/{scan_id}", one, methods=["GET", "DELETE"]),
    ]


def _flag(request: Request, name: str) -> bool:
    value = request.query_params.get(name, "false")
    if value not in ("true", "false"):
        raise BadRequest(f"{name} must be true or false, got {value!r}")
    return value == "true"


def _date_range(wanted: ScanRequest, now_ms: int) -> DateRange | None:
    if wanted.start is None:
        if wanted.end is not None:
            raise BadRequest("end needs start")
        return None
    if wanted.end is None:
        return DateRange(wanted.start, datetime.datetime.fromtimestamp(now_ms / 1000, datetime.UTC))
    if wanted.end < wanted.start:
        raise BadRequest(f"end ({wanted.end}) is before start ({wanted.start})")
    return DateRange(wanted.start, wanted.end)
