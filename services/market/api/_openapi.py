"""The OpenAPI description of ``/api``, built from the same types the endpoints answer with."""

from __future__ import annotations

from typing import Any

import msgspec

from ..scans import ScanSummary
from ._scans import MAX_BODY, ScanRequest
from ._shapes import LastUpdate, Orders, Problem, ScanDetail, WatchlistBody, WhaleFlowsBody

_REF = "#/components/schemas/{name}"


def _limit(default: int, maximum: int) -> dict[str, Any]:
    return {
        "name": "limit",
        "in": "query",
        "required": False,
        "schema": {"type": "integer", "minimum": 1, "maximum": maximum, "default": default},
    }


def openapi(
    *, scans: bool, watchlist: bool, whales: bool, orders: bool, token: bool = False
) -> dict[str, Any]:
    """The description of the endpoints that are served, as a JSON-ready dict."""
    types: list[Any] = [
        Problem, LastUpdate, WatchlistBody, WhaleFlowsBody, Orders, ScanRequest, ScanSummary,
        ScanDetail, list[ScanSummary],
    ]  # fmt: skip
    refs, components = msgspec.json.schema_components(types, ref_template=_REF)
    schema = dict(zip(["problem", "last_update", "watchlist", "whales", "orders", "scan_request",
                       "scan", "scan_detail", "scans"], refs, strict=True))  # fmt: skip

    def answer(description: str, body: str, **errors: str) -> dict[str, Any]:
        responses = {"200": {"description": description, "content": _json(schema[body])}}
        for code, why in errors.items():
            responses[code.lstrip("_")] = {"description": why, "content": _json(schema["problem"])}
        return responses

    paths: dict[str, Any] = {
        "/api/last_update": {
            "get": {
                "summary": "When each dataset last changed",
                "responses": answer("by dataset", "last_update"),
            }
        }
    }
    if watchlist:
        paths["/api/watchlist"] = {
            "get": {
                "summary": "The watchlist's latest quotes",
                "responses": answer("the quotes", "watchlist"),
            }
        }
    if whales:
        paths["/api/whale_flows"] = {
            "get": {
                "summary": "Latest whale trades and each symbol's whale flow",
                "parameters": [_limit(100, 10_000)],
                "responses": answer("whales and flows", "whales", _400="a bad limit"),
            }
        }
    if orders:
        paths["/api/orders"] = {
            "get": {
                "summary": "The latest orders from the order-status log, newest first",
                "parameters": [_limit(100, 1_000)],
                "responses": answer("orders", "orders", _400="a bad limit"),
            }
        }
    # With a token, what is not a read needs it (401 without it).
    secured: dict[str, Any] = {"security": [{"bearer": []}]} if token else {}
    unauthorized = (("401", "no or a wrong bearer token"),) if token else ()
    if scans:
        accepted = {"description": "started", "content": _json(schema["scan"])}
        refusals = (
            ("400", "a bad body, formula, symbol or parameter"),
            *unauthorized,
            ("408", "the body did not all arrive: the connection closed or stalled"),
            ("413", f"a body over {MAX_BODY} bytes (declared or sent)"),
            ("429", "a scan is already running"),
        )
        paths["/api/scans"] = {
            "post": {
                "summary": "Start a scan of the universe with a formula",
                "requestBody": {"required": True, "content": _json(schema["scan_request"])},
                "responses": {
                    "202": accepted,
                    **{
                        code: {"description": why, "content": _json(schema["problem"])}
                        for code, why in refusals
                    },
                },
                **secured,
            },
            "get": {"summary": "The scans kept", "responses": answer("newest first", "scans")},
        }
        scan_id = {"name": "scan_id", "in": "path", "required": True, "schema": {"type": "string"}}
        every = {
            "name": "all",
            "in": "query",
            "required": False,
            "schema": {"type": "boolean", "default": False},
        }
        paths["/api/scans/{scan_id}"] = {
            "parameters": [scan_id],
            "get": {
                "summary": "A scan's progress, then its results",
                "parameters": [_limit(100, 100_000), every],
                "responses": answer(
                    "the scan", "scan_detail", _400="a bad parameter", _404="no such scan"
                ),
            },
            "delete": {
                "summary": "Cancel a scan",
                "responses": {
                    "202": accepted,
                    **{
                        code: {"description": why, "content": _json(schema["problem"])}
                        for code, why in (*unauthorized, ("404", "no such scan"))
                    },
                },
                **secured,
            },
        }
    parts: dict[str, Any] = {"schemas": components}
    if token:
        parts["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    return {
        "openapi": "3.1.0",
        "info": {"title": "market service API", "version": "1"},
        "paths": paths,
        "components": parts,
    }


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}
