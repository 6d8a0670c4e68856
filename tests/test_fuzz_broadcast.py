"""Fuzzing the broadcast's inputs: the handshake's request target and headers, and the
control messages a client sends.

The only outcomes allowed are a :class:`Rejection` or :class:`BadRequest` that
says why, a refusal in an error reply (or a close for a rule the client broke),
or success. Never another exception. (How long a hostile request takes is
bounded in ``test_broadcast_hardening.py``, not per example here: timing each
example on a loaded machine only makes the fuzzing flaky.)
"""

from __future__ import annotations

import json
import math
import urllib.parse
from typing import cast

import attrs
import hypothesis.strategies as st
import pytest
import trio
from hypothesis import HealthCheck, given, settings
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, Request, TextMessage

from engine.broadcast import BroadcastConfig
from engine.broadcast._client import Client
from engine.broadcast._client_requests import MAX_REPLIES
from engine.broadcast._handshake import Rejection, admit
from engine.broadcast._topics import (
    MAX_PATTERN_LENGTH,
    OPS,
    BadRequest,
    parse_pattern,
    parse_request,
    parse_target,
)

FUZZ = settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.large_base_example,
    ],
)

CONFIGS = {
    "default": BroadcastConfig(),
    "guarded": BroadcastConfig(
        token="s3cret",
        allowed_origins=("https://dash.example",),
        known_kinds=("trades", "book", "klines"),
        bus_topics=("trades.>", "book.>", "klines.>"),
        max_topics=4,
    ),
}

# -- strategies ------------------------------------------------------------------

# Names as a client might type them, and as an attacker would.
plain_names = st.sampled_from(["trades", "book", "klines", "BTCUSDT", "*", ">", "a", "B"])
odd_names = st.text(max_size=12) | st.text(
    alphabet=st.characters(min_codepoint=33, max_codepoint=126), max_size=8
)
names = plain_names | odd_names | st.builds(lambda n: "x" * n, st.integers(190, 260))


def _join(items: list[str], encode: bool) -> str:
    value = ",".join(items)
    return urllib.parse.quote(value, safe=",") if encode else value


def _repeat(name: str, count: int) -> list[str]:
    return [name] * count


name_lists = st.lists(names, max_size=20) | st.builds(_repeat, plain_names, st.integers(0, 3000))
params = st.tuples(
    st.sampled_from(["topics", "symbols", "token", "other", "topics[]", ""]),
    name_lists,
    st.booleans(),
).map(lambda p: f"{p[0]}={_join(p[1], p[2])}")
queries = st.lists(params, max_size=6).map("&".join)
paths = st.sampled_from(["/ws", "/other", "", "//[", "http://[::1/ws", "/ws/"]) | st.text(
    max_size=20
)
targets = (
    st.builds(lambda path, query: f"{path}?{query}", paths, queries)
    | st.text(max_size=200)
    | st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126), max_size=200)
)
header_values = st.binary(max_size=40) | st.sampled_from(
    [b"Bearer s3cret", b"bearer  s3cret", b"Bearer", b"", b"https://dash.example", b"\xff\xfe"]
)
headers = st.lists(
    st.tuples(st.sampled_from([b"authorization", b"Origin", b"x-other"]), header_values),
    max_size=4,
)

# JSON values of every type, nested, with numbers too big for anything.
huge_ints = st.integers() | st.builds(lambda n: 10**n, st.integers(10, 4000))
json_values = st.recursive(
    st.none() | st.booleans() | huge_ints | st.floats() | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=8), children, max_size=5)
    ),
    max_leaves=30,
)
request_like = st.fixed_dictionaries(
    {},
    optional={
        "op": st.sampled_from(["subscribe", "unsubscribe", "publish"]) | json_values,
        "topics": name_lists | json_values,
        "symbols": name_lists | json_values,
        "id": json_values,
    },
)


def _dumps(value: object) -> str:
    try:
        return json.dumps(value)
    except ValueError:  # an int past Python's digit limit for str()
        return "null"


def _nested(depth: int, opener: str, closer: str) -> str:
    return opener * depth + closer * depth


messages: st.SearchStrategy[str | bytes] = (
    request_like.map(_dumps)
    | json_values.map(_dumps)
    | st.text(max_size=200)
    | st.binary(max_size=200)
    | st.builds(
        _nested, st.integers(1, 2000) | st.sampled_from([1100, 2000]), st.just("["), st.just("]")
    )
    | st.builds(lambda n: '{"a":' * n + "1" + "}" * n, st.integers(1, 800))
    | st.builds(lambda n: "1" * n, st.integers(4000, 4096))
)


# -- the handshake -------------------------------------------------------------------


