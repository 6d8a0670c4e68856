"""Seed 004's service done right: a Redis channel relayed to WebSocket clients.

Run it: ``REDIS_URL=redis://localhost:6379/0 python docs/examples/redis_relay.py``
(or give the URL as the first argument). It relays the Redis pub/sub channel
``trade_events`` to ``ws://127.0.0.1:8765/ws?topics=*`` and answers /health,
/ready and /metrics on port 8000 from the first moment: the bus reads Redis in
worker threads, so nothing blocks the event loop. SIGTERM drains it: the
broadcast hands clients what they are owed and closes them with 1001.

``--demo N`` checks itself on free ports: it publishes N messages to Redis,
receives them over its own WebSocket, asks /health, then sends itself SIGTERM.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import sys
from typing import cast

import httpx
import trio
import trio_websocket

import engine
from engine.broadcast import BroadcastConfig, BroadcastServer, serve_broadcast
from engine.bus import Bus, connect

CHANNEL = "trade_events"


async def demo(bus: Bus, broadcast: BroadcastServer, ops: engine.OpsServer, count: int) -> None:
    """Publish ``count`` trades to Redis, read them back over the WebSocket."""
    async with trio_websocket.open_websocket_url(f"{broadcast.url}?topics=*") as ws:
        with trio.fail_after(10):
            for index in range(count):
                await bus.publish(CHANNEL, json.dumps({"type": "trade", "i": index}).encode())
            received = [json.loads(await ws.get_message())["i"] for _ in range(count)]
    in_order = "in order" if received == list(range(count)) else "OUT OF ORDER"
    print(f"relayed {len(received)} of {count} {CHANNEL} messages over the WebSocket, {in_order}")
    async with httpx.AsyncClient() as client:
        print("/health:", (await client.get(f"{ops.url}/health")).status_code)
    os.kill(os.getpid(), signal.SIGTERM)  # as an orchestrator would


async def main(url: str, count: int) -> engine.ShutdownReport:
    ws_port, ops_port = (0, 0) if count else (8765, 8000)
    # A bare name in bus_topics means a kind ("trade_events.>"), so the one-token
    # channel is served as "*": every one-token topic, trade_events among them.
    config = BroadcastConfig(bus_topics=("*",), port=ws_port)
    async with (
        connect(url) as bus,
        trio.open_nursery() as nursery,
        engine.open_supervisor(name="relay") as sup,
    ):
        started = await sup.start(serve_broadcast, bus, config, name="broadcast")
        broadcast = cast(BroadcastServer, started)  # what serve_broadcast reports
        sources: dict[str, engine.HasStatistics] = {"bus": bus, "broadcast": broadcast}
        serve = functools.partial(engine.serve_ops, sup, port=ops_port, sources=sources)
        ops: engine.OpsServer = await nursery.start(serve)
        print(f"relaying {CHANNEL} to {broadcast.url}; health at {ops.url}/health")
        if count:
            nursery.start_soon(demo, bus, broadcast, ops, count)
        await engine.current_shutdown().wait()  # SIGTERM or SIGINT asks; nothing cancelled
        return await sup.shutdown("stop requested")


if __name__ == "__main__":
    args = sys.argv[1:]
    count = int(args.pop(args.index("--demo") + 1)) if "--demo" in args else 0
    args = [a for a in args if a != "--demo"]
    redis_url = args[0] if args else os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
    report = engine.run(main, redis_url, count, grace_period=10)
    for child in report.children:
        print(f"{child.name}: {child.outcome}")
