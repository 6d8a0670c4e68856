"""``async for`` over an engine async context manager says which ``async with`` to write."""

from __future__ import annotations

import re

import pytest

import engine
from engine.bus import MemoryBus


def _hint(name: str, call: str, target: str, loop: str) -> str:
    return re.escape(
        f"{name}(...) is an async context manager: write "
        f"`async with {call}(...) as {target}: async for {loop} in {target}: ...`"
    )


async def test_async_for_over_iterate_in_thread() -> None:
    with pytest.raises(
        TypeError, match=_hint("iterate_in_thread", "engine.iterate_in_thread", "items", "item")
    ):
        async for _ in engine.iterate_in_thread([1, 2]):  # type: ignore[attr-defined]  # the mistake
            pass


async def test_async_for_over_map_batch() -> None:
    with pytest.raises(TypeError, match=_hint("map_batch", "engine.map_batch", "batch", "outcome")):
        async for _ in engine.map_batch(abs, [1, 2], bridge="thread"):  # type: ignore[attr-defined]  # the mistake
            pass


async def test_async_for_over_hub_subscribe() -> None:
    hub = engine.Hub[int]()
    with pytest.raises(
        TypeError, match=_hint("subscribe", "hub.subscribe", "sub", "topic, message")
    ):
        async for _ in hub.subscribe("trades.*", maxsize=10):  # type: ignore[attr-defined]  # the mistake
            pass
    assert hub.statistics().subscriptions == ()  # nothing was subscribed


async def test_async_for_over_bus_subscribe() -> None:
    bus = MemoryBus()
    with pytest.raises(TypeError, match=_hint("subscribe", "bus.subscribe", "sub", "message")):
        async for _ in bus.subscribe("trades.*", maxsize=10):  # type: ignore[attr-defined]  # the mistake
            pass
