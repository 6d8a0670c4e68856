"""Fuzzing the REST API: whatever a client sends, the answer is a documented code with a reason.

Requests are drawn with arbitrary query parameters (``limit``, ``all``,
unknown names, unicode, huge numbers, bytes that are not UTF-8), scan ids,
methods, bearer tokens, and bodies (arbitrary bytes, arbitrary JSON, the scan
request with wrong types, deep nesting, huge numbers, past the size cap, cut
short by the client leaving), sent in arbitrary pieces. The app runs
in-process, with a real ``Scans`` (thread bridge) and real, empty datasets;
each request is driven through ASGI by hand, so the test controls every
byte of the query, each body message and the declared length. The only
outcomes allowed are the codes the API documents, each 4xx with a JSON body
``{"error": "..."}``; never a 500, never an exception out of the app.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import AsyncIterator, MutableMapping
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import quote, quote_from_bytes

import attrs
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.applications import Starlette

from engine.bus import MemoryBus
from services.market.api import build_api
from services.market.cycles import Watchlist, WatchlistConfig, WhaleFlowConfig, WhaleFlows
from services.market.orders import OrderLog, OrderLogConfig
from services.market.scans import ScanConfig, Scans, SimulatedCandles, universe

ANCHOR_MS = 1_700_000_000_000
KLINES = SimulatedCandles(anchor_ms=ANCHOR_MS)
SYMBOLS = universe(20, seed=0)
TOKEN = "fuzz-token"
MAX_BODY = 16_384

# What each endpoint documents (docs/api.md and /api/openapi.json), by method.
GETS = {
    "/api/openapi.json": {200},
    "/api/last_update": {200, 400},
    "/api/watchlist": {200, 400},
    "/api/whale_flows": {200, 400},
    "/api/orders": {200, 400},
    "/api/scans": {200, 400},
}
SCAN = {"GET": {200, 400, 404}, "HEAD": {200, 400, 404}, "DELETE": {202, 400, 401, 404}}
POST_SCANS = {202, 400, 401, 408, 413, 429}
ELSEWHERE = {404, 405, 401}  # a path that is not served, a method that is not allowed

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@attrs.frozen
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes


@asynccontextmanager
async def api(token: str | None = None) -> AsyncIterator[Starlette]:
    """The whole API, with every part present; its scans run in threads."""
    scans = Scans(
        ScanConfig(symbols=len(SYMBOLS), workers=1),
        KLINES,
        clock=lambda: ANCHOR_MS,
        bridge="thread",
    )
    bus = MemoryBus()
    watchlist = Watchlist(WatchlistConfig("http://127.0.0.1:9", ["BTCUSDT", "ETHUSDT"]))
    whales = WhaleFlows(WhaleFlowConfig(), bus)
    orders = OrderLog(OrderLogConfig("/nonexistent/order_statuses"), bus)
    async with trio.open_nursery() as nursery:
        await nursery.start(scans.run)
        yield build_api(scans=scans, watchlist=watchlist, whales=whales, orders=orders, token=token)
        nursery.cancel_scope.cancel()


async def call(
    app: Starlette,
    method: str,
    path: str,
    *,
    query: bytes = b"",
    headers: list[tuple[bytes, bytes]] | None = None,
    chunks: list[bytes] | None = None,
    leaves: bool = False,
) -> Reply:
    """One request through ASGI as the ops server mounts the API at ``/api``."""
    pieces = chunks if chunks is not None else [b""]
    messages: list[dict[str, Any]] = [
        {"type": "http.request", "body": piece, "more_body": leaves or i < len(pieces) - 1}
        for i, piece in enumerate(pieces)
    ]

    async def receive() -> dict[str, Any]:
        await trio.lowlevel.checkpoint()
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    sent: list[MutableMapping[str, Any]] = []

    async def send(message: MutableMapping[str, Any]) -> None:
        await trio.lowlevel.checkpoint()
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.1"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "server": ("127.0.0.1", 8000),
        "client": ("127.0.0.1", 50000),
        "root_path": "/api",
        "path": path,
        "raw_path": path.encode("utf-8", "surrogateescape"),
        "query_string": query,
        "headers": headers or [],
    }
    await app(scope, receive, send)
    start, *bodies = sent
    assert start["type"] == "http.response.start"
    assert all(b["type"] == "http.response.body" for b in bodies)
    assert not bodies[-1].get("more_body", False)
    response_headers = {k.decode().lower(): v.decode() for k, v in start["headers"]}
    return Reply(start["status"], response_headers, b"".join(b.get("body", b"") for b in bodies))


def check(reply: Reply, allowed: set[int], method: str = "GET") -> None:
    """A documented code, and for a 4xx a JSON reason."""
    assert reply.status in allowed, (reply.status, reply.body[:300])
    assert reply.headers["content-type"].startswith("application/json")
    if method == "HEAD":
        return
    answer = json.loads(reply.body)
    if reply.status >= 400:
        assert isinstance(answer, dict)
        assert isinstance(answer["error"], str)
        assert answer["error"]


# -- query parameters ---------------------------------------------------------------------

numbers = st.one_of(
    st.integers(min_value=-(10**30), max_value=10**30).map(str),
    st.integers(min_value=-5, max_value=200_000).map(str),
    st.sampled_from(["", "0", "-0", "+5", " 5", "5 ", "1_000", "1e3", "0x10", "nan", "inf"]),
    st.sampled_from(["\u0661\u0662", "\uff15", "9" * 5000, "-" + "9" * 40]),
)
names = st.one_of(
    st.sampled_from(["limit", "all", "symbol", "LIMIT", "limit[]", ""]),
    st.text(max_size=12),
)
values = st.one_of(numbers, st.sampled_from(["true", "false", "True", "1", ""]), st.text())


@st.composite
def queries(draw: st.DrawFn) -> bytes:
    """A query string: parameters drawn and encoded, or raw bytes percent-encoded, or as is."""
    kind = draw(st.sampled_from(["params", "raw", "verbatim"]))
    if kind == "raw":
        return quote_from_bytes(draw(st.binary(max_size=64)), safe="=&").encode()
    if kind == "verbatim":
        return draw(st.binary(max_size=64))
    pairs = draw(st.lists(st.tuples(names, values), max_size=4))
    return "&".join(f"{quote(k)}={quote(v)}" for k, v in pairs).encode()


scan_ids = st.one_of(st.sampled_from(["1", "2", "0", "-1", "01", "\uff11"]), st.text(min_size=1))


@FUZZ
@given(
    path=st.sampled_from(sorted(GETS)),
    method=st.sampled_from(["GET", "HEAD"]),
    query=queries(),
)
async def test_reads_with_any_query_get_a_documented_answer(
    path: str, method: str, query: bytes
) -> None:
    async with api() as app:
        check(await call(app, method, path, query=query), GETS[path], method)


@FUZZ
@given(
    scan=scan_ids,
    method=st.sampled_from(sorted(SCAN)),
    query=queries(),
    started=st.booleans(),
)
async def test_a_scan_by_any_id_and_query_gets_a_documented_answer(
    scan: str, method: str, query: bytes, started: bool
) -> None:
    async with api() as app:
        if started:  # so that scan "1" exists
            body = json.dumps({"formula": "close > 0"}).encode()
            check(await call(app, "POST", "/api/scans", chunks=[body]), {202}, "POST")
        path = "/api/scans/" + quote(scan, safe="")
        reply = await call(app, method, path, query=query)
    check(reply, SCAN[method], method)


@FUZZ
@given(
    path=st.one_of(
        st.sampled_from([*GETS, "/api/scans/1", "/api/", "/api"]),
        st.text(max_size=20).map(lambda t: "/api/" + t),
    ),
    method=st.sampled_from(["PUT", "PATCH", "OPTIONS", "TRACE", "POST", "DELETE", "FOO"]),
)
async def test_any_method_on_any_path_gets_a_documented_answer(path: str, method: str) -> None:
    async with api() as app:
        reply = await call(app, method, path)
    allowed = set(ELSEWHERE)
    if path == "/api/scans" and method == "POST":
        allowed |= POST_SCANS
    if path == "/api/scans/1" and method == "DELETE":
        allowed |= SCAN["DELETE"]
    check(reply, allowed, method)


# -- request bodies -----------------------------------------------------------------------

huge_numbers = st.one_of(
    st.integers(min_value=-(10**400), max_value=10**400),
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from([1e308, -1e308, 5e-324, 2**64, -(2**63) - 1]),
)
json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), huge_numbers, st.text(max_size=40)),
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=20,
)
formulas = st.one_of(
    st.sampled_from(
        ["close > 0", "rsi14 < 30 and macd_hist > 0", "close > sma50", "close >", "((((("]
    ),
    st.text(max_size=80),
    st.integers(1, 3000).map(lambda n: "(" * n + "close > 1" + ")" * n),
    huge_numbers.map(lambda x: f"close > {x}"),
    st.integers(1, 2000).map(lambda n: " and ".join(["close > 0"] * n)),
)
symbol_lists = st.one_of(
    st.none(),
    st.lists(st.sampled_from(SYMBOLS), max_size=5),
    st.lists(st.text(max_size=12), max_size=5),
    json_values,
)


@st.composite
def scan_requests(draw: st.DrawFn) -> object:
    """The scan request's shape, with any member of any type, and extra members."""
    request: dict[str, object] = {}
    if draw(st.booleans()):
        request["formula"] = draw(st.one_of(formulas, json_values))
    if draw(st.booleans()):
        request["symbols"] = draw(symbol_lists)
    request |= draw(st.dictionaries(st.text(max_size=10), json_values, max_size=2))
    return request


