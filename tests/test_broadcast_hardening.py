"""The broadcast against abuse: topic expansion, request rates, the cost of a change of
topics, connection limits, unknown topics, and the accounting of every frame offered to a
client."""

from __future__ import annotations

import contextlib
import json
import math
import re
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import Any, ClassVar, NoReturn, cast

import attrs
import hypothesis.strategies as st
import pytest
import trio
import trio.testing
from hypothesis import given, settings
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from trio_websocket import ConnectionClosed
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, RejectConnection, RejectData, Request

from engine._metrics import EngineCollector
from engine._refusal import REFUSAL_LINGER
from engine.broadcast import (
    CLOSE_POLICY,
    BroadcastConfig,
    BroadcastStatistics,
    ClientStatistics,
)
from engine.broadcast._client import Client
from engine.broadcast._client_queue import WRITE_BATCH
from engine.broadcast._fanout import Fanout
from engine.broadcast._ratelimit import TokenBucket, Verdict
from engine.broadcast._server import MAX_REFUSING
from engine.broadcast._topics import (
    MAX_LISTED,
    Tokens,
    TooManyTopics,
    TopicRules,
    UnknownTopic,
    expand,
    overlap,
    split,
)
from engine.bus import BusMessage, tokens_match
from tests.test_broadcast import (
    GUARD,
    VIRTUAL_GUARD,
    close_of,
    raw_client,
    rejection,
    serving,
    ws_client,
)


def names(prefix: str, count: int) -> list[str]:
    return [f"{prefix}{i}" for i in range(count)]


def holds(stats: ClientStatistics) -> bool:
    """The accounting invariant of one client."""
    return (
        stats.offered == stats.sent + stats.dropped + stats.queued
        and stats.dropped == sum(stats.dropped_by_reason.values())
        and min(stats.queued, stats.sent, *stats.dropped_by_reason.values()) >= 0
    )


async def refusal(port: int, target: str) -> tuple[int, str, float]:
    """Status, body and seconds taken by a refused upgrade, timed on the real clock."""
    async with raw_client(port) as raw:
        started = trio.current_time()
        await raw.stream.send_all(raw.ws.send(Request(host="127.0.0.1", target=target)))
        events = await raw.events(until=(AcceptConnection,))  # or until it closes
        elapsed = trio.current_time() - started
    answer = events[0]
    assert isinstance(answer, RejectConnection), answer
    body = b"".join(bytes(e.data) for e in events if isinstance(e, RejectData))
    return answer.status_code, body.decode(), elapsed


# -- topic expansion is bounded before anything is built -------------------


class Counted(str):
    """A name that counts how often it is formatted into a pattern."""

    formats = 0

    def __format__(self, spec: str) -> str:
        self.formats += 1
        return str.__format__(self, spec)


def counted(prefix: str, count: int) -> list[Counted]:
    return [Counted(name) for name in names(prefix, count)]


class Unread(Sequence[str]):
    """A list of ``length`` names that fails the test if any is read."""

    def __init__(self, length: int) -> None:
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: Any) -> NoReturn:
        raise AssertionError("an item was read")

    def __iter__(self) -> Iterator[str]:
        raise AssertionError("the list was read")


def test_expand_counts_the_patterns_before_building_any() -> None:
    kinds, symbols = counted("k", 1000), counted("S", 1000)
    with pytest.raises(TooManyTopics, match=r"^at most 64 topics, got 1000000$"):
        expand(kinds, symbols, limit=64)
    assert sum(s.formats for s in symbols) == 0  # no kind.symbol pattern was made
    # Within the limit, each symbol is formatted once per kind: the count above can fail.
    assert len(expand(kinds[:8], symbols[:8], limit=64)) == 64
    assert sum(s.formats for s in symbols) == 64


def test_expand_refuses_long_lists_before_reading_them() -> None:
    with pytest.raises(TooManyTopics, match=f"^at most {MAX_LISTED} symbols in one request"):
        expand(Unread(10_000), Unread(10_000), limit=64)
    with pytest.raises(TooManyTopics, match=f"^at most {MAX_LISTED} topics in one request"):
        expand(Unread(MAX_LISTED + 1), [], limit=64)


def test_expand_removes_duplicates_first() -> None:
    symbol = Counted("BTCUSDT")
    assert expand(["trades"] * MAX_LISTED, [symbol] * MAX_LISTED, limit=1) == ["trades.BTCUSDT"]
    assert symbol.formats == 1  # one pattern built, not 1024 x 1024


