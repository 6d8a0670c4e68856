"""The ops server and the REST API under abuse: huge and withheld bodies, floods, leavers, tokens.

Real-I/O tests run a server on 127.0.0.1 port 0 and talk to it over raw
sockets, so the client does exactly what the test says (an HTTP client would
fix up lengths, retry, or refuse to stop mid-body).
"""

from __future__ import annotations

import functools
import logging
import math
import socket
from collections.abc import AsyncIterator, MutableMapping
from contextlib import asynccontextmanager, suppress
from typing import Any

import httpx
import pytest
import trio
import trio.testing
from prometheus_client.parser import text_string_to_metric_families

import engine
from engine.bus import MemoryBus
from services.market.api import build_api
from services.market.orders import OrderLog, OrderLogConfig
from services.market.scans import ScanConfig, Scans, SimulatedCandles

GUARD = 10
ANCHOR_MS = 1_700_000_000_000
KLINES = SimulatedCandles(anchor_ms=ANCHOR_MS)
MAX_BODY = 16_384
# The most hypercorn reads from a socket at once (hypercorn.trio.tcp_server.MAX_RECV).
RECEIVE_CHUNK = 65_536


@asynccontextmanager
async def scans_running() -> AsyncIterator[Scans]:
    scans = Scans(
        ScanConfig(symbols=20, workers=1), KLINES, clock=lambda: ANCHOR_MS, bridge="thread"
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(scans.run)
        yield scans
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def serving(routes: dict[str, Any], **options: Any) -> AsyncIterator[engine.OpsServer]:
    """An ops server with ``routes`` mounted; no loop watch (these tests measure no stalls)."""
    async with trio.open_nursery() as nursery:
        start = functools.partial(
            engine.serve_ops, port=0, routes=routes, stall_threshold=math.inf, **options
        )
        yield await nursery.start(start)
        nursery.cancel_scope.cancel()


class Counting:
    """An ASGI app in front of another that counts the body bytes the app behind received."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.received = 0

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        async def counting_receive() -> Any:
            message = await receive()
            self.received += len(message.get("body", b""))
            return message

        await self.app(scope, counting_receive, send)


async def read_all(stream: trio.SocketStream) -> bytes:
    """Everything the server sends until it closes (or resets) the connection."""
    data = b""
    try:
        while chunk := await stream.receive_some():
            data += chunk
    except trio.BrokenResourceError:  # a reset after the answer: the answer is kept
        pass
    return data


def status_of(reply: bytes) -> int:
    return int(reply.split(b" ", 2)[1])


def headers_of(reply: bytes) -> dict[str, str]:
    head = reply.split(b"\r\n\r\n", 1)[0].decode()
    return {
        name.lower(): value.strip()
        for name, value in (line.split(":", 1) for line in head.split("\r\n")[1:])
    }


def post_head(**headers: str) -> bytes:
    lines = [f"{name.replace('_', '-')}: {value}" for name, value in headers.items()]
    return ("POST /api/scans HTTP/1.1\r\nhost: test\r\n" + "\r\n".join(lines) + "\r\n\r\n").encode()


# -- item 2: a body is refused on its declared length, and cut at the cap as it arrives --


async def test_a_declared_length_over_the_cap_is_refused_before_the_body_is_read() -> None:
    async with scans_running() as scans:
        api = Counting(build_api(scans=scans))
        async with serving({"/api": api}) as ops:
            with trio.fail_after(GUARD):
                stream = await trio.open_tcp_stream(ops.host, ops.port)
                async with stream:
                    await stream.send_all(post_head(content_length="200000000"))
                    await stream.send_all(b'{"formula": "' + b"x" * 1000)
                    reply = await read_all(stream)
    assert status_of(reply) == 413
    assert headers_of(reply)["connection"] == "close"
    assert reply.endswith(b'{"error":"the body must be at most 16384 bytes"}')
    assert api.received == 0


async def send_chunks(stream: trio.SocketStream, total: int, answered: trio.Event) -> int:
    """Send a chunked body of ``total`` bytes until the server answers; return the bytes sent."""
    chunk = b"x" * 8192
    frame = b"%x\r\n" % len(chunk) + chunk + b"\r\n"
    sent = 0
    try:
        while sent < total and not answered.is_set():
            await stream.send_all(frame)
            sent += len(chunk)
        await stream.send_all(b"0\r\n\r\n")
    except trio.BrokenResourceError:  # closed by the server after its answer
        pass
    return sent


async def test_a_chunked_body_is_cut_at_the_cap_as_it_arrives() -> None:
    total = 20_000_000
    sent = 0
    async with scans_running() as scans:
        api = Counting(build_api(scans=scans))
        async with serving({"/api": api}) as ops:
            with trio.fail_after(GUARD):
                stream = await trio.open_tcp_stream(ops.host, ops.port)
                # A fixed send buffer: what the kernel takes in, uncounted by the server, is known.
                stream.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 32_768)
                async with stream:
                    await stream.send_all(post_head(transfer_encoding="chunked"))
                    answered = trio.Event()

                    async def sender() -> None:
                        nonlocal sent
                        sent = await send_chunks(stream, total, answered)

                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(sender)
                        reply = await read_all(stream)
                        answered.set()
    assert status_of(reply) == 413
    # The app holds at most the cap plus what one read of the socket brought.
    assert MAX_BODY < api.received <= MAX_BODY + RECEIVE_CHUNK
    # What the client got into the sockets before the answer, kernel buffers included.
    assert sent < 1_000_000


async def test_an_answer_before_the_body_does_not_wait_for_the_body() -> None:
    # Hypercorn queues at most ten body messages for the app and stops
    # reading the socket then; an app that answers without reading must not
    # leave its answer (or the connection) waiting on that full queue.
    answer = trio.Event()

    async def refuses(scope: Any, receive: Any, send: Any) -> None:
        await answer.wait()
        headers = [(b"content-length", b"9")]
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": b"too large"})

    body = 4_000_000
    async with serving({"/upload": refuses}) as ops:
        with trio.fail_after(GUARD):
            stream = await trio.open_tcp_stream(ops.host, ops.port)
            async with stream, trio.open_nursery() as nursery:
                head = b"POST /upload HTTP/1.1\r\nhost: test\r\ncontent-length: %d\r\n\r\n" % body

                async def sender() -> None:
                    with suppress(trio.BrokenResourceError):  # closed after the answer
                        await stream.send_all(head + b"x" * body)

                nursery.start_soon(sender)
                # The server's queue is full and both sides wait on the sockets.
                await trio.testing.wait_all_tasks_blocked()
                answer.set()
                reply = await read_all(stream)
    assert status_of(reply) == 413
    assert reply.endswith(b"too large")


# -- item 3: a read timeout, and a bound on connections ----------------------------------


async def test_a_withheld_body_is_cut_at_the_read_timeout() -> None:
    async with (
        scans_running() as scans,
        serving({"/api": build_api(scans=scans)}, read_timeout=0.5) as ops,
    ):
        with trio.fail_after(GUARD):
            stream = await trio.open_tcp_stream(ops.host, ops.port)
            async with stream:
                await stream.send_all(post_head(content_length="100") + b'{"formula"')
                sent_at = trio.current_time()
                reply = await read_all(stream)
                took = trio.current_time() - sent_at
    assert 0.5 <= took < 5
    assert status_of(reply) == 408
    assert b"the body ended after 10 bytes" in reply


@pytest.mark.parametrize(
    "opening", [b"", b"GET /health HTTP/1.1\r\nhost: te"], ids=["silent", "half-headers"]
)
async def test_a_silent_connection_is_closed_at_the_read_timeout(opening: bytes) -> None:
    async with serving({}, read_timeout=0.5) as ops:
        with trio.fail_after(GUARD):
            stream = await trio.open_tcp_stream(ops.host, ops.port)
            async with stream:
                await stream.send_all(opening)
                sent_at = trio.current_time()
                reply = await read_all(stream)
                took = trio.current_time() - sent_at
    assert reply == b""
    assert 0.5 <= took < 5


async def test_the_new_settings_are_checked() -> None:
    for bad in (0, -1.0, math.nan):
        with pytest.raises(ValueError, match="read_timeout"):
            await engine.serve_ops(port=0, read_timeout=bad)
    with pytest.raises(TypeError, match="read_timeout"):
        await engine.serve_ops(port=0, read_timeout="10")  # type: ignore[arg-type]  # on purpose
    with pytest.raises(ValueError, match="max_connections must be >= 1"):
        await engine.serve_ops(port=0, max_connections=0)
    with pytest.raises(TypeError, match="max_connections"):
        await engine.serve_ops(port=0, max_connections=2.5)  # type: ignore[arg-type]  # on purpose


async def ask(ops: engine.OpsServer, path: str) -> bytes:
    stream = await trio.open_tcp_stream(ops.host, ops.port)
    async with stream:
        await stream.send_all(
            f"GET {path} HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n".encode()
        )
        return await read_all(stream)


def metric(page: bytes, name: str) -> float:
    text = page.split(b"\r\n\r\n", 1)[1].decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                return sample.value
    raise KeyError(name)


async def test_connections_past_the_bound_get_503_and_are_closed() -> None:
    async with serving({}, max_connections=2, read_timeout=math.inf) as ops:
        with trio.fail_after(GUARD):
            # Two idle connections, which send nothing, fill the server.
            first = await trio.open_tcp_stream(ops.host, ops.port)
            second = await trio.open_tcp_stream(ops.host, ops.port)
            await trio.testing.wait_all_tasks_blocked()
            refused = await ask(ops, "/health")
            await first.aclose()  # room for one again
            await trio.testing.wait_all_tasks_blocked()
            page = await ask(ops, "/metrics")
            await second.aclose()
    assert status_of(refused) == 503
    assert headers_of(refused)["retry-after"] == "1"
    assert headers_of(refused)["connection"] == "close"
    assert refused.endswith(b'{"error": "too many connections; retry later"}')
    assert status_of(page) == 200
    assert metric(page, "engine_ops_http_connections_refused_total") == 1
    assert metric(page, "engine_ops_http_connections") == 2  # the idle one and this one


async def test_an_http_client_reads_the_503_of_a_full_server() -> None:
    client = httpx.AsyncClient()  # made first: it loads certificates
    async with client, serving({}, max_connections=1, read_timeout=math.inf) as ops:
        with trio.fail_after(GUARD):
            held = await trio.open_tcp_stream(ops.host, ops.port)
            await trio.testing.wait_all_tasks_blocked()
            response = await client.get(f"{ops.url}/health")
            await held.aclose()
    assert response.status_code == 503
    assert response.headers["retry-after"] == "1"
    assert response.json() == {"error": "too many connections; retry later"}


# -- item 10: a client that leaves mid-body is one INFO line -----------------------------


async def test_a_client_leaving_mid_body_is_one_info_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    async with scans_running() as scans, serving({"/api": build_api(scans=scans)}) as ops:
        with trio.fail_after(GUARD):
            caplog.clear()
            stream = await trio.open_tcp_stream(ops.host, ops.port)
            await stream.send_all(post_head(content_length="100") + b'{"formula"')
            await trio.testing.wait_all_tasks_blocked()
            await stream.aclose()
            await trio.testing.wait_all_tasks_blocked()
            logged = [r for r in caplog.records if r.levelno >= logging.INFO]
    (record,) = logged
    assert (record.name, record.levelno, record.exc_info) == ("engine.ops.http", logging.INFO, None)
    message = record.getMessage()
    assert "\n" not in message
    assert message.startswith("POST /api/scans from 127.0.0.1:")
    assert "after 10 of 100 body bytes" in message


async def test_a_raw_app_that_raises_after_the_client_left_is_not_an_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def strict(scope: Any, receive: Any, send: Any) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        raise ConnectionError("the client went away")

    caplog.set_level(logging.DEBUG)
    async with serving({"/upload": strict}) as ops:
        with trio.fail_after(GUARD):
            caplog.clear()
            stream = await trio.open_tcp_stream(ops.host, ops.port)
            await stream.send_all(
                b"POST /upload HTTP/1.1\r\nhost: t\r\ncontent-length: 9\r\n\r\nab"
            )
            await trio.testing.wait_all_tasks_blocked()
            await stream.aclose()
            await trio.testing.wait_all_tasks_blocked()
            logged = [r for r in caplog.records if r.levelno >= logging.INFO]
    (record,) = logged
    assert record.levelno == logging.INFO
    assert record.getMessage().endswith(
        "after 2 of 9 body bytes; the app then raised ConnectionError"
    )


async def test_an_app_that_fails_still_logs_its_error_and_answers_500(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def broken(scope: Any, receive: Any, send: Any) -> None:
        raise RuntimeError("bug")

    async with serving({"/broken": broken}) as ops:
        with trio.fail_after(GUARD):
            reply = await ask(ops, "/broken")
    assert status_of(reply) == 500
    assert reply.endswith(b'{"error":"internal server error"}')
    (record,) = (r for r in caplog.records if r.levelno >= logging.ERROR)
    assert record.exc_info is not None
    assert "RuntimeError: bug" in caplog.text


# -- item 4, the REST part: a token for what changes something ---------------------------


@asynccontextmanager
async def api_client(token: str | None) -> AsyncIterator[httpx.AsyncClient]:
    async with scans_running() as scans:
        transport = httpx.ASGITransport(app=build_api(scans=scans, token=token))
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            yield client


async def test_with_a_token_changes_need_it_and_reads_stay_open() -> None:
    formula = {"formula": "close > 0"}
    async with api_client("s3cret-Token_1.~+/!@=") as client:
        missing = await client.post("/scans", json=formula)
        wrong = await client.post("/scans", json=formula, headers={"authorization": "Bearer nope"})
        basic = await client.post(
            "/scans", json=formula, headers={"authorization": "Basic s3cret-Token_1.~+/!@="}
        )
        good = {"authorization": "bearer s3cret-Token_1.~+/!@="}
        started = await client.post("/scans", json=formula, headers=good)
        listing = await client.get("/scans")
        scan = started.json()["id"]
        one = await client.get(f"/scans/{scan}")
        unauthorized_cancel = await client.delete(f"/scans/{scan}")
        cancelled = await client.delete(f"/scans/{scan}", headers=good)
        described = (await client.get("/openapi.json")).json()
    assert missing.status_code == wrong.status_code == basic.status_code == 401
    assert missing.headers["www-authenticate"] == 'Bearer realm="api"'
    assert missing.json() == {"error": "this request needs Authorization: Bearer <token>"}
    assert wrong.headers["www-authenticate"] == 'Bearer realm="api", error="invalid_token"'
    assert wrong.json() == {"error": "the bearer token is not valid"}
    assert started.status_code == 202
    assert (listing.status_code, one.status_code) == (200, 200)
    assert unauthorized_cancel.status_code == 401
    assert cancelled.status_code == 202
    assert described["components"]["securitySchemes"] == {
        "bearer": {"type": "http", "scheme": "bearer"}
    }
    assert described["paths"]["/api/scans"]["post"]["security"] == [{"bearer": []}]
    assert "401" in described["paths"]["/api/scans"]["post"]["responses"]


async def test_without_a_token_changes_are_open() -> None:
    async with api_client(None) as client:
        started = await client.post("/scans", json={"formula": "close > 0"})
        described = (await client.get("/openapi.json")).json()
    assert started.status_code == 202
    assert "securitySchemes" not in described["components"]
    assert "401" not in described["paths"]["/api/scans"]["post"]["responses"]


async def test_a_request_without_the_token_is_refused_before_its_body_is_read() -> None:
    async with scans_running() as scans:
        api = build_api(scans=scans, token="t0ken")
        sent: list[MutableMapping[str, Any]] = []

        async def receive() -> dict[str, Any]:
            raise AssertionError("the body was read")

        async def send(message: MutableMapping[str, Any]) -> None:
            sent.append(message)

        scope = {
            "type": "http",
            "method": "POST",
            "path": "/scans",
            "root_path": "",
            "query_string": b"",
            "headers": [(b"content-length", b"200000000")],
        }
        await api(scope, receive, send)
    assert sent[0]["status"] == 401


@pytest.mark.parametrize(
    ("token", "error"),
    [("", ValueError), ("two words", ValueError), ("ünï", ValueError), (b"bytes", TypeError)],
)
def test_a_bad_token_is_refused_without_showing_it(token: Any, error: type[Exception]) -> None:
    with pytest.raises(error, match="token") as raised:
        build_api(token=token)
    if token:
        assert str(token) not in str(raised.value)


# -- parameters: a number is plain ASCII digits ------------------------------------------


@pytest.mark.parametrize("limit", ["+5", " 5", "5 ", "1_0", "\u0665", "\uff15", "9" * 5000])
async def test_a_limit_that_is_not_plain_digits_is_refused(limit: str) -> None:
    orders = OrderLog(OrderLogConfig("/nonexistent/order_statuses"), MemoryBus())
    transport = httpx.ASGITransport(app=build_api(orders=orders))
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        response = await client.get("/orders", params={"limit": limit})
    assert response.status_code == 400
    assert response.json()["error"].startswith("limit must be an integer from 1 to 1000, got")
