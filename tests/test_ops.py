"""The ops server over real HTTP: every endpoint, healthy and failing, and its shutdown."""

from __future__ import annotations

import functools
import json
import math
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import trio.testing
from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

import engine

EXAMPLES = Path(__file__).resolve().parent.parent / "docs" / "examples"


@asynccontextmanager
async def serving(
    supervisor: engine.Supervisor | None = None, **options: Any
) -> AsyncIterator[tuple[engine.OpsServer, httpx.AsyncClient]]:
    """An ops server on 127.0.0.1 port 0 and a client for it; cancelled at the end.

    The client is made first: building one loads CA certificates, a blocking
    step that the server's loop watch would rightly count as a stall.
    """
    async with httpx.AsyncClient() as client, trio.open_nursery() as nursery:
        start = functools.partial(engine.serve_ops, supervisor, port=0, **options)
        ops: engine.OpsServer = await nursery.start(start)
        client.base_url = httpx.URL(ops.url)
        yield ops, client
        nursery.cancel_scope.cancel()


async def wait_until(predicate: Callable[[], bool]) -> None:
    """Poll a real-time condition (a watchdog firing after real seconds)."""
    while not predicate():  # noqa: ASYNC110 -- a real-time condition with no event to wait on
        await trio.sleep(0.01)


Page = dict[tuple[str, frozenset[tuple[str, str]]], float]