@pytest.mark.parametrize(
    ("topics", "symbols", "limit", "patterns"),
    [
        # Eight kinds by eight symbols is 64: the default limit exactly.
        (names("k", 8), names("S", 8), 64, 64),
        (names("k", 8), names("S", 8), 63, None),
        # Spelled twice (as a kind and a symbol, and in full) is one pattern.
        (["trades", "trades.BTCUSDT"], ["BTCUSDT"], 1, 1),
        (["trades", "trades.>"], ["BTCUSDT"], 1, None),
        ([], names("S", 3), 3, 3),
        ([], names("S", 3), 2, None),
        (["trades", "trades.>", "*.X"], [], 2, 2),
    ],
)
def test_the_count_is_exact(
    topics: list[str], symbols: list[str], limit: int, patterns: int | None
) -> None:
    if patterns is None:
        with pytest.raises(TooManyTopics):
            expand(topics, symbols, limit=limit)
    else:
        assert len(expand(topics, symbols, limit=limit)) == patterns


# Kinds, full patterns and wildcards that spell the same pattern several ways.
some_topics = st.lists(
    st.sampled_from(
        [
            *("trades", "book", "a", "trades.>", "trades.BTC", "book.ETH", "*.BTC", "a.b"),
            *("a.BTC", "trades.*", "*", ">", "*.>", "*.*"),
        ]
    ),
    max_size=8,
)
some_symbols = st.lists(st.sampled_from(["BTC", "ETH", "b", "X"]), max_size=6)


@settings(max_examples=300, deadline=None)
@given(topics=some_topics, symbols=some_symbols, limit=st.integers(1, 30))
def test_the_count_is_the_number_of_patterns_built(
    topics: list[str], symbols: list[str], limit: int
) -> None:
    every = expand(topics, symbols, limit=sys.maxsize)
    assert len(every) == len(set(every))
    if len(every) <= limit:
        assert expand(topics, symbols, limit=limit) == every
    else:
        with pytest.raises(TooManyTopics, match=f"^at most {limit} topics, got {len(every)}$"):
            expand(topics, symbols, limit=limit)


def test_a_pattern_built_too_long_is_refused_before_it_is_built() -> None:
    with pytest.raises(ValueError, match="at most 200 characters"):
        expand(["k" * 100], ["S" * 100], limit=64)
    assert expand(["k" * 99], ["S" * 100], limit=64) == ["k" * 99 + "." + "S" * 100]


# The end-to-end bound on answering a request of 1500 x 1500 names (the tests
# above show that nothing is built for it), generous for a loaded machine.
ANSWERED_AT_ONCE = 0.5  # seconds


async def test_1500_topics_by_1500_symbols_in_the_query_are_refused_at_once() -> None:
    query = "topics=" + ",".join(["a"] * 1500) + "&symbols=" + ",".join(["B"] * 1500)
    with trio.fail_after(GUARD):
        async with serving() as (server, _):
            status, body, elapsed = await refusal(server.port, "/ws?" + query)
            assert (status, body) == (400, "at most 1024 symbols in one request, got 1500\n")
            assert elapsed < ANSWERED_AT_ONCE, elapsed
            assert server.statistics().rejected == {"too_many_topics": 1}


async def test_a_million_patterns_in_the_query_are_refused_with_the_count() -> None:
    query = "topics=" + ",".join(names("k", 1000)) + "&symbols=" + ",".join(names("S", 1000))
    with trio.fail_after(GUARD):
        async with serving() as (server, _):
            status, body, _ = await refusal(server.port, "/ws?" + query)
            assert (status, body) == (400, "at most 64 topics, got 1000000\n")
            assert server.statistics().rejected == {"too_many_topics": 1}


async def test_duplicates_in_the_query_are_one_pattern() -> None:
    query = "topics=" + ",".join(["trades"] * 1000) + "&symbols=" + ",".join(["BTC"] * 1000)
    with trio.fail_after(GUARD):
        async with serving(max_topics=1) as (server, bus), ws_client(server, "?" + query) as ws:
            assert server.statistics().connections[0].topics == ("trades.BTC",)
            await bus.publish("trades.BTC", b"one")
            assert await ws.get_message() == "one"


async def test_a_huge_subscribe_message_gets_an_error_with_the_count() -> None:
    request = {"op": "subscribe", "topics": names("k", 700), "symbols": names("S", 700), "id": 7}
    message = json.dumps(request)
    with trio.fail_after(GUARD):
        async with (
            serving(max_inbound_size=len(message)) as (server, _),
            ws_client(server) as ws,
        ):
            await ws.send_message(message)
            reply = json.loads(await ws.get_message())
            assert reply == {"op": "error", "id": 7, "error": "at most 64 topics, got 490000"}


# -- control messages are rate-limited ----------------------------------------


def test_token_bucket_exact_figures() -> None:
    bucket = TokenBucket(rate=2, burst=3)
    assert [bucket.take(0) for _ in range(3)] == [Verdict.ALLOW] * 3
    assert bucket.take(0) is Verdict.REFUSE  # debt 1
    assert bucket.take(1.0) is Verdict.ALLOW  # +2 tokens, minus this one: 0 left
    assert bucket.take(1.0) is Verdict.REFUSE  # debt 1
    assert bucket.take(1.0) is Verdict.REFUSE  # debt 2
    assert bucket.take(1.0) is Verdict.CLOSE  # debt 3: the burst


