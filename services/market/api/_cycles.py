"""``/api/watchlist``, ``/api/whale_flows`` and ``/api/last_update``: the cycles' datasets."""

from __future__ import annotations

from starlette.requests import Request
from starlette.routing import Route

from ..cycles import DatasetUpdate, Watchlist, WhaleFlows
from ._json import JSON
from ._params import limit, only
from ._shapes import WatchlistBody, WhaleFlowsBody

MAX_WHALES = 10_000


def routes(watchlist: Watchlist | None, whales: WhaleFlows | None) -> list[Route]:
    """The endpoints of whichever of the two parts run."""
    found: list[Route] = []

    async def last_update(request: Request) -> JSON:
        only(request, ())
        datasets: dict[str, DatasetUpdate] = {}
        if watchlist is not None:
            datasets |= watchlist.last_update()
        if whales is not None:
            datasets |= whales.last_update()
        return JSON(datasets)

    found.append(Route("/last_update", last_update, methods=["GET"]))

    if watchlist is not None:

        async def quotes(request: Request) -> JSON:
            only(request, ())
            update = watchlist.last_update()["watchlist"]
            quotes = list(watchlist.quotes().values())
            return JSON(WatchlistBody(update.updated_at, quotes, watchlist.failures()))

        found.append(Route("/watchlist", quotes, methods=["GET"]))

    if whales is not None:

        async def whale_flows(request: Request) -> JSON:
            only(request, ("limit",))
            count = limit(request, default=100, maximum=MAX_WHALES)
            updated = whales.last_update()["whale_flows"].updated_at
            return JSON(WhaleFlowsBody(updated, whales.recent(count), whales.flows()))

        found.append(Route("/whale_flows", whale_flows, methods=["GET"]))
    return found
