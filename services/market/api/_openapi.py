"""The OpenAPI description of ``/api``, built from the same types the endpoints answer with."""

from __future__ import annotations

from typing import Any

import msgspec

from ..scans import ScanSummary
from ..store import KINDS
from ._history import MAX_FAILURES, FailuresBody
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
    *,
    scans: bool,
    watchlist: bool,
    whales: bool,
    orders: bool,
    history: bool = False,
    token: bool = False,
) -> dict[str, Any]:
    """The description of the endpoints that are served, as a JSON-ready dict."""
    types: list[Any] = [
        Problem, LastUpdate, WatchlistBody, WhaleFlowsBody, Orders, ScanRequest, ScanSummary,
        ScanDetail, list[ScanSummary], FailuresBody,
    ]  # fmt: skip
    refs, components = msgspec.json.schema_components(types, ref_template=_REF)
    schema = dict(zip(["problem", "last_update", "watchlist", "whales", "orders", "scan_request",
                       "scan", "scan_detail", "scans", "failures"], refs, strict=True))  # fmt: skip

    def refusals(*reasons: tuple[str, str]) -> dict[str, Any]:
        problem = _json(schema["problem"])
        return {code: {"description": why, "content": problem} for code, why in reasons}

    def read(
        summary: str, description: str, body: str, *reasons: tuple[str, str], **more: Any
    ) -> dict[str, Any]:
        """A GET answering ``body``, or a problem for ``reasons``; ``more``: its other fields."""
        ok = {"description": description, "content": _json(schema[body])}
        return {"get": {"summary": summary, **more, "responses": {"200": ok, **refusals(*reasons)}}}

    def limited(summary: str, description: str, body: str, most: int) -> dict[str, Any]:
        """A read of the newest ``limit`` items (100 unless asked), at most ``most``."""
        bad_limit = ("400", "a bad limit")
        return read(summary, description, body, bad_limit, parameters=[_limit(100, most)])

    paths: dict[str, Any] = {
        "/api/last_update": read("When each dataset last changed", "by dataset", "last_update")
    }
    if watchlist:
        paths["/api/watchlist"] = read("The watchlist's latest quotes", "the quotes", "watchlist")
    if whales:
        paths["/api/whale_flows"] = limited(
            "Latest whale trades and each symbol's whale flow", "whales and flows", "whales", 10_000
        )
    if orders:
        paths["/api/orders"] = limited(
            "The latest orders from the order-status log, newest first", "orders", "orders", 1_000
        )
    if history:
        paths["/api/history/failures"] = read(
            "The watchlist's stored failures: timeouts, errors, circuit changes; newest first",
            "the failures",
            "failures",
            ("400", "a bad symbol, since, kind or limit, or an unknown parameter"),
            parameters=_history_parameters(),
        )
    # With a token, what is not a read needs it (401 without it).
    secured: dict[str, Any] = {"security": [{"bearer": []}]} if token else {}
    unauthorized = (("401", "no or a wrong bearer token"),) if token else ()
    if scans:
        accepted = {"description": "started", "content": _json(schema["scan"])}
        started = refusals(
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
                "responses": {"202": accepted, **started},
                **secured,
            },
            **read("The scans kept", "newest first", "scans"),
        }
        scan_id = {"name": "scan_id", "in": "path", "required": True, "schema": {"type": "string"}}
        every, in_range = (
            {
                "name": name,
                "in": "query",
                "required": False,
                "description": description,
                "schema": {"type": "boolean", "default": False},
            }
            for name, description in (
                ("all", "every symbol's result, matched or not"),
                ("in_range", "the symbols where the formula holds at some bar of the range"),
            )
        )
        cancelled = refusals(*unauthorized, ("404", "no such scan"))
        paths["/api/scans/{scan_id}"] = {
            "parameters": [scan_id],
            **read(
                "A scan's progress, then its results",
                "the scan",
                "scan_detail",
                ("400", "a bad parameter"),
                ("404", "no such scan"),
                parameters=[_limit(100, 100_000), every, in_range],
            ),
            "delete": {
                "summary": "Cancel a scan",
                "responses": {"202": accepted, **cancelled},
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


def _history_parameters() -> list[dict[str, Any]]:
    def query(name: str, description: str, schema: dict[str, Any]) -> dict[str, Any]:
        return {"name": name, "in": "query", "required": False, "description": description,
                "schema": schema}  # fmt: skip

    return [
        query("symbol", "only this symbol's failures", {"type": "string"}),
        query(
            "since",
            "only failures at or after: milliseconds since the epoch, or ISO 8601 with an offset",
            {"oneOf": [{"type": "integer", "minimum": 0}, {"type": "string"}]},
        ),
        query("kind", "only failures of this kind", {"type": "string", "enum": list(KINDS)}),
        _limit(1000, MAX_FAILURES),
    ]


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}