def test_token_bucket_holds_at_most_the_burst() -> None:
    bucket = TokenBucket(rate=1, burst=2)
    assert bucket.take(0) is Verdict.ALLOW
    # An hour idle refills two tokens, not 3,600.
    assert [bucket.take(3600) for _ in range(3)] == [Verdict.ALLOW, Verdict.ALLOW, Verdict.REFUSE]
    # A debt is paid back at the rate: one more token after 0.5 s pays half of it.
    assert bucket.take(3600.5) is Verdict.REFUSE
    assert bucket.take(3603) is Verdict.ALLOW


def test_token_bucket_with_an_infinite_rate_allows_everything() -> None:
    bucket = TokenBucket(rate=math.inf, burst=1)
    assert {bucket.take(0) for _ in range(1000)} == {Verdict.ALLOW}


async def test_a_client_over_the_request_rate_is_refused_then_closed(
    autojump_clock: trio.testing.MockClock,
) -> None:
    subscribe = json.dumps({"op": "subscribe", "topics": ["trades"]})
    with trio.fail_after(VIRTUAL_GUARD):
        async with (
            serving(request_rate=2, request_burst=3, close_timeout=1) as (server, _),
            ws_client(server) as ws,
        ):
            replies = []
            for _ in range(4):
                await ws.send_message(subscribe)
                replies.append(json.loads(await ws.get_message())["op"])
            assert replies == ["subscribed"] * 3 + ["error"]
            await trio.sleep(1)
            await ws.send_message(subscribe)
            assert json.loads(await ws.get_message())["op"] == "subscribed"
            await ws.send_message(subscribe)
            error = json.loads(await ws.get_message())["error"]
            assert error == "rate limited: at most 2 requests per second, 3 at once"
            for _ in range(2):  # debt 2: refused; debt 3, the burst: closed
                await ws.send_message(subscribe)
            assert json.loads(await ws.get_message())["op"] == "error"
            with pytest.raises(ConnectionClosed) as closed:
                await ws.get_message()
            assert close_of(closed.value) == (CLOSE_POLICY, "too many requests")
        assert server.statistics().disconnected == {"rate_limited": 1}


# -- a change of topics costs what it changes -------------------------------------


class CountedTokens(tuple[str, ...]):
    """A pattern that counts the topics it is matched against (each match reads it once)."""

    matches: ClassVar[list[int]] = [0]  # shared by every pattern; reset it first

    def __iter__(self) -> Iterator[str]:
        CountedTokens.matches[0] += 1
        return super().__iter__()


class FakeClient:
    """What the fanout needs of a client: patterns, and a queue to offer frames to."""

    def __init__(self, *patterns: str) -> None:
        self.patterns: tuple[Tokens, ...] = tuple(CountedTokens(split(p)) for p in patterns)
        self.frames: list[bytes] = []

    def offer(self, frame: bytes) -> None:
        self.frames.append(frame)

    def set(self, *patterns: str) -> None:
        self.patterns = tuple(CountedTokens(split(p)) for p in patterns)


def remember(fanout: Fanout[FakeClient], topics: list[str]) -> None:
    fanout.dispatch([BusMessage(topic, b"m") for topic in topics])


def test_a_change_of_topics_costs_what_it_changes_not_the_routes_remembered() -> None:
    fanout = Fanout[FakeClient](text=True)
    kinds = [f"k{i}.*" for i in range(63)]
    client = FakeClient(*kinds, "trades.SYM0")
    fanout.add(client)
    remember(fanout, [f"trades.SYM{i}" for i in range(10_000)])
    assert len(fanout.routes()) == 10_000
    CountedTokens.matches[0] = 0
    started = time.thread_time()
    for i in range(1, 21):
        client.set(*kinds, f"trades.SYM{i}")  # one pattern swapped for another
        fanout.update(client)
        fanout.update(client)  # the same patterns again: nothing to do
    elapsed = time.thread_time() - started
    # Each swap tests the pattern removed and the one added against the one
    # route each could match (and the client's other patterns against the
    # route it leaves); every route against every pattern would be
    # 20 x 10,000 x 64 matches, seconds of CPU.
    assert CountedTokens.matches[0] < 20 * 100
    assert elapsed < 0.25, elapsed
    routes = fanout.routes()
    assert [t for t, clients in routes.items() if client in clients] == ["trades.SYM20"]


