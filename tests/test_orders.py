"""The order log: parsing, malformed lines, following a file that grows, truncates and rotates.

File tests use real files under ``tmp_path`` and the autojump clock: reads
run in threads (virtual time stands still meanwhile), polls sleep in
virtual time, so a poll interval of seconds costs nothing.
"""

from __future__ import annotations

import array
import gc
import itertools
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import msgspec
import pytest
import trio
import trio.testing
from hypothesis import assume, given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, generate_latest
from trio_websocket import wrap_client_stream

import engine
from engine._metrics import EngineCollector
from engine.broadcast import BroadcastConfig, serve_broadcast
from engine.bus import BusMessage, MemoryBus
from services.market.orders import (
    Order,
    OrderLog,
    OrderLogConfig,
    OrderState,
    decode_order,
    parse_chunk,
    state_of,
)
from services.market.orders._log import REGION_BYTES
from services.market.orders._regions import (
    FileRef,
    Lines,
    ParseOptions,
    Region,
    parse_region,
    read_lines,
)
from services.market.orders._tail import Tail
from services.market.simulator._orderlog import (
    coin_of,
    generate_order_lines,
    write_order_log,
)
from tests._promlint import lint

ROOT = Path(__file__).resolve().parent.parent
GUARD = 1000  # virtual seconds: an absolute bound under the autojump clock


def line(
    oid: int = 1,
    status: str = "open",
    coin: str = "BTC",
    px: object = "65000.5",
    **order: object,
) -> bytes:
    """One node order-status line, with the order's fields overridable."""
    body = {
        "coin": coin,
        "side": "B",
        "limitPx": px,
        "sz": "0.01",
        "oid": oid,
        "timestamp": 1_735_689_600_123,
        "triggerCondition": "N/A",
        "isTrigger": False,
        "triggerPx": "0.0",
        "children": [],
        "isPositionTpsl": False,
        "reduceOnly": False,
        "orderType": "Limit",
        "origSz": "0.02",
        "tif": "Gtc",
        "cloid": None,
    } | order
    record = {
        "time": f"2025-01-01T00:00:00.{oid:09d}",
        "user": "0xabc",
        "hash": None,
        "builder": None,
        "status": status,
        "order": body,
    }
    return json.dumps(record, separators=(",", ":")).encode() + b"\n"


def lines(first: int, count: int) -> bytes:
    return b"".join(line(oid) for oid in range(first, first + count))


# -- records -------------------------------------------------------------------------


def test_a_line_becomes_a_normalised_order() -> None:
    parsed = parse_chunk(line(7, "marginCanceled", px="65000.5", isTrigger=True, triggerPx="64000"))
    assert (parsed.lines, parsed.orders, parsed.malformed) == (1, 1, 0)
    assert parsed.topics == ["orders.BTC"]
    assert parsed.ids == "7:marginCanceled:2025-01-01T00:00:00.000000007"
    payload = parsed.payloads.rstrip(b"\n")
    assert json.loads(payload) == {
        "type": "order",
        "coin": "BTC",
        "oid": 7,
        "status": "marginCanceled",
        "state": "canceled",
        "side": "buy",
        "px": 65000.5,
        "sz": 0.01,
        "orig_sz": 0.02,
        "user": "0xabc",
        "time": "2025-01-01T00:00:00.000000007",
        "timestamp": 1_735_689_600_123,
        "order_type": "Limit",
        "tif": "Gtc",
        "trigger_px": 64000.0,
    }
    order = decode_order(payload)
    assert order.state is OrderState.CANCELED
    assert (order.topic, order.msg_id) == ("orders.BTC", parsed.ids)


@pytest.mark.parametrize(
    ("status", "state"),
    [
        ("open", "open"),
        ("filled", "filled"),
        ("canceled", "canceled"),
        ("selfTradeCanceled", "canceled"),
        ("scheduledCancel", "canceled"),
        ("triggered", "triggered"),
        ("perpMarginRejected", "rejected"),
        ("somethingNew", "other"),
    ],
)
def test_status_words_fall_into_states(status: str, state: str) -> None:
    assert state_of(status) == state


BAD_LINES = {
    "not json": b"garbage\n",
    "cut short": line(2)[:60] + b"\n",
    "wrong type": line(3).replace(b'"oid":3', b'"oid":"three"'),
    "missing field": line(4).replace(b'"coin":"BTC",', b""),
    "no order": b'{"time":"t","user":"u","status":"open"}\n',
    "bad side": line(5, side="X"),
    "price not a number": line(6, px="cheap"),
    "negative price": line(7, px="-1"),
    "infinite price": line(8, px="1e999"),
    "coin with a dot": line(9, coin="BTC.X"),
    "coin with a wildcard": line(10, coin="*"),
    "an array": b"[1,2]\n",
}


@pytest.mark.parametrize("kind", list(BAD_LINES))
def test_a_malformed_line_is_counted_and_sampled_never_fatal(kind: str) -> None:
    data = line(100) + BAD_LINES[kind] + line(101)
    parsed = parse_chunk(data)
    assert (parsed.lines, parsed.orders, parsed.malformed) == (3, 2, 1)
    assert parsed.ids.split("\n") == [
        "100:open:2025-01-01T00:00:00.000000100",
        "101:open:2025-01-01T00:00:00.000000101",
    ]
    assert len(parsed.samples) == 1
    assert parsed.samples[0]


