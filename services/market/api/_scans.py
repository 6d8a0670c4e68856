"""``/api/scans``: start a scan with a formula, follow it, read its results, cancel it."""

from __future__ import annotations

import msgspec
from starlette.requests import Request
from starlette.routing import Route

from ..scans import FormulaError, Scans, ScansBusy
from ._body import read_body
from ._json import JSON
from ._params import BadRequest, limit, only
from ._shapes import ScanDetail

MAX_BODY = 16_384


class ScanRequest(msgspec.Struct, forbid_unknown_fields=True):
    """The body of ``POST /api/scans``."""

    formula: str
    symbols: list[str] | None = None


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
            scan = scans.start(wanted.formula, wanted.symbols)
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
        only(request, ("limit", "all"))
        scan = scans.get(request.path_params["scan_id"])
        if scan is None:
            return JSON({"error": f"no scan {request.path_params['scan_id']!r}"}, 404)
        if request.method == "DELETE":
            scan.cancel()
            return JSON(scan.summary(), 202)
        count = limit(request, default=100, maximum=len(scan.symbols))
        every = request.query_params.get("all", "false")
        if every not in ("true", "false"):
            raise BadRequest(f"all must be true or false, got {every!r}")
        results = scan.results() if every == "true" else scan.matches()
        return JSON(ScanDetail(scan.summary(), results[:count], scan.errors()[:count]))

    return [
        Route("/scans", start, methods=["POST"]),
        Route("/scans", listing, methods=["GET"]),
        Route("/scans/{scan_id}", one, methods=["GET", "DELETE"]),
    ]
