"""The service's REST API: one Starlette app, mounted on the ops server at ``/api``."""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from ..cycles import Watchlist, WhaleFlows
from ..orders import OrderLog
from ..scans import Scans
from . import _cycles, _orders, _scans
from ._json import JSON
from ._openapi import openapi
from ._params import BadRequest


async def _bad_request(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, BadRequest)
    return JSON({"error": exc.reason, **exc.details}, 400)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return JSON({"error": exc.detail}, exc.status_code, headers=exc.headers)


def build_api(
    *,
    scans: Scans | None = None,
    watchlist: Watchlist | None = None,
    whales: WhaleFlows | None = None,
    orders: OrderLog | None = None,
) -> Starlette:
    """The ASGI app of ``/api``; mount it with ``serve_ops(routes={"/api": app})``.

    Each part is optional: an endpoint whose part is not running is absent (404).
    """
    description = openapi(
        scans=scans is not None,
        watchlist=watchlist is not None,
        whales=whales is not None,
        orders=orders is not None,
    )

    async def describe(request: Request) -> JSON:
        return JSON(description)

    routes: list[BaseRoute] = [Route("/openapi.json", describe, methods=["GET"])]
    routes += _cycles.routes(watchlist, whales)
    if scans is not None:
        routes += _scans.routes(scans)
    if orders is not None:
        routes += _orders.routes(orders)
    return Starlette(
        routes=routes,
        exception_handlers={BadRequest: _bad_request, HTTPException: _http_error},
    )