def samples(text: str) -> Page:
    """Every sample of a /metrics page, parsed by prometheus-client's own parser."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(
    page: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str
) -> float:
    return page[(name, frozenset(labels.items()))]


async def beating(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    task_status.started()
    while True:
        engine.heartbeat()
        await trio.sleep(0.02)


async def test_healthy_service_answers_every_endpoint() -> None:
    send, receive = engine.open_channel[int](10)
    with trio.fail_after(5):
        async with engine.open_supervisor(name="root") as sup:
            await sup.start(beating, name="feed", stall_after=5)
            async with serving(sup, sources={"ticks": send}) as (ops, client):
                assert ops.host == "127.0.0.1"
                assert ops.port > 0
                assert ops.url == f"http://127.0.0.1:{ops.port}"

                health = await client.get("/health")
                assert health.status_code == 200
                assert health.headers["content-type"] == "application/json"
                assert health.json()["status"] == "ok"
                assert health.json()["reasons"] == []
                assert health.json()["loop"]["stalls"] == 0

                ready = await client.get("/ready")
                assert (ready.status_code, ready.json()["status"]) == (200, "ok")

                status = (await client.get("/status")).json()
                (feed,) = status["supervisor"]["children"]
                assert (feed["name"], feed["state"], feed["ready"]) == ("feed", "running", True)
                assert feed["stall_after"] == 5
                assert status["sources"]["ticks"]["type"] == "ChannelStatistics"
                assert status["loop"]["threshold"] == 0.1

                metrics = await client.get("/metrics")
                assert metrics.status_code == 200
                assert metrics.headers["content-type"].startswith("text/plain")
                page = samples(metrics.text)
                assert value(page, "engine_child_ready", child="root/feed") == 1
                assert value(page, "engine_child_state", child="root/feed", state="running") == 1
                assert value(page, "engine_channel_capacity", channel="ticks") == 10

                head = await client.head("/health")
                assert (head.status_code, head.content) == (200, b"")
                sup.cancel()
    await receive.aclose()


async def stuck(release: trio.Event) -> None:
    """A child whose watchdog cannot cancel it (a shielded wait, like a hung thread call)."""
    engine.heartbeat()
    with trio.CancelScope(shield=True):
        await release.wait()
    await beating()


async def test_stalled_child_fails_health_and_names_it() -> None:
    release = trio.Event()
    with trio.fail_after(5):
        async with engine.open_supervisor(name="root") as sup:
            sup.start_soon(
                stuck, release, name="stuck", stall_after=0.2, backoff=engine.Backoff(initial=0)
            )
            async with serving(sup) as (_, client):
                await wait_until(lambda: sup.statistics().children[0].stalls == 1)
                health = await client.get("/health")
                assert health.status_code == 503
                body = health.json()
                assert body["status"] == "failing"
                (problem,) = body["problems"]
                assert problem["kind"] == "child_stalled"
                assert problem["subject"] == "root/stuck"
                assert problem["limit"] == 0.2
                assert problem["seconds"] > 0.2
                assert body["reasons"][0].startswith("child 'root/stuck' stalled: no heartbeat")
                assert (await client.get("/ready")).status_code == 503

                release.set()  # the watchdog's cancel takes effect; the child restarts
                await wait_until(lambda: sup.statistics().children[0].restarts == 1)
                assert (await client.get("/health")).status_code == 200
                sup.cancel()


async def crash() -> None:
    raise RuntimeError("feed connection refused")


async def test_exhausted_restart_intensity_fails_health_with_both_reasons() -> None:
    with trio.fail_after(5):
        # The client first: building one blocks the loop (CA certificates).
        async with httpx.AsyncClient() as client, trio.open_nursery() as outer:
            servers: list[engine.OpsServer] = []

            async def supervised() -> None:
                async with engine.open_supervisor(name="root", max_restarts=0) as sup:
                    servers.append(await outer.start(engine.serve_ops, sup, "127.0.0.1", 0))
                    sup.start_soon(crash, name="feed")

            with pytest.raises(engine.RestartIntensityExceeded):
                await supervised()
            # The supervisor gave up; the ops server, outside it, still tells why.
            (ops,) = servers
            client.base_url = httpx.URL(ops.url)
            health = await client.get("/health")
            ready = await client.get("/ready")
            page = samples((await client.get("/metrics")).text)
            outer.cancel_scope.cancel()
    assert health.status_code == 503
    kinds = {p["kind"]: p for p in health.json()["problems"]}
    assert set(kinds) == {"supervisor_failed", "child_failed"}
    assert kinds["supervisor_failed"]["subject"] == "root"
    assert "exhausted its restart intensity" in kinds["supervisor_failed"]["message"]
    assert kinds["child_failed"]["subject"] == "root/feed"
    assert kinds["child_failed"]["error"] == "RuntimeError: feed connection refused"
    assert ready.status_code == 503
    assert value(page, "engine_supervisor_failed", supervisor="root") == 1
    assert value(page, "engine_child_failures_total", child="root/feed") == 1


async def connects(
    connected: trio.Event, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    await connected.wait()
    task_status.started()
    await trio.sleep_forever()


async def test_readiness_waits_for_children_that_report_ready() -> None:
    connected = trio.Event()
    with trio.fail_after(5):
        async with engine.open_supervisor(name="root") as sup:
            sup.start_soon(connects, connected, name="feed", reports_ready=True)
            async with serving(sup) as (_, client):
                ready = await client.get("/ready")
                assert ready.status_code == 503
                (problem,) = ready.json()["problems"]
                assert (problem["kind"], problem["subject"]) == ("not_ready", "root/feed")
                assert ready.json()["reasons"] == [
                    "child 'root/feed' is starting and not ready yet"
                ]
                # Not ready is not dead: liveness stays green.
                assert (await client.get("/health")).status_code == 200

                connected.set()
                await wait_until(lambda: sup.statistics().children[0].ready)
                assert (await client.get("/ready")).status_code == 200
                sup.cancel()


def block_loop(released: threading.Event) -> None:
    """Block the trio thread, as a blocking ``pubsub.listen()`` did in seed 004."""
    released.wait(5)


async def test_liveness_answers_503_while_the_loop_is_blocked() -> None:
    answer: dict[str, Any] = {}
    probing = threading.Event()
    released = threading.Event()

    def probe(url: str) -> None:
        probing.wait(5)
        started = time.perf_counter()
        try:
            response = httpx.get(f"{url}/health", timeout=3)
            answer["status"] = response.status_code
            answer["body"] = response.json()
        finally:
            answer["seconds"] = time.perf_counter() - started
            released.set()  # unblock the loop only once the probe has its answer

    async def redis_subscriber() -> None:
        probing.set()
        block_loop(released)

    with trio.fail_after(10):
        async with serving() as (ops, client):
            thread = threading.Thread(target=probe, args=(ops.url,))
            thread.start()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(redis_subscriber, name="redis_subscriber")
            await trio.to_thread.run_sync(thread.join)

            assert answer["status"] == 503
            assert answer["seconds"] < 1
            (problem,) = answer["body"]["problems"]
            assert problem["kind"] == "loop_stalled"
            assert problem["subject"] == "redis_subscriber"
            assert "block_loop" in problem["where"]
            assert "released.wait(5)" in problem["where"]
            assert answer["body"]["reasons"][0].startswith("event loop stalled ")
            assert "in task 'redis_subscriber'" in answer["body"]["reasons"][0]
            assert answer["body"]["answered_by"] == "loop watch thread"

            # The loop turns again: the same port answers from the loop, and counted it.
            health = await client.get("/health")
            assert health.status_code == 200
            # (Creating an httpx client blocks for its SSL context: on a busy
            # machine that alone can exceed the threshold and count as a stall.)
            assert health.json()["loop"]["stalls"] >= 1
            assert health.json()["loop"]["last_stall"]["task"] == "redis_subscriber"


def hold_the_loop(seconds: float) -> None:
    time.sleep(seconds)


async def test_metrics_counters_move() -> None:
    send, receive = engine.open_channel[int](2, overflow="drop_oldest")
    hub = engine.Hub[int](name="trades")
    failed_once = False

    async def flaky() -> None:
        nonlocal failed_once
        if not failed_once:
            failed_once = True
            raise RuntimeError("first run fails")
        await trio.sleep_forever()

    with trio.fail_after(5):
        async with engine.open_supervisor(name="root", max_restarts=5) as sup:
            sup.start_soon(beating, name="steady")
            sources = {"ticks": send, "trades": hub}
            async with serving(sup, sources=sources) as (_, client):
                before = samples((await client.get("/metrics")).text)

                sup.start_soon(flaky, name="flaky", backoff=engine.Backoff(initial=0))
                for i in range(5):
                    await send.send(i)
                async with hub.subscribe("trades.>", maxsize=10):
                    await hub.publish("trades.BTCUSDT", 1)
                await engine.to_thread(len, "abc")
                hold_the_loop(0.3)
                await wait_until(lambda: sup.statistics().children[1].restarts == 1)

                after = samples((await client.get("/metrics")).text)
                sup.cancel()
    await receive.aclose()

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert moved("engine_channel_sent_total", channel="ticks") == 5
    assert moved("engine_channel_dropped_total", channel="ticks") == 3
    assert value(after, "engine_channel_depth", channel="ticks") == 2
    assert moved("engine_hub_published_total", hub="trades") == 1
    assert value(after, "engine_child_restarts_total", child="root/flaky") == 1
    assert value(after, "engine_child_failures_total", child="root/flaky") == 1
    assert moved("engine_loop_stalls_total") >= 1
    assert value(after, "engine_loop_stall_seconds_max") >= 0.2
    assert moved("engine_bridge_calls_total", bridge="thread") == 1
    # The first scrape was counted after its page was rendered.
    assert value(after, "engine_ops_http_requests_total", endpoint="/metrics", code="200") == 1
    assert ("engine_batch_items_total", frozenset({("status", "ok")})) in after


async def test_bad_requests_get_4xx_and_the_server_keeps_serving() -> None:
    with trio.fail_after(5):
        async with serving() as (ops, client):
            unknown = await client.get("/nope")
            assert unknown.status_code == 404
            assert unknown.json()["endpoints"] == ["/health", "/ready", "/metrics", "/status"]

            posted = await client.post("/health", content=b"x")
            assert posted.status_code == 405
            assert posted.headers["allow"] == "GET, HEAD"

            for garbage in (
                b"\x00\x01garbage\r\n\r\n",
                b"GET /health HTTP/1.1\r\nno colon here\r\n\r\n",
            ):
                stream = await trio.open_tcp_stream(ops.host, ops.port)
                async with stream:
                    await stream.send_all(garbage)
                    reply = await stream.receive_some(1024)
                assert reply.startswith(b"HTTP/1.1 4"), reply

            websocket = await client.get(
                "/ws",
                headers={
                    "connection": "upgrade",
                    "upgrade": "websocket",
                    "sec-websocket-version": "13",
                    "sec-websocket-key": "dGhlIHNhbXBsZSBub25jZQ==",
                },
            )
            assert 400 <= websocket.status_code < 500

            assert (await client.get("/health")).status_code == 200
            page = samples((await client.get("/metrics")).text)
            assert value(page, "engine_ops_http_requests_total", endpoint="unmatched", code="404")
            assert value(page, "engine_ops_http_requests_total", endpoint="/health", code="405")


async def test_mounted_apps_get_their_prefix_and_are_counted() -> None:
    seen: list[tuple[str, str]] = []

    async def api(scope: Any, receive: Any, send: Any) -> None:
        seen.append((scope["path"], scope["root_path"]))
        await send({"type": "http.response.start", "status": 201, "headers": []})
        await send({"type": "http.response.body", "body": b"created"})

    with trio.fail_after(5):
        async with serving(routes={"/api/": api}) as (_, client):
            response = await client.get("/api/quotes?symbol=BTCUSDT")
            assert (response.status_code, response.text) == (201, "created")
            assert (await client.get("/apis")).status_code == 404
            page = samples((await client.get("/metrics")).text)
    assert seen == [("/api/quotes", "/api")]
    assert value(page, "engine_ops_http_requests_total", endpoint="/api", code="201") == 1


async def test_a_stop_request_ends_the_server_within_its_drain_period() -> None:
    entered = trio.Event()

    async def hangs(scope: Any, receive: Any, send: Any) -> None:
        entered.set()
        await trio.sleep_forever()

    async def slow_request(url: str) -> None:
        async with httpx.AsyncClient() as client:
            with pytest.raises(httpx.RemoteProtocolError):
                await client.get(f"{url}/slow")

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            start = functools.partial(
                engine.serve_ops, port=0, routes={"/slow": hangs}, drain_period=0.2
            )
            ops: engine.OpsServer = await nursery.start(start)
            nursery.start_soon(slow_request, ops.url)
            await entered.wait()
            engine.current_shutdown().request("test stop")
            stop_requested = trio.current_time()
        # serve_ops returned by itself: the hung request was cut after the drain.
        took = trio.current_time() - stop_requested
    assert 0.2 <= took < 1.0
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((ops.host, ops.port), timeout=1).close()


async def never_called(scope: Any, receive: Any, send: Any) -> None:
    raise AssertionError("not a route")


async def test_settings_are_checked_and_the_registry_is_private() -> None:
    with pytest.raises(ValueError, match="drain_period"):
        await engine.serve_ops(port=0, drain_period=-1)
    with pytest.raises(ValueError, match="stall_threshold"):
        await engine.serve_ops(port=0, stall_threshold=0)
    with pytest.raises(ValueError, match="would hide the ops endpoint /health"):
        await engine.serve_ops(port=0, routes={"/health/": never_called})
    with pytest.raises(TypeError, match=r"sources\['x'\] must have a statistics"):
        await engine.serve_ops(port=0, sources={"x": object()})  # type: ignore[dict-item]  # on purpose

    registry = CollectorRegistry()
    with trio.fail_after(5):
        async with serving(registry=registry, stall_threshold=math.inf) as (ops, client):
            assert ops.registry is registry
            assert ops.loop_watch is None
            await client.get("/health")
            with socket.socket() as taken:
                taken.bind(("127.0.0.1", 0))
                taken.listen()
                with pytest.raises(OSError, match="in use"):
                    await engine.serve_ops(port=taken.getsockname()[1])
    assert (
        registry.get_sample_value(
            "engine_ops_http_requests_total", {"endpoint": "/health", "code": "200"}
        )
        == 1
    )
    assert (
        REGISTRY.get_sample_value(
            "engine_ops_http_requests_total", {"endpoint": "/health", "code": "200"}
        )
        is None
    )


@pytest.mark.subprocess
def test_ops_example_runs() -> None:
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "ops_probes.py")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "/health 200 ok"
    assert lines[1] == "/ready 200 ok"
    assert lines[2].startswith("/health 503 child 'service/watchlist' stalled: no heartbeat for")
    assert lines[3].startswith("/health 503 (loop blocked) event loop stalled")
    assert "in listen_forever: unblock.wait(5)" in lines[3]
    assert "in task 'redis_subscriber'" in lines[3]
    assert lines[4] == "/health 200 ok"
    assert 'engine_child_stalls_total{child="service/watchlist"} 1.0' in lines
    (stalls,) = (line for line in lines if line.startswith("engine_loop_stalls_total "))
    assert float(stalls.split()[1]) >= 1  # a noisy machine may add stalls of its own
    # /status: the watchlist was restarted once and runs again.
    assert json.loads(lines[-1]) == {"feed": ["running", 0], "watchlist": ["running", 1]}


class _Broker:
    """A source that says whether its connection is up, as a bus adapter does."""

    def __init__(self) -> None:
        self.up = True

    def statistics(self) -> dict[str, int]:
        return {}

    def health(self) -> engine.SourceHealth:
        if self.up:
            return engine.SourceHealth("connected", detail={"connections": 2})
        return engine.SourceHealth("reconnecting", ready=False)


async def test_a_source_that_is_not_ready_makes_ready_503_and_health_lists_it() -> None:
    broker = _Broker()
    with trio.fail_after(5):
        async with serving(sources={"bus": broker}) as (_, client):
            health = (await client.get("/health")).json()
            assert health["sources"] == {
                "bus": {"state": "connected", "ready": True, "connections": 2}
            }
            assert (await client.get("/ready")).status_code == 200
            broker.up = False
            ready = await client.get("/ready")
            assert ready.status_code == 503
            assert ready.json()["reasons"] == ["source 'bus' is not ready: reconnecting"]
            # Alive all the same: a broker outage is no reason to restart the process.
            health_down = await client.get("/health")
            assert health_down.status_code == 200
            assert health_down.json()["sources"]["bus"]["state"] == "reconnecting"
            broker.up = True
            assert (await client.get("/ready")).status_code == 200
