"""The bus seam and its in-memory implementation."""

from __future__ import annotations

import typing

import pytest
import trio

import engine.bus
from engine.bus import Bus, BusMessage, MemoryBus


async def relay(bus: Bus, topic: str, payloads: list[bytes]) -> None:
    """Callers see only the Bus protocol; any adapter fits here."""
    for payload in payloads:
        await bus.publish(topic, payload, msg_id=payload.decode())


async def test_memory_bus_is_a_bus_and_delivers_bytes_by_pattern() -> None:
    bus = MemoryBus()
    async with bus.subscribe("trades.>", maxsize=10) as trades:
        await relay(bus, "trades.BTCUSDT", [b"t1", b"t2"])
        await relay(bus, "orders.filled", [b"o1"])
        await bus.aclose()
        received = [message async for message in trades]
    assert received == [
        BusMessage("trades.BTCUSDT", b"t1", "t1"),
        BusMessage("trades.BTCUSDT", b"t2", "t2"),
    ]
    await received[0].ack()  # at most once: acknowledging is a no-op


async def test_memory_bus_overflow_policy_and_statistics() -> None:
    bus = MemoryBus()
    async with bus.subscribe("q", maxsize=2, overflow="drop_oldest") as sub:
        for i in range(5):
            bus.publish_nowait("q", b"%d" % i)
        assert [m.data for m in await sub.receive_batch(10)] == [b"3", b"4"]
        (stats,) = bus.statistics().subscriptions
        assert (stats.offered, stats.dropped, stats.delivered) == (5, 3, 2)


async def test_memory_bus_rejects_what_would_not_cross_a_real_bus() -> None:
    bus = MemoryBus()
    with pytest.raises(TypeError, match="data must be bytes, got str"):
        await bus.publish("t", "text")  # type: ignore[arg-type]  # deliberately wrong
    with pytest.raises(ValueError, match="maxsize must be >= 1"):
        bus.subscribe("t", maxsize=0)
    await bus.aclose()
    with pytest.raises(trio.ClosedResourceError):
        await bus.publish("t", b"x")


def test_bus_package_surface() -> None:
    assert engine.bus.__all__ == sorted(engine.bus.__all__)
    for name in engine.bus.__all__:
        value = getattr(engine.bus, name)
        if typing.get_origin(value) is typing.Literal:
            # A Literal alias cannot carry a docstring: its enum documents it.
            assert set(typing.get_args(value)) == {m.value for m in getattr(engine.bus, name[:-4])}
            continue
        assert value.__doc__, name


@pytest.mark.parametrize(
    ("pattern", "topic", "expected"),
    [
        ("trades.BTCUSDT", "trades.BTCUSDT", True),
        ("trades.*", "trades.BTCUSDT", True),
        ("trades.*", "trades.BTCUSDT.agg", False),
        ("trades.>", "trades.BTCUSDT.agg", True),
        ("trades.>", "trades", False),
        ("*.BTCUSDT", "book.BTCUSDT", True),
        ("orders.>", "trades.BTCUSDT", False),
    ],
)
def test_tokens_match_follows_nats_subject_rules(pattern: str, topic: str, expected: bool) -> None:
    assert engine.bus.tokens_match(tuple(pattern.split(".")), tuple(topic.split("."))) is expected