# A few clients, patterns and topics, and every way to change them: after each
# step the remembered routes must be what routing every topic afresh gives.
fan_patterns = st.sampled_from(
    ["trades.>", "trades.BTC", "*.BTC", "*.*", ">", "*.>", "book.*", "*", "*.*.*", "trades.*.x"]
)
fan_topics = st.sampled_from(
    ["trades.BTC", "trades.ETH", "book.BTC", "book", "trades.BTC.x", "x.y.z", "a"]
)
fan_steps = st.lists(
    st.one_of(
        st.tuples(st.just("add"), st.integers(0, 3), st.lists(fan_patterns, max_size=4)),
        st.tuples(st.just("set"), st.integers(0, 3), st.lists(fan_patterns, max_size=4)),
        st.tuples(st.just("remove"), st.integers(0, 3), st.just([])),
        st.tuples(st.just("publish"), st.just(0), st.lists(fan_topics, min_size=1, max_size=3)),
    ),
    max_size=25,
)


@settings(max_examples=300, deadline=None)
@given(steps=fan_steps)
def test_routes_changed_step_by_step_equal_routes_made_afresh(
    steps: list[tuple[str, int, list[str]]],
) -> None:
    fanout = Fanout[FakeClient](text=False, cache_size=4)  # small: the memo starts over too
    clients = [FakeClient() for _ in range(4)]
    for op, index, items in steps:
        client = clients[index]
        if op == "add":
            client.set(*items)
            fanout.add(client)
        elif op == "set":
            client.set(*items)
            fanout.update(client)
        elif op == "remove":
            fanout.remove(client)
        else:
            before = [len(c.frames) for c in clients]
            remember(fanout, items)
            for c, count in zip(clients, before, strict=True):
                wanted = [t for t in items if c in fanout.clients and wants(c, t)]
                assert len(c.frames) - count == len(wanted)
        for topic, routed in fanout.routes().items():
            assert routed == {c for c in fanout.clients if wants(c, topic)}, topic


def wants(client: FakeClient, topic: str) -> bool:
    return any(tokens_match(tuple(p), split(topic)) for p in client.patterns)


def opened_client(config: BroadcastConfig, on_topics: Callable[[Client], None]) -> Client:
    """A client past the upgrade, on a socket nothing is written to."""
    client = Client(cast(trio.SocketStream, _Socket()), config, 1, on_topics)
    peer = WSConnection(ConnectionType.CLIENT)
    client.ws.receive_data(peer.send(Request(host="127.0.0.1", target="/ws")))
    assert [type(e) for e in client.ws.events()] == [Request]
    client.ws.send(AcceptConnection())
    client.open(())
    return client


def test_a_request_that_changes_no_topic_changes_no_route() -> None:
    changed: list[tuple[str, ...]] = []
    config = BroadcastConfig(ping_interval=math.inf, request_rate=math.inf)
    client = opened_client(config, lambda c: changed.append(c.topics))

    def request(op: str, *topics: str) -> None:
        client._message_part(json.dumps({"op": op, "topics": list(topics)}), True)

    async def main() -> None:
        request("subscribe", "trades")
        request("subscribe", "trades")
        request("subscribe", "trades.>", "trades")
        request("unsubscribe", "book")
        request("unsubscribe", "trades")
        request("unsubscribe", "trades")

    trio.run(main)
    assert changed == [("trades.>",), ()]


def test_the_topic_rules_are_built_once_per_config() -> None:
    config = BroadcastConfig(max_topics=3, known_kinds=["trades"])
    assert config.topic_rules is config.topic_rules
    assert config.topic_rules == TopicRules(3, (">",), ("trades",))


# -- statistics: each figure exported once -----------------------------------------


async def test_dropped_is_exported_once_by_reason() -> None:
    with trio.fail_after(GUARD):
        async with serving() as (server, _):
            stats = server.statistics()
            assert "dropped" not in attrs.fields_dict(BroadcastStatistics)
            assert stats.dropped == sum(stats.dropped_by_reason.values()) == 0
            registry = CollectorRegistry()
            registry.register(EngineCollector(None, {"broadcast": server}, None))
            page = generate_latest(registry).decode()
    families = {family.name: family for family in text_string_to_metric_families(page)}
    dropped = [f for f in families if "dropped" in f and f.startswith("engine_broadcast")]
    assert dropped == ["engine_broadcast_dropped"]
    samples = families["engine_broadcast_dropped"].samples
    assert {(s.name, s.labels["reason"], s.labels["source"]) for s in samples} == {
        ("engine_broadcast_dropped_total", "overflow", "broadcast"),
        ("engine_broadcast_dropped_total", "closed", "broadcast"),
    }
    assert families["engine_broadcast_dropped"].type == "counter"


async def test_refusals_and_closes_are_labelled_counters_on_metrics() -> None:
    with trio.fail_after(GUARD):
        async with serving() as (server, _):
            status, _, _ = await refusal(server.port, "/elsewhere")
            assert status == 404
            registry = CollectorRegistry()
            registry.register(EngineCollector(None, {"broadcast": server}, None))
            page = generate_latest(registry).decode()
    families = {family.name: family for family in text_string_to_metric_families(page)}
    rejected = families["engine_broadcast_rejected"]
    assert rejected.type == "counter"
    assert [(s.name, s.labels, s.value) for s in rejected.samples] == [
        ("engine_broadcast_rejected_total", {"reason": "not_found", "source": "broadcast"}, 1.0)
    ]