def test_lines_that_do_not_hold_one_value_each_are_caught() -> None:
    # decode_lines would take two objects on one line, or one over two lines.
    two_on_one = line(1).rstrip(b"\n") + line(2)
    parsed = parse_chunk(two_on_one + line(3))
    assert (parsed.lines, parsed.orders, parsed.malformed) == (2, 1, 1)
    split = line(4).replace(b'"status"', b'\n"status"')
    parsed = parse_chunk(line(3) + split)
    assert (parsed.lines, parsed.orders, parsed.malformed) == (3, 1, 2)


def test_blank_lines_are_skipped_and_a_last_line_without_newline_counts() -> None:
    parsed = parse_chunk(b"\n" + line(1) + b"  \r\n" + line(2).rstrip(b"\n"))
    assert (parsed.lines, parsed.orders, parsed.malformed) == (2, 2, 0)


def test_samples_are_bounded() -> None:
    parsed = parse_chunk(b"x\n" * 50, max_samples=3)
    assert (parsed.malformed, len(parsed.samples)) == (50, 3)


def test_batch_mode_groups_each_coins_orders_in_log_order() -> None:
    data = line(1) + line(2, coin="ETH") + line(3) + line(4, "filled") + line(5, coin="ETH")
    parsed = parse_chunk(data, batch=True, keep=2)
    assert parsed.topics == ["orders.BTC", "orders.ETH"]
    assert parsed.orders == 5
    arrays = [json.loads(p) for p in parsed.payloads.splitlines()]
    assert [[o["oid"] for o in a] for a in arrays] == [[1, 3, 4], [2, 5]]
    assert parsed.ids.split("\n") == [
        "1:open:2025-01-01T00:00:00.000000001+3",
        "2:open:2025-01-01T00:00:00.000000002+2",
    ]
    # The last two orders (4, 5) are in the first (BTC) and second (ETH) arrays.
    assert array.array("I", parsed.order_coins).tolist() == [0, 1]


def test_the_generator_is_deterministic_and_parses_cleanly() -> None:
    data = generate_order_lines(2000, seed=3)
    assert data == generate_order_lines(2000, seed=3)
    assert data != generate_order_lines(2000, seed=4)
    parsed = parse_chunk(data)
    assert (parsed.lines, parsed.orders, parsed.malformed) == (2000, 2000, 0)
    orders = [decode_order(p) for p in parsed.payloads.splitlines()]
    assert {o.coin for o in orders} == {"BTC", "ETH", "BNB", "SOL", "XRP"}
    states = {o.state for o in orders}
    assert {OrderState.OPEN, OrderState.FILLED, OrderState.CANCELED} <= states
    # An order's later lines name the same user and coin as its first.
    first: dict[int, Order] = {}
    for order in orders:
        seen = first.setdefault(order.oid, order)
        assert (seen.user, seen.coin) == (order.user, order.coin)


def test_the_generator_mixes_in_malformed_lines_on_request() -> None:
    parsed = parse_chunk(generate_order_lines(1000, seed=1, malformed_every=10), max_samples=4)
    assert (parsed.lines, parsed.orders, parsed.malformed) == (1000, 900, 100)
    reasons = " | ".join(parsed.samples)
    for kind in ("truncated", "Expected `int`", "missing required field `coin`", "malformed"):
        assert kind in reasons


def test_coin_of_symbols() -> None:
    assert [coin_of(s) for s in ("BTCUSDT", "ETHUSDC", "SOL", "USDT")] == [
        "BTC",
        "ETH",
        "SOL",
        "USDT",
    ]


# -- regions: cut by offset, read by whoever parses them ----------------------------------

UNUSED = FileRef("unused", 0, 0)


def read_regions(data: bytes, cuts: list[int], max_line_bytes: int = 1 << 20) -> list[Lines]:
    """``data`` as a file, cut at ``cuts`` into regions, each read as a worker reads it."""
    bounds = [0, *sorted(set(cuts) - {0, len(data)}), len(data)]
    with tempfile.TemporaryFile() as file:
        file.write(data)
        file.flush()
        return [
            read_lines(file.fileno(), Region(UNUSED, start, stop, len(data)), max_line_bytes)
            for start, stop in itertools.pairwise(bounds)
        ]


@given(
    st.lists(st.binary(max_size=40).map(lambda b: b.replace(b"\n", b"")), max_size=20),
    st.binary(max_size=20).map(lambda b: b.replace(b"\n", b"")),
    st.lists(st.integers(min_value=0, max_value=1000), max_size=12),
)
def test_regions_cut_anywhere_own_every_line_exactly_once(
    contents: list[bytes], unfinished: bytes, cuts: list[int]
) -> None:
    data = b"".join(content + b"\n" for content in contents) + unfinished
    assume(data)
    regions = read_regions(data, [cut % (len(data) + 1) for cut in cuts])
    whole = len(data) - len(unfinished)
    # Every whole line once, in order, however the cuts fall.
    assert b"".join(r.data for r in regions) == data[:whole]
    owned = [r for r in regions if r.owned]
    assert all(r.owned == bool(r.data) for r in regions if r is not owned[-1])
    # The last one says where the unfinished line starts; nothing is dropped.
    assert (owned[-1].end, owned[-1].pending) == (whole, len(unfinished))
    assert not any(r.overlong or r.cut_short for r in regions)


