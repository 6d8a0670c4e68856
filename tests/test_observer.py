"""The observer's feed and routes without a browser: sampling, dropping, the action guard.

The feed's timing is tested in virtual time; the routes over real HTTP on
127.0.0.1 (the browser tests in ``test_observer_browser.py`` cover the page).
"""

from __future__ import annotations

import functools
import json
import logging
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import trio.testing

import engine
from engine._observer import Observer, TooManyViewers, Viewer, frame, snapshot
from engine._observer_app import ObserverApp

# -- the feed, in virtual time ------------------------------------------------


class Builds:
    """A snapshot builder that counts its calls and stamps each snapshot with the time."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self) -> bytes:
        self.calls += 1
        return f"{trio.current_time():.2f}".encode()


async def test_no_viewer_means_no_snapshot_built(autojump_clock: trio.testing.MockClock) -> None:
    build = Builds()
    observer = Observer(build, interval=0.5)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(observer.run)
        await trio.sleep(10)
        assert (build.calls, observer.ticks) == (0, 0)
        nursery.cancel_scope.cancel()


async def test_a_viewer_gets_one_snapshot_per_tick_on_the_grid(
    autojump_clock: trio.testing.MockClock,
) -> None:
    start = trio.current_time()
    observer = Observer(Builds(), interval=0.5)
    received: list[float] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(observer.run)
        with observer.viewer() as viewer:
            for _ in range(5):
                received.append(float(await viewer.next()) - start)
            assert viewer.dropped == 0
        nursery.cancel_scope.cancel()
    # The first at once (on connecting), then every 0.5 s exactly.
    assert received == [0.0, 0.5, 1.0, 1.5, 2.0]
    assert observer.statistics().ticks == 4


async def test_a_slow_viewer_drops_snapshots_and_never_holds_the_sampler(
    autojump_clock: trio.testing.MockClock,
) -> None:
    start = trio.current_time()
    observer = Observer(Builds(), interval=0.5)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(observer.run)
        with observer.viewer() as slow, observer.viewer() as quick:
            got_quick: list[bytes] = []
            for _ in range(6):
                got_quick.append(await quick.next())
            # The slow one never read: it holds only the newest snapshot, the rest dropped.
            assert (quick.dropped, slow.dropped) == (0, 5)
            assert float(await slow.next()) - start == 2.5
            assert observer.statistics().dropped == 5
        assert observer.statistics().viewers == 0
        assert observer.statistics().dropped == 5  # kept after the viewer left
        nursery.cancel_scope.cancel()
    assert len(got_quick) == 6


async def test_sampling_stops_when_the_last_viewer_leaves(
    autojump_clock: trio.testing.MockClock,
) -> None:
    build = Builds()
    observer = Observer(build, interval=0.5)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(observer.run)
        with observer.viewer() as viewer:
            await viewer.next()
            await viewer.next()
        calls = build.calls
        await trio.sleep(5)
        assert build.calls == calls
        nursery.cancel_scope.cancel()


async def test_viewers_past_the_bound_are_refused() -> None:
    observer = Observer(Builds(), max_viewers=2)
    with observer.viewer(), observer.viewer(), pytest.raises(TooManyViewers), observer.viewer():
        pass
    assert observer.statistics().refused == 1
    with observer.viewer():  # room again
        pass


async def test_closing_ends_every_feed_and_refuses_new_viewers() -> None:
    observer = Observer(Builds())
    with observer.viewer() as viewer:
        await viewer.next()
        observer.close()
        with pytest.raises(trio.EndOfChannel):
            await viewer.next()
    with pytest.raises(TooManyViewers), observer.viewer():
        pass


def test_offer_keeps_only_the_newest() -> None:
    viewer = Viewer()
    assert viewer.offer(b"1")
    assert not viewer.offer(b"2")
    assert viewer.dropped == 1


def test_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="interval"):
        Observer(Builds(), interval=0)
    with pytest.raises(ValueError, match="interval"):
        Observer(Builds(), interval=float("inf"))
    with pytest.raises(ValueError, match="max_viewers"):
        Observer(Builds(), max_viewers=0)


def test_frames_are_json_events() -> None:
    shot = snapshot(b'{"supervisor":null}', clock=12.5, wall=1000.0)
    event = frame(shot, dropped=3)
    assert event.startswith(b"data: ")
    assert event.endswith(b"\n\n")
    assert json.loads(event[6:]) == {
        "dropped": 3,
        "snapshot": {"clock": 12.5, "wall": 1000.0, "status": {"supervisor": None}},
    }


# -- the action guard -----------------------------------------------------------


def test_actions_are_refused_without_a_token_set() -> None:
    app = ObserverApp(Observer(Builds()), None, None)
    assert app.authorize(b"Bearer anything") == (
        403,
        "actions are disabled: the ops server has no token",
    )


@pytest.mark.parametrize("header", [None, b"Bearer wrong", b"secret", b"Bearer secret "])
def test_actions_need_the_right_bearer_token(header: bytes | None) -> None:
    app = ObserverApp(Observer(Builds()), None, "secret")
    assert app.authorize(header) == (401, "actions need Authorization: Bearer <token>")
    assert app.authorize(b"Bearer secret") is None


# -- the routes, over HTTP ------------------------------------------------------


async def beating() -> None:
    while True:
        engine.heartbeat()
        await trio.sleep(0.02)


@asynccontextmanager
async def serving(
    sup: engine.Supervisor | None, **options: Any
) -> AsyncIterator[tuple[engine.OpsServer, httpx.AsyncClient]]:
    async with httpx.AsyncClient() as client, trio.open_nursery() as nursery:
        ops = await nursery.start(functools.partial(engine.serve_ops, sup, port=0, **options))
        client.base_url = httpx.URL(ops.url)
        yield ops, client
        nursery.cancel_scope.cancel()


async def open_events(ops: engine.OpsServer) -> trio.SocketStream:
    """A raw connection that asked for /ui/events (HTTP/1.0: the body is the bare stream)."""
    stream = await trio.open_tcp_stream(ops.host, ops.port)
    await stream.send_all(b"GET /ui/events HTTP/1.0\r\nHost: test\r\n\r\n")
    return stream


async def read_events(ops: engine.OpsServer, count: int) -> tuple[bytes, list[Any]]:
    """The response head and the first ``count`` events of /ui/events."""
    async with await open_events(ops) as stream:
        data = b""
        while data.count(b"\n\ndata: ") < count + 1 and (chunk := await stream.receive_some()):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    events = [json.loads(part[6:]) for part in body.split(b"\n\n") if part.startswith(b"data: ")]
    return head, events[:count]


async def test_the_page_and_its_files_are_served_with_connection_close() -> None:
    with trio.fail_after(10):
        async with serving(None) as (_, client):
            page = await client.get("/ui")
            assert page.status_code == 200
            assert page.headers["content-type"].startswith("text/html")
            assert page.headers["connection"] == "close"
            assert '<script src="/ui/observer.js">' in page.text
            for path, kind in [
                ("/ui/observer.js", "text/javascript"),
                ("/ui/observer.css", "text/css"),
            ]:
                answer = await client.get(path)
                assert (answer.status_code, answer.headers["content-type"].split(";")[0]) == (
                    200,
                    kind,
                )
                assert "://" not in answer.text  # nothing fetched from elsewhere: works offline
            assert (await client.get("/ui/nothing")).status_code == 404
            pulse = await client.get("/ui/pulse")
            assert pulse.json() == {"status": "ok", "actions": False}


async def test_ui_off_leaves_the_paths_to_mounted_apps() -> None:
    with trio.fail_after(10):
        async with serving(None, ui=False) as (_, client):
            assert (await client.get("/ui")).status_code == 404


async def test_the_stream_sends_status_snapshots_and_counts_the_viewer() -> None:
    with trio.fail_after(10):
        async with engine.open_supervisor(name="svc") as sup:
            sup.start_soon(beating, name="worker")
            async with serving(sup, ui_interval=0.05) as (ops, client):
                head, events = await read_events(ops, 3)
                assert b"content-type: text/event-stream" in head.lower()
                status = events[-1]["snapshot"]["status"]
                assert [c["name"] for c in status["supervisor"]["children"]] == ["worker"]
                assert events[-1]["dropped"] == 0
                clocks = [e["snapshot"]["clock"] for e in events]
                assert clocks == sorted(set(clocks))
                # The stream is counted once the server has seen the viewer leave.
                counted = 'engine_ops_http_requests_total{code="200",endpoint="/ui/events"} 1.0'
                while counted not in (metrics := (await client.get("/metrics")).text):  # noqa: ASYNC110 -- no event to wait on: another connection's end
                    await trio.sleep(0.01)
                assert "engine_observer_viewers 0.0" in metrics
                ticks = next(
                    m for m in metrics.splitlines() if m.startswith("engine_observer_ticks")
                )
                assert float(ticks.split()[-1]) >= 2  # 3 events: 1 on connecting, then ticks
                sup.cancel()


async def test_a_stop_request_ends_open_streams_at_once() -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            serve = functools.partial(engine.serve_ops, port=0, drain_period=30)
            ops = await nursery.start(serve)
            stream = await open_events(ops)
            async with stream:
                await stream.receive_some()
                stopped_at = trio.current_time()
                engine.current_shutdown().request("test")
                while await stream.receive_some():  # the stream ends, well before drain_period
                    pass
            assert trio.current_time() - stopped_at < 5


async def test_actions_are_guarded_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="engine.ops.ui")
    with trio.fail_after(10):
        async with engine.open_supervisor(name="svc") as sup:
            sup.start_soon(beating, name="worker")
            async with serving(sup, ui_token="s3cret") as (_, client):
                assert (await client.get("/ui/pulse")).json()["actions"] is True
                stop = functools.partial(client.post, "/ui/actions/stop", json={"child": "worker"})
                refused = await stop()
                assert refused.status_code == 401
                assert refused.headers["www-authenticate"] == "Bearer"
                assert (await stop(headers={"Authorization": "Bearer nope"})).status_code == 401
                assert sup.children == ("worker",)
                good = {"Authorization": "Bearer s3cret"}
                bad_body = await client.post("/ui/actions/stop", content=b"{", headers=good)
                assert bad_body.status_code == 400
                missing = await client.post(
                    "/ui/actions/stop", json={"child": "ghost"}, headers=good
                )
                assert missing.status_code == 404
                done = await stop(headers=good)
                assert (done.status_code, done.json()) == (200, {"stopped": "worker"})
                assert "worker" not in sup.children
                sup.cancel()
    messages = [r.getMessage() for r in caplog.records if r.name == "engine.ops.ui"]
    assert any("refused for 127.0.0.1:" in m for m in messages)
    assert any(m.startswith("ui action by 127.0.0.1:") and "'worker'" in m for m in messages)


async def test_actions_are_forbidden_without_a_token() -> None:
    with trio.fail_after(10):
        async with serving(None) as (_, client):
            answer = await client.post("/ui/actions/stop", json={"child": "x"})
            assert answer.status_code == 403


async def test_too_many_viewers_get_503() -> None:
    with trio.fail_after(10):
        async with serving(None) as (_, client), AsyncExitStack() as streams:
            for _ in range(16):  # the server's bound
                opened = await streams.enter_async_context(client.stream("GET", "/ui/events"))
                assert opened.status_code == 200
            refused = await client.get("/ui/events")
            assert refused.status_code == 503
            assert refused.json() == {"error": "16 viewers are connected already"}
            metrics = (await client.get("/metrics")).text
            assert 'engine_ops_http_requests_total{code="503",endpoint="/ui/events"} 1.0' in metrics
            assert "engine_observer_refused_total 1.0" in metrics


# -- the docs' example ------------------------------------------------------------


@pytest.mark.subprocess
def test_the_docs_example_serves_the_page() -> None:
    example = Path(__file__).resolve().parent.parent / "docs" / "examples" / "observer.py"
    command = [sys.executable, str(example), "--port", "0", "--seconds", "3"]
    with subprocess.Popen(command, stdout=subprocess.PIPE, text=True) as process:
        assert process.stdout is not None
        line = process.stdout.readline()
        assert line.startswith("observer at http://127.0.0.1:")
        url = line.split()[-1]
        page = httpx.get(url, timeout=5)
        assert (page.status_code, "engine observer" in page.text) == (200, True)
        status = httpx.get(url.replace("/ui", "/status"), timeout=5).json()
        names = [child["name"] for child in status["supervisor"]["children"]]
        assert names == ["feed", "parser", "blocker"]
        assert process.wait(timeout=15) == 0
