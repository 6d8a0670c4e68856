"""Fuzzing the feed's frames: whatever arrives is a decoded event or a counted malformed frame.

Frames are drawn as arbitrary JSON, as stream messages with fields missing,
of the wrong type, with huge numbers or extra members, nested deep, and as
bytes that are not UTF-8. Decoding raises nothing but ``MalformedMessage``,
normalising nothing but ``ValueError`` (which the feed counts as malformed
too), and what is published is a plain topic and a ``Normalised`` payload
with finite numbers. Through a running feed, every frame read is published
or counted, and the connection stays up.
"""

from __future__ import annotations

import json
import math
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.bus import MemoryBus
from services.market._events import (
    MAX_SYMBOL_LENGTH,
    AggTrade,
    BookTicker,
    DepthUpdate,
    Event,
    Kline,
    MalformedMessage,
    Normalised,
    Trade,
    decode,
    normalise,
)
from tests.test_feed_hardening import feed_frames

INT64 = (-(2**63), 2**63 - 1)

KLINE = {"t": 0, "T": 59_999, "s": "X", "i": "1m", "o": "1", "c": "2", "h": "3", "l": "0.5"}
KLINE |= {"v": "10", "n": 4, "x": False}
# A valid ``data`` member for each stream kind, and a stream name for it.
TEMPLATES: dict[str, dict[str, Any]] = {
    "btcusdt@trade": {"e": "trade", "E": 1, "s": "BTCUSDT", "t": 5, "p": "100.5", "q": "0.2"}
    | {"T": 2, "m": False, "M": True},
    "x@aggTrade": {"e": "aggTrade", "E": 1, "s": "X", "a": 1, "p": "1", "q": "1", "f": 1}
    | {"l": 2, "T": 3, "m": True},
    "ethusdt@bookTicker": {"u": 7, "s": "ETHUSDT", "b": "99.5", "B": "1", "a": "100.5", "A": "2"},
    "x@depth@100ms": {"e": "depthUpdate", "E": 1, "s": "X", "U": 1, "u": 2}
    | {"b": [["1", "2"]], "a": []},
    "x@kline_1m": {"e": "kline", "E": 1, "s": "X", "k": KLINE},
}

huge = st.integers(min_value=-(2**200), max_value=2**200) | st.sampled_from(
    [2**63, 2**63 - 1, -(2**63) - 1, 2**64, 10**100]
)
leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    huge,
    st.floats(),  # inf and nan included: json.dumps writes Infinity and NaN, not JSON
    st.text(max_size=30),
    st.sampled_from(["1e999", "-1e999", "nan", "inf", "1_000", " 5 ", "0x10", ""]),
)
json_values = st.recursive(
    leaves,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner, max_size=4)
    ),
    max_leaves=12,
)


def nested(depth: int, inner: str = "1") -> str:
    return "[" * depth + inner + "]" * depth


@st.composite
def stream_messages(draw: st.DrawFn) -> str:
    """A stream message whose fields are missing, mistyped, huge or extra."""
    stream = draw(st.sampled_from(sorted(TEMPLATES)) | st.text(max_size=20))
    data = dict(TEMPLATES.get(stream, TEMPLATES["btcusdt@trade"]))
    for field in draw(st.lists(st.sampled_from(sorted(data)), max_size=3)):
        if draw(st.booleans()):
            data.pop(field, None)  # missing
        else:
            data[field] = draw(json_values)  # wrong type, huge number, odd text
    data |= draw(st.dictionaries(st.text(max_size=4), json_values, max_size=2))  # extra
    text = json.dumps({"stream": stream, "data": data})
    if draw(st.integers(0, 9)) == 0:  # nested deep, where the decoder must skip it
        depth = draw(st.sampled_from([10, 500, 5_000, 50_000]))
        text = text[:-2] + f', "z": {nested(depth)}' + "}}"
    return text


@st.composite
def not_utf8(draw: st.DrawFn) -> bytes:
    """A stream message with bytes in it that are not UTF-8, or just bytes."""
    if draw(st.booleans()):
        return draw(st.binary(max_size=200))
    frame = draw(stream_messages()).encode()
    at = draw(st.integers(0, len(frame)))
    bad = draw(st.sampled_from([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80"]))
    return frame[:at] + bad + frame[at:]


frames = st.one_of(
    json_values.map(json.dumps),
    stream_messages(),
    not_utf8(),
    st.sampled_from([10, 1_000, 100_000]).map(
        lambda depth: '{"stream": "x@trade", "data": ' + nested(depth) + "}"
    ),
)


def check_event(event: Event) -> None:
    """What decode admits: a symbol that is one topic token, whole numbers in 64 bits."""
    assert isinstance(event, Trade | AggTrade | BookTicker | DepthUpdate | Kline)
    assert event.s.isascii()
    assert event.s.isalnum()
    assert len(event.s) <= MAX_SYMBOL_LENGTH
    for value in msgspec.structs.astuple(event):
        if isinstance(value, int) and not isinstance(value, bool):
            assert INT64[0] <= value <= INT64[1]


def check_published(topic: str, data: bytes) -> None:
    """A topic the bus takes, and a payload whose numbers are finite."""
    MemoryBus().publish_nowait(topic, data)  # raises ValueError for a topic it refuses
    body = msgspec.json.decode(data, type=Normalised)
    for number in (body.price, body.qty, body.bid, body.ask):
        assert number is None or math.isfinite(number)


@given(frames)
@settings(max_examples=400, deadline=None)
def test_decoding_a_frame_gives_an_event_or_malformed(frame: str | bytes) -> None:
    try:
        _, event = decode(frame)
    except MalformedMessage:
        return
    check_event(event)
    try:
        topic, data = normalise(event)
    except ValueError:  # counted as malformed by the feed's processors
        return
    check_published(topic, data)


@given(st.lists(frames, min_size=1, max_size=15))
@settings(max_examples=40, deadline=None)
async def test_through_the_feed_every_frame_is_published_or_counted(
    script: list[str | bytes],
) -> None:
    outcome = await feed_frames(script)  # it also checks the connection stayed up
    stats = outcome.stats
    assert stats.received == len(script)
    assert stats.published + stats.malformed + outcome.dropped == len(script)
    assert len(outcome.published) == stats.published
    for message in outcome.published:
        check_published(message.topic, message.data)


@pytest.mark.parametrize(
    "frame",
    [
        '{"stream": "x@trade", "data": ' + nested(100_000) + "}",
        '{"stream": ' + nested(5_000, '"x@trade"') + ', "data": {}}',
        json.dumps({"stream": "x@trade", "data": TEMPLATES["btcusdt@trade"] | {"t": 2**64}}),
        json.dumps({"stream": "x@kline_1m", "data": TEMPLATES["x@kline_1m"] | {"E": -(2**70)}}),
        b'{"stream": "x@trade", "data": {"s": "\xff"}}',
    ],
    ids=["deep-data", "deep-stream", "huge-id", "huge-negative", "not-utf8"],
)
def test_frames_fuzzing_found_are_malformed(frame: str | bytes) -> None:
    with pytest.raises(MalformedMessage):
        decode(frame)
