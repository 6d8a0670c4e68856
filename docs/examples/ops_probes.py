"""Health, readiness, metrics and status of a supervised service (docs/ops.md).

A supervisor runs a feed and a watchlist refresher. The refresher's first
REST call hangs in a thread its watchdog cannot cancel, and /health names
it. Then a task blocks the whole event loop, the way seed 004's
``pubsub.listen()`` did, and a probe from another thread still gets an
answer that says which task holds the loop and on which line.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable

import httpx
import trio

import engine


async def feed(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    task_status.started()  # connected: ready for traffic
    while True:
        engine.heartbeat()
        await trio.sleep(0.05)


async def watchlist(rest_call_returns: threading.Event) -> None:
    while True:
        engine.heartbeat()
        # A blocking REST call in a thread that cannot be abandoned: until it
        # returns, the watchdog's cancel cannot take effect.
        await trio.to_thread.run_sync(rest_call_returns.wait)
        await trio.sleep(0.05)


def listen_forever(unblock: threading.Event) -> None:
    unblock.wait(5)  # stands in for redis-py's blocking pubsub.listen()


async def redis_subscriber(unblock: threading.Event) -> None:
    listen_forever(unblock)  # wrong on purpose: blocks the event loop


def probe_while_blocked(url: str, unblock: threading.Event) -> None:
    """Runs in a thread while the loop is blocked: what a kubelet would see."""
    try:
        response = httpx.get(f"{url}/health", timeout=2)
        print("/health", response.status_code, "(loop blocked)", response.json()["reasons"][0])
    finally:
        unblock.set()


async def until(condition: Callable[[], bool]) -> None:
    while not condition():  # noqa: ASYNC110 -- watchdogs fire after real seconds: poll
        await trio.sleep(0.01)


async def show(client: httpx.AsyncClient, path: str) -> None:
    response = await client.get(path)
    body = response.json()
    print(path, response.status_code, body["status"] if response.is_success else body["reasons"][0])


async def main() -> None:
    engine.configure_logging("WARNING")  # the engine's own account, on stderr
    rest_call_returns = threading.Event()
    # Build the HTTP client before the ops server starts watching the loop:
    # loading CA certificates blocks for ~100 ms, which it would report as a stall.
    client = httpx.AsyncClient()
    async with trio.open_nursery() as nursery, engine.open_supervisor(name="service") as sup:
        ops: engine.OpsServer = await nursery.start(engine.serve_ops, sup, "127.0.0.1", 0)
        client.base_url = httpx.URL(ops.url)
        async with client:
            sup.start_soon(feed, name="feed", reports_ready=True)
            sup.start_soon(
                watchlist,
                rest_call_returns,
                name="watchlist",
                stall_after=0.3,
                backoff=engine.Backoff(initial=0.05),
            )

            def watchlist_stats() -> engine.ChildStatistics:
                return sup.statistics().children[1]

            await until(lambda: sup.statistics().children[0].ready)
            await show(client, "/health")
            await show(client, "/ready")

            await until(lambda: watchlist_stats().stalls == 1)  # its watchdog fired
            await show(client, "/health")
            rest_call_returns.set()  # the call returns; the watchdog's cancel lands
            await until(lambda: watchlist_stats().restarts == 1)  # restarted, healthy

            unblock = threading.Event()
            prober = threading.Thread(target=probe_while_blocked, args=(ops.url, unblock))
            prober.start()
            async with trio.open_nursery() as tasks:
                tasks.start_soon(redis_subscriber, unblock, name="redis_subscriber")
            await trio.to_thread.run_sync(prober.join)
            await show(client, "/health")

            metrics = (await client.get("/metrics")).text
            wanted = ("engine_child_stalls_total{", "engine_loop_stalls_total ")
            for line in metrics.splitlines():
                if line.startswith(wanted):
                    print(line)
            status = (await client.get("/status")).json()
            children = status["supervisor"]["children"]
            print(json.dumps({c["name"]: [c["state"], c["restarts"]] for c in children}))
        sup.cancel()
        nursery.cancel_scope.cancel()


if __name__ == "__main__":
    trio.run(main)