def test_a_line_longer_than_the_limit_across_regions_is_dropped_once() -> None:
    data = line(1) + b"x" * 5000 + b"\n" + line(2)
    regions = read_regions(data, list(range(1000, len(data), 1000)), max_line_bytes=1000)
    assert b"".join(r.data for r in regions) == line(1) + line(2)
    assert sum(r.overlong for r in regions) == 1
    dropped = next(r for r in regions if r.overlong)
    assert dropped.sample.startswith("longer than 1000 bytes: b'xxx")
    # It ends mid-line, where the next reader skips from.
    assert data[dropped.end - 1 : dropped.end] == b"x"


def test_a_malformed_line_across_a_region_boundary_is_counted_once(tmp_path: Path) -> None:
    bad = b'{"time":"t","user":"u","status":"open","order":{"coin":7}}\n'
    data = line(1) + bad + line(3)
    path = tmp_path / "log"
    path.write_bytes(data)
    stat = path.stat()
    file = FileRef(str(path), stat.st_dev, stat.st_ino)
    options = ParseOptions(batch=False, keep=0, max_samples=5, max_line_bytes=1 << 20)
    cut = len(line(1)) + len(bad) // 2
    parsed = [
        parse_region(Region(file, start, stop, len(data)), options)
        for start, stop in [(0, cut), (cut, len(data))]
    ]
    chunks = [p.parsed for p in parsed if p is not None and p.parsed is not None]
    assert [(c.lines, c.orders, c.malformed) for c in chunks] == [(2, 1, 1), (1, 1, 0)]
    assert [c.ids.split(":")[0] for c in chunks] == ["1", "3"]


def test_a_region_of_a_file_truncated_since_it_was_cut_is_dropped() -> None:
    data = lines(1, 20)
    with tempfile.TemporaryFile() as file:
        file.write(data[:1000])  # truncated: the region was cut when it held all 20 lines
        file.flush()
        region = Region(UNUSED, 0, 500, len(data))
        dropped = read_lines(file.fileno(), region, 1 << 20)
    assert dropped.cut_short
    assert (dropped.data, dropped.owned) == (b"", False)


def test_a_worker_reopens_the_very_file_it_was_cut_from(tmp_path: Path) -> None:
    path = tmp_path / "log"
    path.write_bytes(lines(1, 3))
    tail = Tail(str(path), from_end=False)
    assert tail.open()
    try:
        path.rename(tmp_path / "log.1")
        path.write_bytes(lines(10, 3))  # the path names another file now
        options = ParseOptions(batch=False, keep=0, max_samples=5, max_line_bytes=1 << 20)
        region = Region(tail.file, 0, 100, len(lines(1, 3)))
        # Through this process's descriptor, a worker still finds the old file...
        parsed = parse_region(region, options)
        assert parsed is not None
        assert parsed.parsed is not None
        assert parsed.parsed.ids.startswith("1:")
        # ...and by its path alone, it finds another file, and says so.
        assert (
            parse_region(attrs.evolve(region, file=attrs.evolve(tail.file, fd_path=None)), options)
            is None
        )
    finally:
        tail.close()


def test_bad_settings_are_named() -> None:
    with pytest.raises(ValueError, match="poll_interval"):
        OrderLogConfig("x", poll_interval=0)
    with pytest.raises(ValueError, match="max_block_bytes"):
        OrderLogConfig("x", max_block_bytes=10)
    with pytest.raises(ValueError, match="history"):
        OrderLogConfig("x", history=-1)
    with pytest.raises(ValueError, match="publish"):
        OrderLogConfig("x", publish="sometimes")
    with pytest.raises(ValueError, match="start"):
        OrderLogConfig("x", start="middle")
    with pytest.raises(ValueError, match="path"):
        OrderLogConfig("")
    with pytest.raises(ValueError, match="workers"):
        OrderLogConfig("x", workers=-1)
    with pytest.raises(ValueError, match="limit"):
        OrderLog(OrderLogConfig("x"), MemoryBus()).recent(-1)


# -- following a file ------------------------------------------------------------------


class Following:
    """An OrderLog following a file, and a subscriber collecting what it publishes."""

    def __init__(self, log: OrderLog, path: Path) -> None:
        self.log = log
        self.path = path
        self.messages: list[BusMessage] = []
        self._arrived = trio.Event()

    async def write(self, data: bytes, mode: str = "ab") -> None:
        await write(self.path, data, mode)

    async def collect(self, sub: Any) -> None:
        async for message in sub:
            self.messages.append(message)
            self._arrived.set()

    async def until(self, predicate: Callable[[], bool]) -> None:
        """Wait, in virtual time, until ``predicate()`` holds (the caller's guard bounds it)."""
        # Polls the log's counters: it has no event to wait on. In virtual
        # time this costs nothing and cannot race the thread reads (they
        # hold the clock still).
        while not predicate():  # noqa: ASYNC110
            await trio.sleep(self.log.config.poll_interval / 2)

    async def orders(self, count: int) -> list[Order]:
        """Every order received, once there are at least ``count``; returns as they arrive."""
        while len(self.messages) < count:
            await self._arrived.wait()
            self._arrived = trio.Event()
        return [decode_order(m.data) for m in self.messages]

    @property
    def oids(self) -> list[int]:
        return [decode_order(m.data).oid for m in self.messages]