# -- connections per IP address, and in the upgrade ------------------------------


async def answer_at_accept(port: int) -> bytes:
    """All a connection that sends nothing is told: it must come with no wait at all."""
    async with raw_client(port) as raw:
        started = trio.current_time()
        answer = b""
        while data := await raw.stream.receive_some(4096):
            answer += data
        assert trio.current_time() == started
        return answer


def busy(body: str) -> bytes:
    """The 503 a connection refused at accept gets, before its request is read."""
    return (
        b"HTTP/1.1 503 Service Unavailable\r\n"
        b"content-type: text/plain; charset=utf-8\r\n"
        b"content-length: %d\r\n"
        b"connection: close\r\n"
        b"retry-after: 5\r\n\r\n%s\n" % (len(body) + 1, body.encode())
    )


async def test_max_clients_per_ip_answers_503_at_accept(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(VIRTUAL_GUARD):
        async with serving(max_clients_per_ip=2) as (server, _):
            async with ws_client(server), ws_client(server):
                assert await answer_at_accept(server.port) == busy(
                    "at most 2 connections per address"
                )
                # A client that sends its request at once reads the same answer.
                assert await rejection(server.port, "/ws", []) == 503
                assert server.statistics().rejected == {"per_ip": 2}
            # Both gone (the close handshake done): the address may connect again.
            await trio.testing.wait_all_tasks_blocked()
            assert await rejection(server.port, "/ws", []) is None


async def test_connections_still_in_the_upgrade_count_against_the_per_ip_limit(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(VIRTUAL_GUARD):
        async with (
            serving(max_clients_per_ip=2, handshake_timeout=10) as (server, _),
            ws_client(server),
            raw_client(server.port),  # connected, and silent: in the upgrade
        ):
            await trio.testing.wait_all_tasks_blocked()
            stats = server.statistics()
            assert (stats.clients, stats.handshaking) == (1, 1)
            # Not held for handshake_timeout: refused as soon as it is accepted.
            assert await answer_at_accept(server.port) == busy("at most 2 connections per address")
            assert server.statistics().rejected == {"per_ip": 1}


async def test_max_handshaking_answers_503_at_accept(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(VIRTUAL_GUARD):
        async with (
            serving(max_handshaking=2, handshake_timeout=10) as (server, bus),
            ws_client(server, "?topics=trades") as open_client,  # open: not counted
            raw_client(server.port),
            raw_client(server.port),
        ):
            await trio.testing.wait_all_tasks_blocked()
            assert server.statistics().handshaking == 2
            assert await answer_at_accept(server.port) == busy(
                "at most 2 connections in the upgrade"
            )
            assert server.statistics().rejected == {"busy": 1}
            await bus.publish("trades.BTC", b"still served")
            assert await open_client.get_message() == "still served"
            # Once the silent ones have timed out, a new connection is served again.
            await trio.sleep(10)
            await trio.testing.wait_all_tasks_blocked()
            assert server.statistics().rejected == {"busy": 1, "handshake_timeout": 2}
            assert await rejection(server.port, "/ws", []) is None


async def test_refusals_at_accept_under_way_are_bounded_then_closed_unanswered(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(VIRTUAL_GUARD):
        async with (
            serving(max_handshaking=1) as (server, _),
            raw_client(server.port),  # silent, in the upgrade: every other is refused
            contextlib.AsyncExitStack() as lingering,
        ):
            # Refused clients that neither read nor close keep their refusal
            # under way for REFUSAL_LINGER.
            for _ in range(MAX_REFUSING):
                await lingering.enter_async_context(raw_client(server.port))
            await trio.testing.wait_all_tasks_blocked()
            assert await answer_at_accept(server.port) == b""  # one more: closed unanswered
            await trio.sleep(REFUSAL_LINGER)
            assert await answer_at_accept(server.port) == busy(
                "at most 1 connections in the upgrade"
            )
            assert server.statistics().rejected == {"busy": MAX_REFUSING + 2}


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"max_clients_per_ip": 0}, "max_clients_per_ip"),
        ({"max_handshaking": 0}, "max_handshaking"),
        ({"request_rate": 0}, "request_rate"),
        ({"request_rate": math.nan}, "request_rate"),
        ({"request_rate": "fast"}, "request_rate"),
        ({"request_burst": 0}, "request_burst"),
        ({"known_kinds": ()}, "known_kinds"),
        ({"known_kinds": "trades"}, "known_kinds"),
        ({"known_kinds": ("trades.x",)}, "known_kinds"),
        ({"known_kinds": ("*",)}, "known_kinds"),
        ({"known_kinds": ("a b",)}, "known_kinds"),
    ],
)
def test_new_settings_are_checked_by_name(options: dict[str, Any], named: str) -> None:
    with pytest.raises((ValueError, TypeError), match=named):
        BroadcastConfig(**options)


