"""Seed 003 rebuilt: a bursty feed, a bounded queue with a declared policy, five consumers, a hub.

Run it: ``python docs/examples/channels_feed.py``. It finishes in well under a second.
"""

from __future__ import annotations

import trio

import engine


async def feed(send: engine.SendChannel[dict[str, float]]) -> None:
    """A burst of 2,000 trades, faster than any one consumer could take them."""
    async with send:
        for i in range(2_000):
            await send.send({"id": i, "price": 100 + i % 7, "qty": 1 + i % 3})


async def main() -> None:
    hub = engine.Hub[dict[str, float]](name="bus")
    # Lossless ingest: the feed waits when processors fall behind (overflow="block").
    send, receive = engine.open_channel[dict[str, float]](1_000, overflow="block")

    async def process(trade: dict[str, float]) -> None:
        await trio.lowlevel.checkpoint()  # normalising, enriching...
        if trade["id"] == 13:
            raise ValueError("malformed trade 13")  # counted, logged, not fatal
        await hub.publish(f"trades.{'BTC' if trade['id'] % 2 else 'ETH'}", trade)

    processors = engine.Consumers(process, workers=5, name="processors")
    async with (
        # A live dashboard: keep up with the newest, drop the oldest when behind.
        hub.subscribe("trades.>", maxsize=100, overflow="drop_oldest") as dashboard,
        # A client that never reads: cut off with an exact count of what it lost.
        hub.subscribe("trades.BTC", maxsize=50, overflow="disconnect") as stuck_client,
        trio.open_nursery() as nursery,
    ):
        nursery.start_soon(feed, send)
        await processors.run(receive)  # ends when the feed closes and all is handled
        hub.close()
        dashboard_messages = [message async for _, message in dashboard]
        try:
            async for _ in stuck_client:
                pass
        except engine.SubscriberDisconnected as exc:
            print(f"stuck client: {exc}")

    channel = send.statistics()
    print(f"ingest: sent={channel.sent} delivered={channel.delivered} dropped={channel.dropped}")
    stats = processors.statistics()
    print(f"processors: processed={stats.processed} errors={stats.errors} ({stats.last_error})")
    print(f"dashboard: kept the newest {len(dashboard_messages)}, dropped the rest")


if __name__ == "__main__":
    import logging

    logging.basicConfig(level=logging.CRITICAL)  # the one handler error is summarised above
    trio.run(main)
