"""The observer page in a real browser: headless Chromium from the system, driven by Playwright.

The service runs in its own thread (its own ``trio.run``) so that the tests,
which drive the browser synchronously, can block its loop and make its
children fail while the page watches. These are the only tests of the suite
allowed to skip: on a machine without Chromium or Playwright they skip with
the way to install them; under ``CI=true`` a missing browser fails instead.
"""

from __future__ import annotations

import asyncio
import functools
import os
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

import engine

SCREENSHOT = Path(__file__).resolve().parent.parent / "docs" / "observer.png"
TOKEN = "observer-test-token"
_INSTALL = "apt-get install chromium && pip install playwright"


def _browser_path() -> str:
    """Chromium's path, or a skip (a failure under CI=true) saying how to install it."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    try:
        import playwright.sync_api  # noqa: F401 -- only checking it is installed
    except ImportError:
        found = None
    if found is None:
        reason = f"the observer's browser tests need Chromium and Playwright: {_INSTALL}"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    return found


class Service:
    """A supervised service with an ops server, running in a thread of its own."""

    def __init__(self) -> None:
        self.fail = threading.Event()  # the 'flaky' child raises once when set
        self.block = threading.Event()  # the 'blocker' child blocks the loop when set
        self.release = threading.Event()  # ends the block
        self.url = ""
        self._ready = threading.Event()
        self._token: trio.lowlevel.TrioToken | None = None
        self._scope: trio.CancelScope | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="observed-service")

    def __enter__(self) -> Service:
        self._thread.start()
        if not self._ready.wait(10) or not self.url:
            raise RuntimeError(f"the observed service did not start: {self._error!r}")
        return self

    def __exit__(self, *exc: object) -> None:
        self.release.set()
        if self._token is not None and self._scope is not None:
            self._token.run_sync_soon(self._scope.cancel)
        self._thread.join(10)
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        try:
            trio.run(self._main)
        except BaseException as exc:
            self._error = exc
        finally:
            self._ready.set()

    async def _main(self) -> None:
        send, receive = engine.open_channel[int](64, overflow="drop_oldest")
        with trio.CancelScope() as self._scope:
            async with trio.open_nursery() as nursery, engine.open_supervisor(name="svc") as sup:
                quick = engine.Backoff(initial=0.01, maximum=0.01)
                sup.start_soon(_steady, name="steady", stall_after=5)
                sup.start_soon(self._flaky, name="flaky", backoff=quick)
                sup.start_soon(self._blocker, name="blocker")
                sup.start_soon(_pump, send, receive, name="pump")
                serve = functools.partial(
                    engine.serve_ops, sup, port=0, sources={"queue": send}, ui_token=TOKEN
                )
                ops: engine.OpsServer = await nursery.start(serve)
                self.url = ops.url
                self._token = trio.lowlevel.current_trio_token()
                self._ready.set()
                await trio.sleep_forever()

    async def _flaky(self) -> None:
        while True:
            if self.fail.is_set():
                self.fail.clear()
                raise RuntimeError("flaky failed on purpose")
            engine.heartbeat()
            await trio.sleep(0.01)

    async def _blocker(self) -> None:
        while True:
            if self.block.is_set():
                self.block.clear()
                self.release.wait(5)  # blocks the event loop on purpose
            await trio.sleep(0.01)


async def _steady() -> None:
    while True:
        engine.heartbeat()
        await trio.sleep(0.05)


async def _pump(send: engine.SendChannel[int], receive: engine.ReceiveChannel[int]) -> None:
    for n in range(10**9):
        send.send_nowait(n)
        if n % 3 == 0:
            receive.receive_nowait()
        await trio.sleep(0.01)


def status_tree(url: str) -> dict[str, tuple[str, int]]:
    """Every child of /status by path: its state and restarts."""
    body = httpx.get(f"{url}/status", timeout=5).json()
    found: dict[str, tuple[str, int]] = {}

    def walk(sup: dict[str, Any], prefix: str) -> None:
        for child in sup["children"]:
            path = f"{prefix}/{child['name']}"
            found[path] = (child["state"], child["restarts"])
            for inner in child["attached"]:
                if inner["type"] == "SupervisorStatistics":
                    walk(inner, path)

    walk(body["supervisor"], body["supervisor"]["name"])
    return found


def page_tree(page: Any) -> dict[str, tuple[str, int]]:
    """Every child the page shows by path: its state and restarts."""
    rows = page.eval_on_selector_all(
        "li[data-state]",
        "items => items.map(i => [i.dataset.path, i.dataset.state, Number(i.dataset.restarts)])",
    )
    return {path: (state, restarts) for path, state, restarts in rows}


@pytest.fixture(scope="module")
def service() -> Iterator[Service]:
    with Service() as running:
        yield running


@pytest.fixture(scope="module")
def page(service: Service) -> Iterator[Any]:
    executable = _browser_path()
    from playwright.sync_api import sync_playwright

    # Playwright's sync API runs an asyncio loop of its own in this thread. Once
    # trio-asyncio is imported (the bus tests import it) its policy is the
    # process-wide one and makes loops that refuse that; use asyncio's own here.
    policy = asyncio.get_event_loop_policy()
    asyncio.set_event_loop_policy(asyncio.DefaultEventLoopPolicy())
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=executable, headless=True)
            try:
                opened = browser.new_page(viewport={"width": 1280, "height": 900})
                opened.on("dialog", lambda dialog: dialog.accept(TOKEN))
                opened.goto(f"{service.url}/ui")
                opened.wait_for_selector("#live[data-state='live']", timeout=5000)
                yield opened
            finally:
                browser.close()
    finally:
        asyncio.set_event_loop_policy(policy)


def test_the_page_shows_the_tree_of_status(service: Service, page: Any) -> None:
    assert page.title() == "engine observer"
    deadline = time.monotonic() + 3
    while True:  # the page lags /status by at most a tick: compare until they agree
        expected = status_tree(service.url)
        shown = page_tree(page)
        if shown == expected or time.monotonic() > deadline:
            break
        page.wait_for_timeout(100)
    assert shown == expected
    assert set(shown) == {"svc/steady", "svc/flaky", "svc/blocker", "svc/pump"}
    assert page.inner_text("tr[data-source='queue']").startswith("queue")


def test_a_restart_shows_within_a_second(service: Service, page: Any) -> None:
    before = page_tree(page)["svc/flaky"][1]
    started = time.monotonic()
    service.fail.set()
    restarted = f"li[data-path='svc/flaky'][data-restarts='{before + 1}'] > .node.flash"
    page.wait_for_selector(restarted, timeout=1000)
    assert time.monotonic() - started < 1.0
    assert "flaky failed on purpose" in page.inner_text("li[data-path='svc/flaky']")


def test_a_blocked_loop_shows_the_stale_banner(service: Service, page: Any) -> None:
    service.release.clear()
    service.block.set()
    try:
        page.wait_for_selector("#stale:not([hidden])", timeout=4000)
        page.wait_for_function(
            "document.getElementById('stale').textContent.includes('blocker')", timeout=2000
        )
        banner = page.inner_text("#stale")
        assert banner.startswith("event loop blocked since ")
        assert "self.release.wait(5)" in banner  # the line the loop is stuck on
        assert page.get_attribute("#live", "data-state") == "stale"
        # As bytes: Playwright writes a path from a thread pool, which outlives the test.
        SCREENSHOT.write_bytes(page.screenshot(full_page=True))
    finally:
        service.release.set()
    page.wait_for_selector("#stale", state="hidden", timeout=3000)
    page.wait_for_selector("#live[data-state='live']", timeout=3000)
    page.wait_for_selector("#stalls li", timeout=3000)
    assert "blocker" in page.inner_text("#stalls")


def test_stop_button_stops_the_child_with_the_token(service: Service, page: Any) -> None:
    page.click("button[data-stop='steady']")  # the dialog handler answers the token prompt
    page.wait_for_selector("li[data-path='svc/steady']", state="detached", timeout=3000)
    assert "svc/steady" not in status_tree(service.url)