# -- unknown topics are refused with the valid ones -----------------------------


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        ("trades.>", ">", True),
        ("trades.>", "trades.BTC", True),
        ("trades.>", "trades", False),
        ("trades.>", "book.>", False),
        ("*.BTC", "trades.>", True),
        ("*.BTC", "trades.ETH", False),
        ("trades.*", "trades.BTC.x", False),
        ("trades.*.x", "trades.>", True),
        ("a.b", "a.b", True),
    ],
)
def test_overlap(a: str, b: str, expected: bool) -> None:
    assert overlap(split(a), split(b)) is expected
    assert overlap(split(b), split(a)) is expected


def test_rules_refuse_unknown_kinds_and_patterns_that_match_nothing() -> None:
    rules = TopicRules(64, ("trades.>", "book.>"), ("trades", "book"))
    assert rules.patterns(["trades", "*.BTC", ">"], []) == ["trades.>", "*.BTC", ">"]
    with pytest.raises(
        UnknownTopic, match=r"unknown topic 'orders\.>': the kinds are trades, book"
    ):
        rules.patterns(["orders"], [])
    carried = TopicRules(64, ("trades.>",))
    with pytest.raises(UnknownTopic, match=r"'book\.X' matches nothing served here: trades\.>"):
        carried.patterns(["book.X"], [])
    assert carried.patterns(["book.X"], [], subscribe=False) == ["book.X"]


@pytest.mark.parametrize(
    ("options", "query", "body"),
    [
        (
            {"known_kinds": ("trades", "book")},
            "topics=trades,orders",
            "unknown topic 'orders.>': the kinds are trades, book",
        ),
        (
            {"bus_topics": ("trades.>", "book.>")},
            "topics=klines&symbols=BTC",
            "topic 'klines.BTC' matches nothing served here: trades.>, book.>",
        ),
    ],
)
async def test_an_unknown_topic_is_refused_with_400(
    options: dict[str, Any], query: str, body: str
) -> None:
    with trio.fail_after(GUARD):
        async with serving(**options) as (server, _):
            status, text, _ = await refusal(server.port, "/ws?" + query)
            assert (status, text) == (400, body + "\n")
            assert server.statistics().rejected == {"unknown_topics": 1}


async def test_an_unknown_topic_in_a_subscribe_message_gets_an_error() -> None:
    with trio.fail_after(GUARD):
        async with (
            serving(known_kinds=("trades", "book")) as (server, bus),
            ws_client(server) as ws,
        ):
            await ws.send_message(json.dumps({"op": "subscribe", "topics": ["tardes"], "id": 1}))
            assert json.loads(await ws.get_message()) == {
                "op": "error",
                "id": 1,
                "error": "unknown topic 'tardes.>': the kinds are trades, book",
            }
            await ws.send_message(json.dumps({"op": "subscribe", "topics": ["trades"]}))
            assert json.loads(await ws.get_message())["topics"] == ["trades.>"]
            await bus.publish("trades.BTC", b"still open")
            assert await ws.get_message() == "still open"


# -- hostile request targets --------------------------------------------------------


async def test_a_target_urllib_cannot_split_is_answered_400() -> None:
    with trio.fail_after(GUARD):
        async with serving() as (server, bus), raw_client(server.port) as raw:
            # h11 lets any printable target through; urlsplit raises on "//[".
            answer = await raw.upgrade("//[/ws")
            assert isinstance(answer, RejectConnection)
            assert answer.status_code == 400
            assert server.statistics().rejected == {"bad_request": 1}
            async with ws_client(server, "?topics=trades") as ws:  # the server still serves
                await bus.publish("trades.BTC", b"alive")
                assert await ws.get_message() == "alive"


async def test_deeply_nested_json_gets_an_error_reply() -> None:
    with trio.fail_after(GUARD):
        async with serving() as (server, bus), ws_client(server, "?topics=trades") as ws:
            await ws.send_message("[" * 2000 + "]" * 2000)  # json.loads: RecursionError
            assert json.loads(await ws.get_message())["op"] == "error"
            await bus.publish("trades.BTC", b"alive")
            assert await ws.get_message() == "alive"


# -- every frame offered is accounted for ----------------------------------------