def deep(depth: int, opener: str) -> bytes:
    closer = {"[": "]", "{": "}"}[opener]
    if opener == "{":
        return ('{"a":' * depth + "1" + closer * depth).encode()
    return (opener * depth + closer * depth).encode()


bodies = st.one_of(
    st.binary(max_size=300),
    st.integers(0, 3 * MAX_BODY).map(lambda n: b"x" * n),
    json_values.map(lambda v: json.dumps(v).encode()),
    scan_requests().map(lambda v: json.dumps(v).encode()),
    st.tuples(st.integers(1, 20_000), st.sampled_from("[{")).map(lambda t: deep(*t)),
    st.integers(1, 9000).map(lambda n: b'{"formula": "x", "symbols": ' + deep(n, "[") + b"}"),
    st.text(max_size=100).map(lambda t: t.encode("utf-16")),
)


@st.composite
def deliveries(draw: st.DrawFn) -> tuple[list[bytes], list[tuple[bytes, bytes]], bool]:
    """A body cut into pieces, a length declared (right, wrong or none), and maybe a leaver."""
    body = draw(bodies)
    cuts = sorted(draw(st.lists(st.integers(0, len(body)), max_size=4)))
    edges = [0, *cuts, len(body)]
    chunks = [body[a:b] for a, b in itertools.pairwise(edges)]
    declared = draw(
        st.one_of(
            st.just(len(body)),
            st.none(),
            st.integers(0, 10**12),
            st.sampled_from(["", "abc", "-1", " 12 ", "1" * 30]),
        )
    )
    headers = [(b"content-type", b"application/json")]
    if declared is not None:
        headers.append((b"content-length", str(declared).encode()))
    return chunks, headers, draw(st.booleans())