def _write(path: Path, data: bytes, mode: str) -> None:
    with open(path, mode) as file:
        file.write(data)


async def write(path: Path, data: bytes, mode: str = "ab") -> None:
    """Write through the engine's thread bridge: the virtual clock stands still meanwhile."""
    await engine.to_thread(_write, path, data, mode)


def rotate(path: Path, last_old: bytes, first_new: bytes) -> None:
    """Rename ``path`` away, append to the old file through a handle kept open, start a new one."""
    with open(path, "ab") as old:
        path.rename(path.with_name(path.name + ".1"))
        old.write(last_old)
    path.write_bytes(first_new)


@asynccontextmanager
async def following(path: Path, **options: Any) -> AsyncIterator[Following]:
    """Follow ``path`` (created empty unless it exists or ``create=False``)."""
    create = options.pop("create", True)
    if create:
        await write(path, b"", "ab")
    options.setdefault("poll_interval", 1.0)
    options.setdefault("workers", 0)
    options.setdefault("publish", "order")
    bus = MemoryBus()
    log = OrderLog(OrderLogConfig(path, **options), bus)
    follow = Following(log, path)
    async with (
        trio.open_nursery() as nursery,
        bus.subscribe("orders.>", maxsize=100_000, overflow="block") as sub,
    ):
        nursery.start_soon(follow.collect, sub)
        if create:
            await nursery.start(log.follow)
        else:
            nursery.start_soon(log.follow)
        yield follow
        nursery.cancel_scope.cancel()


