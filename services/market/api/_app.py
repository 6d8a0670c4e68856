"""The service's REST API: one Starlette app, mounted on the ops server at ``/api``."""

from __future__ import annotations

import hmac

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Receive, Scope, Send

from ..cycles import Watchlist, WhaleFlows
from ..orders import OrderLog
from ..scans import Scans
from ..store import FailureHistory
from . import _cycles, _history, _orders, _scans
from ._json import JSON
from ._openapi import openapi
from ._params import BadRequest

# Methods that only read; every other method needs the token when one is set.
OPEN_METHODS = frozenset({"GET", "HEAD"})


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
    history: FailureHistory | None = None,
    token: str | None = None,
) -> Starlette:
    """The ASGI app of ``/api``; mount it with ``serve_ops(routes={"/api": app})``.

    Each part is optional: an endpoint whose part is not running is absent (404).

    Args:
        scans: serves ``/api/scans``.
        watchlist: serves ``/api/watchlist``.
        whales: serves ``/api/whale_flows``.
        orders: serves ``/api/orders``.
        history: serves ``/api/history/failures``.
        token: when set, every request but a ``GET`` or ``HEAD`` (starting
            or cancelling a scan) must carry ``Authorization: Bearer <token>``,
            or is answered 401 with ``WWW-Authenticate: Bearer`` before its
            body is read. Reads stay open.

    Raises:
        TypeError, ValueError: ``token`` is not a string, or is empty or
            not printable ASCII without spaces (what a header carries as is).
    """
    if token is not None:
        _check_token(token)
    description = openapi(
        scans=scans is not None,
        watchlist=watchlist is not None,
        whales=whales is not None,
        orders=orders is not None,
        history=history is not None,
        token=token is not None,
    )

    async def describe(request: Request) -> JSON:
        return JSON(description)

    routes: list[BaseRoute] = [Route("/openapi.json", describe, methods=["GET"])]
    routes += _cycles.routes(watchlist, whales)
    if scans is not None:
        routes += _scans.routes(scans)
    if orders is not None:
        routes += _orders.routes(orders)
    if history is not None:
        routes += _history.routes(history)
    middleware = [] if token is None else [Middleware(RequireToken, token=token)]
    return Starlette(
        routes=routes,
        middleware=middleware,
        exception_handlers={BadRequest: _bad_request, HTTPException: _http_error},
    )


def _check_token(token: object) -> None:
    # The value is a secret: the messages never show it.
    if not isinstance(token, str):
        raise TypeError(f"token must be a str, got {type(token).__name__}")
    if not token or not token.isascii() or not token.isprintable() or " " in token:
        raise ValueError("token must be a non-empty printable ASCII string without spaces")


class RequireToken:
    """Refuses requests that change something unless they carry the bearer token.

    Args:
        app: the app behind.
        token: the token ``Authorization: Bearer`` must carry.
    """

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app = app
        self._expected = token.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in OPEN_METHODS:
            await self.app(scope, receive, send)
            return
        problem = self._problem(scope)
        if problem is None:
            await self.app(scope, receive, send)
            return
        challenge, error = problem
        response = JSON({"error": error}, 401, headers={"www-authenticate": challenge})
        await response(scope, receive, send)

    def _problem(self, scope: Scope) -> tuple[str, str] | None:
        """``None`` when authorized, or the challenge and the reason (RFC 6750)."""
        values = [value for key, value in scope["headers"] if key == b"authorization"]
        if not values:
            return 'Bearer realm="api"', "this request needs Authorization: Bearer <token>"
        scheme, _, presented = values[0].partition(b" ")
        # compare_digest takes as long whatever the bytes: the answer's timing
        # does not tell how much of a guess was right.
        if scheme.lower() == b"bearer" and hmac.compare_digest(presented.strip(), self._expected):
            return None
        return 'Bearer realm="api", error="invalid_token"', "the bearer token is not valid"