@FUZZ
@given(delivery=deliveries(), query=st.one_of(st.just(b""), queries()))
async def test_any_scan_body_gets_a_documented_answer(
    delivery: tuple[list[bytes], list[tuple[bytes, bytes]], bool], query: bytes
) -> None:
    chunks, headers, leaves = delivery
    async with api() as app:
        reply = await call(
            app, "POST", "/api/scans", query=query, headers=headers, chunks=chunks, leaves=leaves
        )
    check(reply, POST_SCANS - {401}, "POST")
    if len(b"".join(chunks)) > MAX_BODY:
        assert reply.status in (400, 413)  # 400: the query was refused first


@FUZZ
@given(
    authorization=st.one_of(
        st.none(),
        st.just(f"Bearer {TOKEN}".encode()),
        st.binary(max_size=40),
        st.text(max_size=30).map(lambda t: ("Bearer " + t).encode("utf-8", "surrogateescape")),
    ),
    method=st.sampled_from(["POST", "DELETE", "GET"]),
)
async def test_any_authorization_gets_a_documented_answer(
    authorization: bytes | None, method: str
) -> None:
    headers = [] if authorization is None else [(b"authorization", authorization)]
    path = "/api/scans" if method == "POST" else "/api/scans/1"
    body = [json.dumps({"formula": "close > 0"}).encode()] if method == "POST" else None
    async with api(token=TOKEN) as app:
        reply = await call(app, method, path, headers=headers, chunks=body)
    allowed = POST_SCANS if method == "POST" else SCAN[method]
    check(reply, allowed, method)
    authorized = authorization == f"Bearer {TOKEN}".encode()
    if method != "GET":
        assert (reply.status == 401) == (not authorized)
        if reply.status == 401:
            assert reply.headers["www-authenticate"].startswith("Bearer")
