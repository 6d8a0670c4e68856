"""Fuzzing order-log lines: each one is an order or a counted, sampled malformed line.

Lines are drawn as arbitrary bytes and text, and as node lines with fields
removed, retyped, huge, non-UTF-8, deeply nested or very long; blocks mix
them with blank lines, two values on a line and values over two lines. They
go through the parser the follower uses (``parse_chunk``), through regions
of a real file (``read_lines`` and ``parse_region``), and a few through a
real follower of a temp file. Whatever the input, nothing raises, every
non-blank line is counted once, and the block's count matches the sum of
its lines parsed one by one.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import tempfile
from pathlib import Path

import msgspec
import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

import engine
from engine.bus import MemoryBus
from services.market.orders import OrderLog, OrderLogConfig, decode_order, parse_chunk
from services.market.orders._records import MAX_SAMPLE_CHARS
from services.market.orders._regions import FileRef, ParseOptions, Region, parse_region

# A falsifying example may hold a line of a megabyte: reporting it is worth its repr.
pytestmark = pytest.mark.filterwarnings("ignore:Generating overly large repr")

MAX_SAMPLES = 5
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

ORDER: dict[str, object] = {
    "coin": "BTC",
    "side": "B",
    "limitPx": "65000.5",
    "sz": "0.01",
    "oid": 7,
    "timestamp": 1_735_689_600_123,
    "origSz": "0.02",
    "orderType": "Limit",
    "tif": "Gtc",
    "reduceOnly": False,
    "isTrigger": False,
    "triggerPx": "0.0",
    "cloid": None,
}
RECORD: dict[str, object] = {
    "time": "2025-01-01T00:00:00.000000007",
    "user": "0xabc",
    "status": "open",
    "order": ORDER,
}


def encode(value: object) -> bytes:
    return json.dumps(value, separators=(",", ":"), allow_nan=True).encode()


GOOD = encode(RECORD)
DEEP = b'{"extra":' + b"[" * 200_000 + b"]" * 200_000 + b"}"

# Numbers as JSON text: huge, tiny, negative, not finite (JSON has no NaN,
# but a writer may print it), as numbers and as the decimal strings the node uses.
NUMBER_TEXT = st.one_of(
    st.integers(min_value=-(2**80), max_value=2**80).map(str),
    st.sampled_from(["1e400", "-1e400", "NaN", "Infinity", "-Infinity", "1e-400", "-0", "0"]),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
)
SCALAR_JSON = st.one_of(
    st.none().map(encode),
    st.booleans().map(encode),
    NUMBER_TEXT.map(str.encode),
    NUMBER_TEXT.map(lambda text: b'"' + text.encode() + b'"'),
    st.text(max_size=40).map(lambda text: encode(text)),
    # Not UTF-8 inside a string, and escapes that are not whole characters.
    st.binary(min_size=1, max_size=8).map(lambda raw: b'"x' + raw.replace(b'"', b"") + b'"'),
    st.sampled_from([b'"\\ud800"', b'"\\udc00x"', b'"\\u0000"', b'"\\x"']),
)
JSON_VALUE = st.recursive(
    SCALAR_JSON,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3).map(lambda items: b"[" + b",".join(items) + b"]"),
        st.dictionaries(st.text(max_size=8), inner, max_size=3).map(
            lambda d: b"{" + b",".join(encode(k) + b":" + v for k, v in d.items()) + b"}"
        ),
    ),
    max_leaves=8,
)
DEPTHS = st.sampled_from([1, 64, 1000, 20_000, 200_000])


def _field_line(record: dict[str, object], order: dict[str, object]) -> bytes:
    body = b",".join(encode(k) + b":" + _raw(v) for k, v in order.items())
    fields = [encode(k) + b":" + _raw(v) for k, v in record.items() if k != "order"]
    if "order" in record:
        fields.append(b'"order":{' + body + b"}")
    return b"{" + b",".join(fields) + b"}"


class Raw(bytes):
    """A JSON value already encoded."""


def _raw(value: object) -> bytes:
    return bytes(value) if isinstance(value, Raw) else encode(value)


@st.composite
def node_lines(draw: st.DrawFn) -> bytes:
    """A node line with some fields removed, retyped, nested deep or made long."""
    record = dict(RECORD)
    order = dict(ORDER)
    for fields in (record, order):
        for key in list(fields):
            if key == "order":
                continue
            action = draw(st.sampled_from(["keep"] * 6 + ["drop", "retype"]))
            if action == "drop":
                del fields[key]
            elif action == "retype":
                fields[key] = Raw(draw(JSON_VALUE))
    if draw(st.booleans()):
        del record["order"]
        record["order"] = Raw(draw(JSON_VALUE)) if draw(st.booleans()) else order
    extra = draw(st.sampled_from(["none", "deep", "long", "unknown"]))
    depth = draw(DEPTHS)
    if extra == "deep":
        opener, closer = draw(st.sampled_from([(b"[", b"]"), (b'{"a":', b"}")]))
        record["extra"] = Raw(opener * depth + b"1" + closer * depth)
    elif extra == "long":
        record["user"] = "u" * draw(st.sampled_from([1000, 100_000, 1 << 20]))
    elif extra == "unknown":
        record["extra"] = Raw(draw(JSON_VALUE))
    return _field_line(record, order)


LINE = st.one_of(
    node_lines(),
    st.just(GOOD),
    st.binary(max_size=200),
    st.text(max_size=100).map(str.encode),
    DEPTHS.map(lambda depth: b"[" * depth),
    DEPTHS.map(lambda depth: b'{"time":' * depth),
    JSON_VALUE,
    st.sampled_from([b"", b"   ", b"\r", b"\t \r", b"\x0c", b"null", b"{}", b"[]"]),
)


@st.composite
def blocks(draw: st.DrawFn) -> bytes:
    """Lines joined by newlines, some with two values on a line or a value over two."""
    parts = draw(st.lists(LINE, max_size=12))
    pieces = []
    for part in parts:
        shape = draw(st.sampled_from(["line"] * 8 + ["two values", "split", "crlf"]))
        if shape == "two values":
            part = part + draw(st.sampled_from([b"", b" ", b"\t"])) + draw(LINE)
        elif shape == "split" and len(part) > 1:
            cut = draw(st.integers(1, len(part) - 1))
            part = part[:cut] + b"\n" + part[cut:]
        elif shape == "crlf":
            part += b"\r"
        pieces.append(part)
    data = b"\n".join(pieces)
    newline_at_end: bool = draw(st.booleans())
    return data + b"\n" if pieces and newline_at_end else data


def non_blank_lines(data: bytes) -> list[bytes]:
    return [raw for raw in data.split(b"\n") if raw.strip()]


def check_parsed(data: bytes, *, batch: bool) -> None:
    """``parse_chunk(data)`` accounts for every non-blank line once, and nothing else."""
    parsed = parse_chunk(data, batch=batch, keep=3 if batch else 0, max_samples=MAX_SAMPLES)
    raws = non_blank_lines(data)
    assert parsed.lines == len(raws)
    assert parsed.lines == parsed.orders + parsed.malformed
    assert len(parsed.samples) == min(parsed.malformed, MAX_SAMPLES)
    for sample in parsed.samples:
        assert isinstance(sample, str)
        assert 0 < len(sample) <= 3 * MAX_SAMPLE_CHARS
    # The block agrees with its lines parsed one at a time (the slow path).
    assert parsed.orders == sum(parse_chunk(raw).orders for raw in raws)
    payloads = parsed.payloads.split(b"\n")[:-1]
    assert len(payloads) == len(parsed.topics)
    orders = []
    for topic, payload in zip(parsed.topics, payloads, strict=True):
        batch_of = msgspec.json.decode(payload) if batch else [msgspec.json.decode(payload)]
        for value in batch_of:
            order = decode_order(msgspec.json.encode(value))
            assert topic == order.topic
            assert math.isfinite(order.px)
            assert order.px > 0
            assert math.isfinite(order.sz)
            assert order.sz >= 0
            assert 0 <= order.oid < 2**63
            assert 0 <= order.timestamp < 2**63
            orders.append(order)
    assert len(orders) == parsed.orders


@FUZZ
@given(st.lists(LINE, max_size=10))
def test_any_line_is_an_order_or_a_counted_malformed_line(lines: list[bytes]) -> None:
    for raw in lines:
        check_parsed(raw, batch=False)
        check_parsed(raw + b"\n", batch=True)


@FUZZ
@given(blocks(), st.booleans())
def test_any_block_of_lines_is_accounted_for_line_by_line(data: bytes, batch: bool) -> None:
    check_parsed(GOOD + b"\n" + data, batch=batch)
    check_parsed(data, batch=batch)


def test_a_deeply_nested_line_is_malformed_not_fatal() -> None:
    parsed = parse_chunk(GOOD + b"\n" + DEEP + b"\n" + GOOD + b"\n")
    assert (parsed.lines, parsed.orders, parsed.malformed) == (3, 2, 1)
    assert "deep" in parsed.samples[0]


def test_two_values_on_a_line_are_not_made_up_by_a_blank_one() -> None:
    # decode_lines finds two values in three lines' worth of newlines less
    # the blank one: the counts agree, yet the first line is malformed.
    parsed = parse_chunk(GOOD + b" " + GOOD + b"\n\n")
    assert (parsed.lines, parsed.orders, parsed.malformed) == (1, 0, 1)
    # Nor by a value over two lines next to them.
    split = GOOD[:20] + b"\n" + GOOD[20:] + b" " + GOOD + b"\n"
    parsed = parse_chunk(split)
    assert (parsed.lines, parsed.orders, parsed.malformed) == (2, 0, 2)


def test_a_timestamp_beyond_64_bits_is_malformed() -> None:
    order = dict(ORDER, timestamp=2**70)
    parsed = parse_chunk(encode(dict(RECORD, order=order)) + b"\n")
    assert (parsed.orders, parsed.malformed) == (0, 1)


# -- regions of a real file ---------------------------------------------------------------


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(blocks(), st.lists(st.integers(0, 1 << 16), max_size=4), st.sampled_from([64, 4096]))
def test_regions_of_a_file_of_any_lines_count_each_once(
    data: bytes, cuts: list[int], max_line_bytes: int
) -> None:
    data = data + b"\n" if data and not data.endswith(b"\n") else data
    # A blank line is not a line, unless a cut drops it as over the limit.
    assume(all(raw.strip() or len(raw) < max_line_bytes for raw in data.split(b"\n")))
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "orders.log"
        path.write_bytes(data)
        status = os.stat(path)
        file = FileRef(str(path), status.st_dev, status.st_ino)
        bounds = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
        options = ParseOptions(batch=False, keep=0, max_samples=MAX_SAMPLES,
                               max_line_bytes=max_line_bytes)  # fmt: skip
        lines = orders = malformed = 0
        for start, stop in itertools.pairwise(bounds):
            result = parse_region(Region(file, start, stop, len(data)), options)
            assert result is not None
            lines += result.lines.overlong
            malformed += result.lines.overlong
            if result.parsed is not None:
                lines += result.parsed.lines
                orders += result.parsed.orders
                malformed += result.parsed.malformed
    # A line over the limit that a cut falls in is dropped as one malformed
    # line; any other is parsed: every non-blank line is counted once.
    raws = non_blank_lines(data)
    assert lines == len(raws)
    assert lines == orders + malformed
    short = [raw for raw in raws if len(raw) < max_line_bytes]
    assert sum(parse_chunk(raw).orders for raw in short) <= orders
    assert orders <= sum(parse_chunk(raw).orders for raw in raws)


# -- through a follower -------------------------------------------------------------------


async def _follow(path: Path, data: bytes) -> tuple[OrderLog, int]:
    bus = MemoryBus()
    # No line of the fuzz is over the line limit here: each is parsed as it is.
    config = OrderLogConfig(
        path, poll_interval=1.0, workers=0, publish="order", max_line_bytes=8 << 20
    )
    log = OrderLog(config, bus)
    received = 0
    with trio.fail_after(1000):
        async with (
            trio.open_nursery() as nursery,
            bus.subscribe("orders.>", maxsize=10_000, overflow="block") as sub,
        ):
            await nursery.start(log.follow)
            await engine.to_thread(_append, path, data)
            while log.statistics().lines < len(non_blank_lines(data)):  # noqa: ASYNC110
                await trio.sleep(0.5)  # virtual time: polls on the log's interval
            while received < log.statistics().messages:
                await anext(sub)
                received += 1
            nursery.cancel_scope.cancel()
    return log, received


def _append(path: Path, data: bytes) -> None:
    with open(path, "ab") as file:
        file.write(data)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(blocks())
@example(DEEP)  # deeper than the decoder goes: one malformed line
@example(GOOD + b" " + GOOD + b"\n")  # two values on one line: one malformed line, no order
def test_a_follower_counts_any_lines_written_to_its_file(data: bytes) -> None:
    data = GOOD + b"\n" + data + b"\n"
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "orders.log"
        path.write_bytes(b"")
        clock = trio.testing.MockClock(autojump_threshold=0)
        log, received = trio.run(_follow, path, data, clock=clock)
    stats = log.statistics()
    reference = parse_chunk(data)
    assert (stats.lines, stats.orders, stats.malformed) == (
        reference.lines,
        reference.orders,
        reference.malformed,
    )
    assert received == stats.messages == stats.orders
    assert stats.pending_bytes == 0