class _Socket:
    """A client socket whose writes finish only when the test says so."""

    def __init__(self) -> None:
        self.socket = self  # for the client's peer name
        self.pending: bytes | None = None
        self.finished: list[bytes] = []
        self._go = trio.Event()

    def getpeername(self) -> tuple[str, int]:
        return ("127.0.0.1", 1)

    async def send_all(self, data: bytes) -> None:
        self.pending = data
        try:
            await self._go.wait()
        finally:
            self.pending = None
        self._go = trio.Event()
        self.finished.append(data)

    def finish_write(self) -> None:
        self._go.set()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        await trio.sleep_forever()
        raise AssertionError("unreachable")


def frame_ids(data: bytes | None) -> list[int]:
    return [int(n) for n in re.findall(rb"<(\d+)>", data or b"")]


@contextlib.asynccontextmanager
async def running_client(
    stream: _Socket, guard: float, **options: Any
) -> AsyncIterator[tuple[Client, trio.Nursery]]:
    """A :class:`Client` on ``stream``, open and running, with nothing offered yet."""
    config = BroadcastConfig(ping_interval=math.inf, **options)
    client = Client(cast(trio.SocketStream, stream), config, 1, lambda _: None)
    client.open(("trades.>",))
    with trio.fail_after(guard):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.run)
            await trio.testing.wait_all_tasks_blocked()
            yield client, nursery


async def test_frames_queued_at_a_close_are_dropped_as_closed() -> None:
    stream = _Socket()
    async with running_client(stream, GUARD, queue_size=10, max_lost=2) as (client, nursery):
        client.offer(b"<0>")
        await trio.testing.wait_all_tasks_blocked()  # in the write under way
        for i in range(1, 14):  # ten fit; three push out the oldest: too slow
            client.offer(b"<%d>" % i)
        stats = client.statistics()
        assert (stats.offered, stats.queued, stats.dropped_by_reason) == (
            14,
            11,
            {"overflow": 3, "closed": 0},
        )
        assert client.cause == "too_slow"
        client.offer(b"<99>")  # after the close started: not offered at all
        assert client.statistics().offered == 14
        stream.finish_write()  # the write under way ends; the rest never goes
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    client.discard()  # as the server does once the connection is gone
    stats = client.statistics()
    assert frame_ids(b"".join(stream.finished)) == [0]
    assert (stats.sent, stats.queued, stats.dropped) == (1, 0, 13)
    assert stats.dropped_by_reason == {"overflow": 3, "closed": 10}
    assert holds(stats)


async def test_lag_is_the_age_of_the_oldest_frame_not_written(
    autojump_clock: trio.testing.MockClock,
) -> None:
    stream = _Socket()
    async with running_client(stream, VIRTUAL_GUARD) as (client, nursery):
        assert client.lag(trio.current_time()) == 0.0  # nothing waits
        client.offer(b"<0>")  # at 0; the write under way until 2
        await trio.testing.wait_all_tasks_blocked()
        await trio.sleep(1)
        for i in range(1, 2049):  # at 1: two writes' worth
            client.offer(b"<%d>" % i)
        assert client.lag(trio.current_time()) == 1.0
        await trio.sleep(1)
        stream.finish_write()  # at 2: the first 1,024 of them go out
        await trio.testing.wait_all_tasks_blocked()
        assert client.lag(trio.current_time()) == 2.0  # arrived during a write begun at 0
        await trio.sleep(1)
        for i in range(2049, 2059):  # at 3, during the second write
            client.offer(b"<%d>" % i)
        await trio.sleep(1)
        stream.finish_write()  # at 4: the second 1,024 go out
        await trio.testing.wait_all_tasks_blocked()
        assert client.lag(trio.current_time()) == 4.0  # offered at 1, aged from 0
        stream.finish_write()
        await trio.testing.wait_all_tasks_blocked()
        # Only the ten offered at 3 wait, in the write begun at 4: aged from
        # 2, not from 0, though the client was never idle meanwhile.
        assert client.statistics().queued == 10
        assert client.lag(trio.current_time()) == 2.0
        await trio.sleep(9)
        client.check_lag(trio.current_time())  # 11 s behind: more than max_lag
        assert client.cause == "too_slow"
        nursery.cancel_scope.cancel()
    assert frame_ids(b"".join(stream.finished)) == list(range(2049))


async def test_the_server_counts_what_a_closed_client_never_got(
    autojump_clock: trio.testing.MockClock,
) -> None:
    options = {"queue_size": 50, "max_lost": 10_000, "close_timeout": 3}
    with trio.fail_after(VIRTUAL_GUARD):
        async with (
            serving(**options) as (server, bus),
            raw_client(server.port, receive_buffer=4096) as mute,
        ):
            assert isinstance(await mute.upgrade("/ws?topics=>"), AcceptConnection)
            # More than its socket and its queue hold: the queue overflows.
            while not server.statistics().dropped_by_reason["overflow"]:
                await bus.publish("trades.BTC", b"x" * 4000)
            await trio.testing.wait_all_tasks_blocked()
            [before] = server.statistics().connections
            assert before.queued >= 50
            assert holds(before)
            server.close()  # it never reads, so its queue never drains
            await server.wait_closed()
            stats = server.statistics()
            assert stats.disconnected == {"shutdown": 1}
            assert stats.aborted == 1
            assert stats.dropped_by_reason == {
                "overflow": before.dropped_by_reason["overflow"],
                "closed": before.queued,
            }
            assert (stats.offered, stats.queued) == (before.offered, 0)
            assert stats.offered == stats.sent + stats.dropped


