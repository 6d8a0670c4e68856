"""Follow an order-status log: malformed lines, a truncation, a rotation, every order once.

Writes a Hyperliquid-style log with ten malformed lines among 1,010, follows
it with an OrderLog, then truncates the file and later rotates it (rename,
new file) while it is followed; a subscriber counts the orders that reach
the bus (by default each message is one coin's orders, as a JSON array).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import msgspec
import trio

import engine
from engine.bus import MemoryBus
from services.market.orders import OrderLog, OrderLogConfig


def node_line(oid: int, coin: str = "BTC", status: str = "open") -> bytes:
    """One line as a Hyperliquid node writes it (node_order_statuses)."""
    order: dict[str, object] = {
        "coin": coin,
        "side": "B" if oid % 2 else "A",
        "limitPx": f"{65000 + oid % 100}.5",
        "sz": "0.01",
        "oid": oid,
        "timestamp": 1_735_689_600_000 + oid,
        "orderType": "Limit",
        "origSz": "0.01",
        "tif": "Gtc",
        "cloid": None,
    }
    record: dict[str, object] = {"time": f"2025-01-01T00:00:{oid % 60:02d}.000000000"}
    record |= {"user": "0x01", "status": status, "order": order}
    return json.dumps(record).encode() + b"\n"


def write(path: Path, data: bytes, mode: str = "ab") -> None:
    with open(path, mode) as file:
        file.write(data)


async def main() -> None:
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "node_order_statuses"
        lines = [
            b'{"time": "2025-01-01T00:00:00", "status": "open", "order": {"coin": 7}}\n'
            if i % 101 == 50
            else node_line(i, coin=("BTC", "ETH", "SOL")[i % 3])
            for i in range(1010)
        ]
        await engine.to_thread(write, path, b"".join(lines))

        bus = MemoryBus()
        log = OrderLog(OrderLogConfig(path, poll_interval=0.05), bus)
        async with (
            trio.open_nursery() as nursery,
            bus.subscribe("orders.>", maxsize=10_000, overflow="block") as orders,
        ):
            await nursery.start(log.follow)
            received = 0

            async def take(count: int) -> None:
                nonlocal received
                async for message in orders:
                    received += len(msgspec.json.decode(message.data))
                    if received >= count:
                        return

            await take(1000)
            stats = log.statistics()
            print(
                f"published {stats.orders} orders of {stats.lines} lines; "
                f"{stats.malformed} malformed"
            )
            print(f"malformed sample: {stats.malformed_samples[0][:70]}")

            # Truncated in place (logrotate's copytruncate), then written again.
            fresh = b"".join(node_line(5000 + i) for i in range(5))
            await engine.to_thread(write, path, fresh, "wb")
            await take(1005)
            stats = log.statistics()
            print(f"after truncation: truncations={stats.truncations}, orders={stats.orders}")

            # Rotated: renamed away, and a new file under the same name.
            await engine.to_thread(path.rename, path.with_name("node_order_statuses.1"))
            rotated_in = b"".join(node_line(6000 + i, status="filled") for i in range(5))
            await engine.to_thread(write, path, rotated_in)
            await take(1010)
            stats = log.statistics()
            print(f"after rotation: rotations={stats.rotations}, orders={stats.orders}")
            print(f"newest: {log.recent_json(1)[1:-1].decode()}")
            nursery.cancel_scope.cancel()


if __name__ == "__main__":
    trio.run(main)
