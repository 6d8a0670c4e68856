"""``/api/orders``: the latest orders from the order-status log, newest first."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ..orders import OrderLog
from ._params import limit, only

MAX_ORDERS = 1_000


def routes(orders: OrderLog) -> list[Route]:
    """The order endpoint, served from ``orders``' recent history."""

    async def recent(request: Request) -> Response:
        only(request, ("limit",))
        count = limit(request, default=100, maximum=MAX_ORDERS)
        # Already encoded once when published: joined, not re-encoded.
        return Response(orders.recent_json(count), media_type="application/json")

    return [Route("/orders", recent, methods=["GET"])]