async def test_server_totals_hold_the_invariant_with_clients_connected() -> None:
    with trio.fail_after(GUARD):
        async with serving(queue_size=5) as (server, bus), ws_client(server, "?topics=>") as ws:
            for i in range(3):
                await bus.publish("trades.BTC", b"%d" % i)
            assert [await ws.get_message() for _ in range(3)] == ["0", "1", "2"]
            stats = server.statistics()
            assert (stats.offered, stats.sent, stats.dropped, stats.queued) == (3, 3, 0, 0)
            assert stats.dropped_by_reason == {"overflow": 0, "closed": 0}


# The writer's life as a model: what it holds, what waits, what is written.
# Each step is done, the writer settles (wait_all_tasks_blocked), and the
# client's statistics must equal the model's, the invariant hold, and sent
# equal the frames in the writes the socket finished.
Step = tuple[str, int]
steps = st.lists(
    st.one_of(
        st.tuples(st.just("offer"), st.integers(1, 30)),
        st.tuples(st.just("write"), st.just(0)),
        st.tuples(st.just("close"), st.integers(0, 1)),
    ),
    max_size=30,
)


class _Model:
    def __init__(self, maxsize: int, max_lost: int) -> None:
        self.maxsize, self.max_lost = maxsize, max_lost
        self.queue: list[int] = []
        self.in_hand: list[int] = []
        self.offered = self.sent = self.overflow = 0
        self.closing = self.flush = self.done = False

    def offer(self, frame: int) -> None:
        if self.closing:
            return
        self.offered += 1
        if len(self.queue) == self.maxsize:
            self.overflow += 1
            self.queue.pop(0)
            if self.overflow > self.max_lost:
                self.closing = True
        self.queue.append(frame)

    def settle(self) -> None:
        if self.in_hand or self.done:
            return
        if self.queue and (not self.closing or self.flush):
            self.in_hand, self.queue = self.queue[:WRITE_BATCH], self.queue[WRITE_BATCH:]
        elif self.closing:
            self.done = True


async def _interleaving(ops: list[Step]) -> None:
    stream = _Socket()
    config = BroadcastConfig(ping_interval=math.inf, queue_size=8, max_lost=20)
    client = Client(cast(trio.SocketStream, stream), config, 1, lambda _: None)
    client.open((">",))
    model = _Model(8, 20)
    ids = iter(range(10**6))

    def check() -> None:
        stats = client.statistics()
        assert holds(stats)
        assert stats.offered == model.offered
        assert stats.sent == model.sent == len(frame_ids(b"".join(stream.finished)))
        assert stats.dropped_by_reason["overflow"] == model.overflow
        assert stats.queued == len(model.queue) + len(model.in_hand)
        assert frame_ids(stream.pending) == model.in_hand

    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.run)
        for op, arg in ops:
            if op == "offer":
                for _ in range(arg):
                    frame = next(ids)
                    client.offer(b"<%d>" % frame)
                    model.offer(frame)
            elif op == "write" and stream.pending is not None:
                stream.finish_write()
                model.sent += len(model.in_hand)
                model.in_hand = []
            elif op == "close" and not model.closing:
                client.request_close(1001, "bye", "shutdown", flush=bool(arg))
                model.closing, model.flush = True, bool(arg)
            await trio.testing.wait_all_tasks_blocked()
            model.settle()
            check()
        nursery.cancel_scope.cancel()
    client.discard()
    stats = client.statistics()
    assert holds(stats)
    assert stats.queued == 0
    assert stats.dropped_by_reason == {
        "overflow": model.overflow,
        "closed": len(model.queue) + len(model.in_hand),
    }


@settings(max_examples=150, deadline=None)
@given(ops=steps)
def test_every_frame_is_accounted_for_in_any_interleaving(ops: list[Step]) -> None:
    trio.run(_interleaving, ops)


async def test_a_reply_goes_out_with_the_frames_and_counts_none() -> None:
    with trio.fail_after(GUARD):
        async with serving() as (server, bus), ws_client(server) as ws:
            await ws.send_message(json.dumps({"op": "subscribe", "topics": ["trades"]}))
            assert json.loads(await ws.get_message())["op"] == "subscribed"
            await bus.publish("trades.BTC", b"m")
            assert await ws.get_message() == "m"
            [stats] = server.statistics().connections
            assert (stats.offered, stats.sent) == (1, 1)
            assert holds(stats)