def _check_admitted(verdict: tuple[str, ...] | Rejection, config: BroadcastConfig) -> None:
    if isinstance(verdict, Rejection):
        assert 400 <= verdict.status < 600
        assert verdict.reason
        assert verdict.message
        verdict.message.encode()  # the body is sent as UTF-8
        return
    assert isinstance(verdict, tuple)
    assert len(verdict) <= config.max_topics
    for pattern in verdict:
        assert parse_pattern(pattern) == pattern
        assert len(pattern) <= MAX_PATTERN_LENGTH


@FUZZ
@given(target=targets, extra=headers, name=st.sampled_from(sorted(CONFIGS)))
def test_admit_answers_any_target_and_headers(
    target: str, extra: list[tuple[bytes, bytes]], name: str
) -> None:
    config = CONFIGS[name]
    request = Request(host="127.0.0.1", target=target, extra_headers=extra)
    _check_admitted(admit(request, config), config)


@FUZZ
@given(target=targets)
def test_parse_target_splits_or_raises_value_error(target: str) -> None:
    try:
        parsed = parse_target(target)
    except ValueError:
        return
    assert all("," not in t and t for t in parsed.topics + parsed.symbols)


# -- control messages -----------------------------------------------------------------


@FUZZ
@given(data=messages, name=st.sampled_from(sorted(CONFIGS)))
def test_parse_request_reads_or_says_why(data: str | bytes, name: str) -> None:
    rules = CONFIGS[name].topic_rules
    refused: BadRequest | None = None
    try:
        request = parse_request(data, rules)
    except BadRequest as exc:
        refused = exc
    if refused is not None:
        assert str(refused)
        assert refused.request_id is None or isinstance(refused.request_id, str | int)
    else:
        assert request.op in OPS
        assert 0 < len(request.patterns) <= rules.limit


def _opened(config: BroadcastConfig) -> tuple[Client, WSConnection]:
    """A client past the upgrade, on a socket nothing is written to, and its peer's protocol."""

    class Idle:
        @property
        def socket(self) -> Idle:
            return self

        def getpeername(self) -> tuple[str, int]:
            return ("127.0.0.1", 1)

    client = Client(cast(trio.SocketStream, Idle()), config, 1, lambda _: None)
    peer = WSConnection(ConnectionType.CLIENT)
    client.ws.receive_data(peer.send(Request(host="127.0.0.1", target="/ws")))
    [request] = client.ws.events()
    assert isinstance(request, Request)
    peer.receive_data(client.ws.send(AcceptConnection()))
    [accepted] = peer.events()
    assert isinstance(accepted, AcceptConnection)
    client.open(())
    return client, peer


def _answers(client: Client, peer: WSConnection) -> list[dict[str, object]]:
    data = b"".join(client._replies)
    client._replies.clear()
    peer.receive_data(data)
    return [json.loads(e.data) for e in peer.events() if isinstance(e, TextMessage)]


async def _requests(config: BroadcastConfig, batch: list[tuple[str | bytes, int]]) -> None:
    client, peer = _opened(config)
    for data, parts in batch:
        before = client.cause
        # As the reader hands it over: in parts, the last one finishing the message.
        size = max(1, math.ceil(len(data) / parts))
        chunks = [data[i : i + size] for i in range(0, len(data), size)] or [data]
        for index, chunk in enumerate(chunks):
            client._message_part(chunk, index == len(chunks) - 1)
        if client.cause is not None:  # closed: too big, or it kept breaking the rate
            assert client.cause in ("message_too_big", "rate_limited", "policy")
            assert before is None or client.cause == before
            continue
        [answer] = _answers(client, peer)
        assert answer["op"] in ("subscribed", "unsubscribed", "error")
        if answer["op"] == "error":
            assert isinstance(answer["error"], str)
            assert answer["error"]
        else:
            assert len(client.topics) <= config.max_topics
    assert len(client._replies) <= MAX_REPLIES


@FUZZ
@given(
    batch=st.lists(st.tuples(messages, st.integers(1, 4)), min_size=1, max_size=8),
    rate=st.sampled_from([math.inf, 1.0]),
    name=st.sampled_from(sorted(CONFIGS)),
)
def test_a_client_answers_any_request(
    batch: list[tuple[str | bytes, int]], rate: float, name: str
) -> None:
    config = attrs.evolve(CONFIGS[name], request_rate=rate, request_burst=3, ping_interval=math.inf)
    trio.run(_requests, config, batch)


@pytest.mark.parametrize(
    "data",
    [
        "[" * 2000 + "]" * 2000,
        '{"op": "subscribe", "topics": ["trades"], "id": ' + "9" * 5000 + "}",
        b"\xff\xfe\x00{",
        '{"op": ["subscribe"], "topics": ["trades"]}',
        '{"op": "subscribe", "topics": [[[]]], "id": 1}',
        '{"op": "subscribe", "topics": ["trades"], "id": 1e999}',
    ],
)
def test_known_hostile_messages_get_a_bad_request(data: str | bytes) -> None:
    with pytest.raises(BadRequest):
        parse_request(data, BroadcastConfig().topic_rules)