async def test_every_order_is_published_exactly_once_in_order(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    data = generate_order_lines(5000, seed=5)
    path = tmp_path / "orders.log"
    await write(path, data[: len(data) // 3])
    with trio.fail_after(GUARD):
        async with following(path, max_block_bytes=64 << 10) as f:
            await f.write(data[len(data) // 3 :])
            orders = await f.orders(5000)
            await f.until(lambda: f.log.statistics().lag_bytes == 0)
    expected = [decode_order(p) for p in parse_chunk(data).payloads.splitlines()]
    assert orders == expected
    ids = [m.msg_id for m in f.messages]
    assert len(set(ids)) == 5000
    assert all(m.topic == f"orders.{o.coin}" for m, o in zip(f.messages, orders, strict=True))
    stats = f.log.statistics()
    assert (stats.lines, stats.orders, stats.messages, stats.malformed) == (5000, 5000, 5000, 0)
    assert (stats.bytes_read, stats.position, stats.pending_bytes) == (len(data), len(data), 0)
    assert stats.slices_in_loop > 1
    assert stats.chunks_in_processes == 0
    assert [o.oid for o in f.log.recent(3)] == [o.oid for o in reversed(expected[-3:])]
    assert json.loads(f.log.recent_json(2)) == [
        json.loads(msgspec.json.encode(o)) for o in reversed(expected[-2:])
    ]


async def test_a_partial_last_line_waits_for_its_newline(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    whole = line(2)
    with trio.fail_after(GUARD):
        async with following(tmp_path / "log") as f:
            await f.write(line(1) + whole[:50])
            await f.orders(1)
            await f.until(lambda: f.log.statistics().pending_bytes == 50)
            # Several polls later the half line is still only pending.
            await trio.sleep(10 * f.log.config.poll_interval)
            assert f.oids == [1]
            await f.write(whole[50:-1])  # the rest, still without its newline
            await f.until(lambda: f.log.statistics().pending_bytes == len(whole) - 1)
            assert f.oids == [1]
            await f.write(b"\n" + line(3))
            await f.orders(3)
    assert f.oids == [1, 2, 3]
    assert f.log.statistics().malformed == 0


async def test_malformed_lines_in_the_file_are_counted_and_the_rest_published(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    bad = b"".join(BAD_LINES.values())
    with trio.fail_after(GUARD):
        async with following(tmp_path / "log") as f:
            await f.write(line(1) + bad + line(2))
            await f.orders(2)
            await f.until(lambda: f.log.statistics().lines == 2 + len(BAD_LINES))
    stats = f.log.statistics()
    assert (stats.orders, stats.malformed) == (2, len(BAD_LINES))
    assert len(stats.malformed_samples) == 5  # the latest few, not all
    assert f.oids == [1, 2]


async def test_an_overlong_line_is_dropped_and_the_next_one_read(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    with trio.fail_after(GUARD):
        async with following(tmp_path / "log", max_line_bytes=1000, max_block_bytes=4096) as f:
            await f.write(line(1) + b'{"junk":"' + b"x" * 20_000)
            await f.orders(1)
            await f.until(lambda: f.log.statistics().malformed == 1)
            await f.write(b'"}\n' + line(2))
            await f.orders(2)
    stats = f.log.statistics()
    assert f.oids == [1, 2]
    assert (stats.lines, stats.malformed) == (3, 1)
    assert "longer than 1000 bytes" in stats.malformed_samples[0]


async def test_a_file_truncated_while_followed_is_read_again_from_the_start(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    with trio.fail_after(GUARD):
        async with following(tmp_path / "log") as f:
            await f.write(lines(1, 50) + line(51)[:30])
            await f.orders(50)
            await f.until(lambda: f.log.statistics().pending_bytes == 30)
            await f.write(lines(100, 5), mode="wb")  # truncate, then write less than before
            await f.orders(55)
            await f.until(lambda: f.log.statistics().truncations == 1)
    assert f.oids == [*range(1, 51), *range(100, 105)]
    stats = f.log.statistics()
    # The half line cut off by the truncation is counted, not published.
    assert (stats.truncations, stats.rotations, stats.malformed) == (1, 0, 1)
    assert "truncated" in stats.malformed_samples[-1]
    assert stats.position == len(lines(100, 5))


async def test_a_rotated_file_is_finished_then_the_new_one_followed(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    path = tmp_path / "log"
    with trio.fail_after(GUARD):
        async with following(path) as f:
            await f.write(lines(1, 10))
            await f.orders(10)
            # The writer still holds the old file for a moment: its last lines
            # land there, and an unfinished one stays unfinished.
            await engine.to_thread(
                rotate, path, lines(11, 5) + line(16)[:40], lines(20, 3), abandon_on_cancel=False
            )
            await f.orders(18)
            await f.write(lines(23, 2))
            await f.orders(20)
            await f.until(lambda: f.log.statistics().rotations == 1)
    assert f.oids == [*range(1, 16), *range(20, 25)]
    stats = f.log.statistics()
    assert (stats.rotations, stats.truncations, stats.malformed) == (1, 0, 1)
    assert "rotated" in stats.malformed_samples[-1]


async def test_a_rotation_with_a_gap_waits_for_the_new_file(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    path = tmp_path / "log"
    with trio.fail_after(GUARD):
        async with following(path) as f:
            await f.write(lines(1, 3))
            await f.orders(3)
            await engine.to_thread(path.rename, tmp_path / "log.1")
            await trio.sleep(5 * f.log.config.poll_interval)  # no file at the path meanwhile
            assert f.log.statistics().following
            await write(path, lines(4, 2))
            await f.orders(5)
    assert f.oids == [1, 2, 3, 4, 5]
    assert f.log.statistics().rotations == 1


async def test_polling_is_on_the_configured_interval(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    path = tmp_path / "log"
    with trio.fail_after(GUARD):
        start = trio.current_time()
        async with following(path, poll_interval=5.0) as f:
            # Polls at 0, 5, 10, 15...: a line written at 12 is seen at 15.
            await trio.sleep_until(start + 12)
            await f.write(line(1))
            await f.orders(1)
            assert trio.current_time() - start == pytest.approx(15)
            await trio.sleep_until(start + 15.5)
            await f.write(line(2))
            await f.orders(2)
            assert trio.current_time() - start == pytest.approx(20)


async def test_a_missing_file_is_waited_for_before_ready(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    path = tmp_path / "later.log"
    bus = MemoryBus()
    log = OrderLog(OrderLogConfig(path, poll_interval=2.0), bus)
    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery:
            ready_at: list[float] = []

            async def run() -> None:
                await nursery.start(log.follow)
                ready_at.append(trio.current_time())

            start = trio.current_time()
            nursery.start_soon(run)
            await trio.sleep(7)
            assert not ready_at
            assert not log.statistics().following
            await write(path, line(1))
            await trio.sleep(2)
            assert ready_at == [pytest.approx(start + 8)]  # the poll after the file appeared
            assert log.statistics().following
            nursery.cancel_scope.cancel()
    assert not log.statistics().following


async def test_start_at_the_end_skips_what_is_there(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    path = tmp_path / "log"
    await write(path, lines(1, 20))
    with trio.fail_after(GUARD):
        async with following(path, start="end") as f:
            await f.write(lines(21, 2))
            await f.orders(2)
    assert f.oids == [21, 22]


async def test_batch_mode_publishes_arrays_per_coin(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    data = generate_order_lines(3000, seed=9)
    with trio.fail_after(GUARD):
        async with following(tmp_path / "log", publish="batch") as f:
            await f.write(data)
            await f.until(lambda: f.log.statistics().orders == 3000)
            await f.until(lambda: len(f.messages) == f.log.statistics().messages)
    by_coin: dict[str, list[int]] = {}
    for message in f.messages:
        orders = msgspec.json.decode(message.data, type=list[Order])
        assert {message.topic} == {o.topic for o in orders}
        by_coin.setdefault(message.topic, []).extend(o.oid for o in orders)
    expected: dict[str, list[int]] = {}
    in_log_order = [decode_order(p) for p in parse_chunk(data).payloads.splitlines()]
    for order in in_log_order:
        expected.setdefault(order.topic, []).append(order.oid)
    assert by_coin == expected  # every order once, in log order per coin
    # The history lists single orders, newest first, across the coins' arrays.
    recent = f.log.recent(5000)
    assert recent == in_log_order[::-1][:1000]  # the history's bound
    assert json.loads(f.log.recent_json(3)) == [
        json.loads(msgspec.json.encode(o)) for o in in_log_order[::-1][:3]
    ]


class StepTimer(trio.abc.Instrument):
    """The most CPU time the trio thread spent in one task step.

    CPU time of the thread, not wall time: on a busy machine the OS may
    pause the thread mid-step, which says nothing about the code.
    """

    def __init__(self) -> None:
        self.started: float | None = None
        self.longest = 0.0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self.started = time.thread_time()

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        if self.started is not None:
            self.longest = max(self.longest, time.thread_time() - self.started)
            self.started = None


@pytest.mark.parametrize(
    ("publish", "workers"), [("order", 0), ("batch", 0), ("order", 2), ("batch", 2)]
)
async def test_a_big_block_never_holds_the_loop_for_20_ms(
    tmp_path: Path, publish: str, workers: int
) -> None:
    data = generate_order_lines(40_000, seed=2)  # about 17 MB
    path = tmp_path / "log"
    await write(path, data)
    bus = MemoryBus()
    timer = StepTimer()
    received = 0

    async def drain(sub: Any) -> None:
        # Counts and lets go: holding 40,000 messages would make the
        # collector's full passes (of the whole test process) the longest steps.
        nonlocal received
        while True:
            received += len(await sub.receive_batch(10_000))

    async with engine.open_process_pool(max(workers, 1)) as pool:
        if workers:
            await pool.warm()
        config = OrderLogConfig(path, poll_interval=0.01, publish=publish, workers=workers)
        log = OrderLog(config, bus, pool=pool)
        # The collector's full passes walk every object of the process, and the
        # test process holds the whole test suite: frozen, as a service would
        # freeze its start-up heap (docs/orders.md), they walk what this test makes.
        gc.collect()
        gc.freeze()
        with trio.fail_after(60):
            async with (
                trio.open_nursery() as nursery,
                bus.subscribe("orders.>", maxsize=100_000, overflow="block") as sub,
            ):
                nursery.start_soon(drain, sub)
                trio.lowlevel.add_instrument(timer)
                try:
                    await nursery.start(log.follow)
                    # Polls the counters (the log has no event to wait on); real
                    # time here, as the steps are what is measured.
                    while log.statistics().orders < 40_000 or received < log.statistics().messages:  # noqa: ASYNC110
                        await trio.sleep(0.01)
                finally:
                    trio.lowlevel.remove_instrument(timer)
                    gc.unfreeze()
                nursery.cancel_scope.cancel()
    stats = log.statistics()
    assert stats.bytes_read == len(data)
    assert (stats.chunks_in_processes > 0) == (workers > 0)
    assert 0 < timer.longest < 0.020


# -- worker processes ----------------------------------------------------------------


class Pool:
    """A real process pool, with a fault injected before chosen calls, counting calls at once.

    ``before(region)`` runs before the call that parses ``region``; what it
    raises is that call's error.
    """

    def __init__(
        self,
        pool: engine.ProcessPool,
        before: Callable[[Region], Awaitable[None]] | None = None,
    ) -> None:
        self.real = pool
        self._before = before
        self.running = self.most_running = self.calls = 0

    @property
    def workers(self) -> int:
        return self.real.workers

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        self.calls += 1
        self.running += 1
        self.most_running = max(self.most_running, self.running)
        try:
            if self._before is not None:
                await self._before(args[0])
            return await self.real.run(fn, *args)
        finally:
            self.running -= 1


@asynccontextmanager
async def following_with_workers(
    path: Path,
    before: Callable[[Region], Awaitable[None]] | None = None,
    **options: Any,
) -> AsyncIterator[tuple[Following, Pool]]:
    """Follow ``path`` with two worker processes (a warm pool, ``before`` injecting faults)."""
    async with engine.open_process_pool(2) as real:
        await real.warm()  # started under real time: the virtual clock must not run meanwhile
        pool = Pool(real, before)
        bus = MemoryBus()
        defaults: dict[str, Any] = {"poll_interval": 1.0, "publish": "order"}
        config = OrderLogConfig(path, **(defaults | options))
        log = OrderLog(config, bus, pool=pool)  # type: ignore[arg-type]  # a ProcessPool with faults
        f = Following(log, path)
        async with (
            trio.open_nursery() as nursery,
            bus.subscribe("orders.>", maxsize=100_000, overflow="block") as sub,
        ):
            nursery.start_soon(f.collect, sub)
            await nursery.start(log.follow)
            yield f, pool
            nursery.cancel_scope.cancel()


def oids_of(data: bytes) -> list[int]:
    return [decode_order(p).oid for p in parse_chunk(data).payloads.splitlines()]


@pytest.mark.parametrize("publish", ["order", "batch"])
async def test_a_backlog_is_read_and_parsed_by_worker_processes(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, publish: str
) -> None:
    data = generate_order_lines(9000, seed=4)  # about 3.8 MB: four regions
    assert len(data) > 3 * REGION_BYTES
    path = tmp_path / "log"
    await write(path, data)
    with trio.fail_after(GUARD):
        async with following_with_workers(path, publish=publish) as (f, pool):
            await f.until(lambda: f.log.statistics().orders == 9000)
            await f.until(lambda: len(f.messages) == f.log.statistics().messages)
    if publish == "order":
        orders = [decode_order(m.data) for m in f.messages]
    else:
        orders = [o for m in f.messages for o in msgspec.json.decode(m.data, type=list[Order])]
        orders.sort(key=lambda o: o.time)  # log order across the coins' arrays
    assert orders == [decode_order(p) for p in parse_chunk(data).payloads.splitlines()]
    stats = f.log.statistics()
    assert stats.chunks_in_processes == pool.calls == math.ceil(len(data) / REGION_BYTES)
    assert (stats.slices_in_loop, stats.worker_failures, stats.malformed) == (0, 0, 0)
    assert (stats.bytes_read, stats.position, stats.lines) == (len(data), len(data), 9000)
    assert pool.most_running == 2  # never more regions in flight than workers
    assert [o.oid for o in f.log.recent(1000)] == [o.oid for o in reversed(orders[-1000:])]


async def test_malformed_lines_parsed_on_workers_are_counted_once_wherever_regions_cut(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    # One line in 7 is malformed (cut short, mistyped, missing a field, not
    # JSON); a region boundary inside one is covered line by line above.
    data = generate_order_lines(9000, seed=6, malformed_every=7)
    expected = parse_chunk(data)
    path = tmp_path / "log"
    await write(path, data)
    with trio.fail_after(GUARD):
        async with following_with_workers(path) as (f, _):
            await f.orders(expected.orders)
            await f.until(lambda: f.log.statistics().lines == 9000)
    assert f.oids == oids_of(data)
    stats = f.log.statistics()
    assert (stats.malformed, stats.orders) == (expected.malformed, expected.orders)
    assert stats.chunks_in_processes == math.ceil(len(data) / REGION_BYTES)


async def test_a_worker_crash_mid_region_is_parsed_in_the_loop_instead(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    data = generate_order_lines(9000, seed=4)
    path = tmp_path / "log"
    await write(path, data)

    async def die_on_the_second_region(region: Region) -> None:
        # The worker that takes the second region dies during the call: the
        # pool raises WorkerCrashed for that region, as for a segfault.
        if region.start == REGION_BYTES:
            await pool.real.run(os._exit, 1)

    with trio.fail_after(GUARD):
        async with following_with_workers(path, die_on_the_second_region) as (f, pool):
            await f.orders(9000)
    assert f.oids == oids_of(data)  # every line once, in order
    stats = f.log.statistics()
    assert (stats.worker_failures, stats.chunks_in_processes) == (1, pool.calls - 1)
    assert stats.slices_in_loop >= 1
    assert (stats.lines, stats.malformed) == (9000, 0)


async def test_a_rotation_while_regions_are_in_flight_finishes_the_old_file_first(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    old, late, new = lines(1, 9000), lines(20_000, 3), lines(30_000, 4)
    path = tmp_path / "log"
    await write(path, old)
    rotated = False

    async def rotate_first(region: Region) -> None:
        # Once the regions are cut and the first is about to be read, the
        # file is renamed away, its writer appends, and a new file appears.
        nonlocal rotated
        if not rotated:
            rotated = True
            await engine.to_thread(rotate, path, late, new, abandon_on_cancel=False)

    with trio.fail_after(GUARD):
        async with following_with_workers(path, rotate_first) as (f, _):
            await f.orders(9000 + 3 + 4)
    assert f.oids == [*range(1, 9001), *range(20_000, 20_003), *range(30_000, 30_004)]
    stats = f.log.statistics()
    assert (stats.rotations, stats.truncations, stats.malformed) == (1, 0, 0)
    assert (stats.worker_failures, stats.position) == (0, len(new))


async def test_a_truncation_while_regions_are_in_flight_drops_what_it_cut_short(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    old, new = lines(1, 9000), lines(50_000, 6500)
    # The new contents cover the second region whole: only the size says
    # that the file is not the one the regions were cut from.
    assert 2 * REGION_BYTES < len(new) < len(old)
    path = tmp_path / "log"
    await write(path, old)
    truncated = False
    # Lines starting in the first region are read before the truncation.
    first = sum(1 for start in line_starts(old) if start < REGION_BYTES)

    async def truncate_after_the_first_region(region: Region) -> None:
        # The first region is read whole; every later one finds the file
        # truncated (copytruncate) and rewritten shorter.
        nonlocal truncated
        if region.start == 0:
            return
        await f.until(lambda: f.log.statistics().chunks_in_processes >= 1)
        if not truncated:
            truncated = True
            await write(path, new, "wb")

    with trio.fail_after(GUARD):
        async with following_with_workers(path, truncate_after_the_first_region) as (f, _):
            await f.orders(first + 6500)
            await f.until(lambda: f.log.statistics().lag_bytes == 0)
    assert f.oids == [*range(1, first + 1), *range(50_000, 56_500)]
    stats = f.log.statistics()
    assert (stats.truncations, stats.malformed, stats.position) == (1, 0, len(new))


def line_starts(data: bytes) -> list[int]:
    return [0, *(i + 1 for i, byte in enumerate(data[:-1]) if byte == 0x0A)]


# -- the simulator's writer, and the broadcast ---------------------------------------


async def test_the_writer_appends_at_its_rate_deterministically(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    files = []
    for name in ("a", "b"):
        path = tmp_path / name
        with trio.move_on_after(2.0):
            await write_order_log(path, rate=100, seed=8, epoch_ms=1_700_000_000_000)
        files.append(await engine.to_thread(path.read_bytes))
    assert files[0] == files[1]
    parsed = parse_chunk(files[0])
    # Line k is due at k / rate: 199 of them before the cut at 2 s (the 200th is due at it).
    assert (parsed.lines, parsed.malformed) == (199, 0)
    stamps = [decode_order(p).time for p in parsed.payloads.splitlines()]
    assert stamps[0] == "2023-11-14T22:13:20.000000000"  # epoch_ms + k * 10 ms
    assert stamps[-1] == "2023-11-14T22:13:21.980000000"


async def test_the_writer_feeds_the_log_with_its_malformed_lines(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    path = tmp_path / "sim.log"
    with trio.fail_after(GUARD):
        async with following(path, poll_interval=0.1) as f, trio.open_nursery() as writer:
            await writer.start(
                lambda task_status: write_order_log(
                    path, rate=1000, seed=1, malformed_every=50, task_status=task_status
                )
            )
            await f.until(lambda: f.log.statistics().lines >= 2000)
            writer.cancel_scope.cancel()
            await f.until(lambda: f.log.statistics().lag_bytes == 0)
            await f.orders(f.log.statistics().orders)
    stats = f.log.statistics()
    assert stats.malformed == stats.lines // 50
    assert stats.orders == stats.lines - stats.malformed == len(f.messages)


async def test_orders_reach_websocket_clients_on_the_orders_topic(tmp_path: Path) -> None:
    path = tmp_path / "log"
    await write(path, b"")
    bus = MemoryBus()
    log = OrderLog(OrderLogConfig(path, poll_interval=0.01, publish="order"), bus)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            server = await nursery.start(
                serve_broadcast, bus, BroadcastConfig(port=0, ping_interval=math.inf)
            )
            stream = await trio.open_tcp_stream("127.0.0.1", server.port)
            async with stream:
                ws = await wrap_client_stream(
                    nursery, stream, "127.0.0.1", server.config.path + "?topics=orders"
                )
                await wait_subscribed(bus)
                await nursery.start(log.follow)
                await write(path, line(1) + line(2, coin="ETH") + line(3, "filled"))
                got = [decode_order(await ws.get_message()) for _ in range(3)]  # type: ignore[arg-type]  # bytes frames
                await ws.aclose()
            nursery.cancel_scope.cancel()
    assert [(o.oid, o.coin, o.status) for o in got] == [
        (1, "BTC", "open"),
        (2, "ETH", "open"),
        (3, "BTC", "filled"),
    ]


async def wait_subscribed(bus: MemoryBus) -> None:
    while not bus.statistics().subscriptions:
        await trio.testing.wait_all_tasks_blocked()
        await trio.lowlevel.checkpoint()


# -- the docs' example -------------------------------------------------------------------


@pytest.mark.subprocess
def test_orders_example_runs() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "docs" / "examples" / "orders_example.py")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout.splitlines()
    assert out[0] == "published 1000 orders of 1010 lines; 10 malformed"
    assert out[1].startswith("malformed sample: ")
    assert out[2] == "after truncation: truncations=1, orders=1005"
    assert out[3] == "after rotation: rotations=1, orders=1010"
    assert out[4].startswith("newest: {")


@given(st.lists(st.one_of(st.binary(max_size=80), st.sampled_from(list(BAD_LINES.values())))))
def test_any_bytes_parse_without_raising_and_every_line_is_accounted_for(
    chunks: list[bytes],
) -> None:
    data = b"\n".join([line(1).rstrip(b"\n"), *chunks, line(2).rstrip(b"\n")]) + b"\n"
    parsed = parse_chunk(data)
    assert parsed.lines == parsed.orders + parsed.malformed
    assert parsed.orders >= 2
    assert len(parsed.topics) == parsed.orders == parsed.payloads.count(b"\n")


def test_the_public_surface_is_all_and_documented() -> None:
    import services.market.orders as orders

    public = {name for name in vars(orders) if not name.startswith("_")} - {"annotations"}
    assert public == set(orders.__all__)
    assert orders.__all__ == sorted(orders.__all__)
    assert all(getattr(orders, name).__doc__ for name in orders.__all__)


async def test_statistics_go_to_metrics_as_counters_and_gauges_with_units(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    path = tmp_path / "orders.log"
    path.write_bytes(lines(1, 3) + b"not json\n")
    with trio.fail_after(100):
        async with following(path) as f:
            await f.until(lambda: f.log.statistics().lines == 4)
            registry = CollectorRegistry()
            registry.register(EngineCollector(None, {"orders": f.log}, None))
            text = generate_latest(registry).decode()
    kinds = dict(re.findall(r"# TYPE engine_order_log_(\w+) (\w+)", text))
    counters = ["lines", "orders", "messages", "malformed", "truncations", "rotations"]
    counters += ["read_bytes", "chunks_in_processes", "slices_in_loop", "worker_failures"]
    counters += ["refusals"]
    gauges = ["following", "position_bytes", "lag_bytes", "pending_bytes", "file_threads"]
    gauges += ["unclosed_files"]
    expected = {f"{name}_total": "counter" for name in counters}
    expected.update(dict.fromkeys(gauges, "gauge"))
    assert kinds == expected
    assert 'engine_order_log_lines_total{source="orders"} 4.0' in text
    assert f'engine_order_log_read_bytes_total{{source="orders"}} {path.stat().st_size}.0' in text
    assert lint(text) == []
