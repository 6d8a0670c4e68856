"""The Bus protocol's guarantees, each a test, run on every adapter and mode.

An adapter is done when it passes this file: memory, Redis pub/sub, Redis
Streams, core NATS and NATS JetStream, each opened the one way a service
opens a bus, ``engine.bus.connect(url)``, against a server started from a
PyPI wheel.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import attrs
import pytest
import trio

import engine
from engine.bus import Bus, BusMessage, connect
from tests.fixtures_nats import NatsServer
from tests.fixtures_nats import nats_server as nats_server
from tests.fixtures_redis import RedisServer
from tests.fixtures_redis import redis_server as redis_server

GUARD = 15
KINDS = ("memory", "redis_pubsub", "redis_streams", "nats_core", "jetstream")
AT_LEAST_ONCE = ("redis_streams", "jetstream")
# Adapters that carry msg_id to the subscriber (Redis pub/sub sends the bare payload).
CARRIES_MSG_ID = ("memory", "redis_streams", "nats_core", "jetstream")


@attrs.frozen
class Opened:
    kind: str
    url: str
    base: str  # every topic of the test starts with it (JetStream: the stream's subjects)


@pytest.fixture(params=KINDS)
def opened(
    request: pytest.FixtureRequest, redis_server: RedisServer, nats_server: NatsServer
) -> Opened:
    kind: str = request.param
    tag = uuid.uuid4().hex[:8]
    if kind == "memory":
        return Opened(kind, "memory://", f"t{tag}.")
    if kind == "redis_pubsub":
        return Opened(kind, f"{redis_server.url}?prefix=t{tag}:", "")
    if kind == "redis_streams":
        url = f"{redis_server.url}?mode=streams&stream=t{tag}&claim_idle=0.5"
        return Opened(kind, url, "")
    if kind == "nats_core":
        return Opened(kind, nats_server.url, f"t{tag}.")
    return Opened(kind, f"{nats_server.url}?stream=T{tag}&ack_wait=0.5", f"T{tag}.")


@asynccontextmanager
async def bus_of(opened: Opened) -> AsyncIterator[Bus]:
    async with connect(opened.url) as bus:
        yield bus


async def take(subscription: object, count: int) -> list[BusMessage]:
    """``count`` messages from ``subscription`` (each ``receive_batch`` call waits for some)."""
    got: list[BusMessage] = []
    while len(got) < count:
        got += await subscription.receive_batch(count - len(got))  # type: ignore[attr-defined]
    return got


async def test_star_is_one_token_and_gt_the_rest(opened: Opened) -> None:
    b = opened.base
    with trio.fail_after(GUARD):
        async with (
            bus_of(opened) as bus,
            bus.subscribe(f"{b}trades.*", maxsize=100) as star,
            bus.subscribe(f"{b}trades.>", maxsize=100) as rest,
        ):
            for topic in ("trades.BTC", "trades.BTC.fast", "book.BTC", "trades.ETH"):
                await bus.publish(b + topic, topic.encode())
            await bus.publish(b + "trades.END", b"end")
            star_got = [m.topic for m in await take(star, 3)]
            rest_got = [m.topic for m in await take(rest, 4)]
    assert star_got == [f"{b}trades.BTC", f"{b}trades.ETH", f"{b}trades.END"]
    assert rest_got == [f"{b}trades.BTC", f"{b}trades.BTC.fast", f"{b}trades.ETH", f"{b}trades.END"]


async def test_messages_of_one_topic_arrive_in_order_with_their_fields(opened: Opened) -> None:
    topic = f"{opened.base}trades.BTC"
    with trio.fail_after(GUARD):
        async with bus_of(opened) as bus, bus.subscribe(topic, maxsize=1000) as subscription:
            for i in range(300):
                await bus.publish(topic, b"%d" % i, msg_id=f"id-{i}")
            got = await take(subscription, 300)
            for message in got:
                await message.ack()
    assert [m.data for m in got] == [b"%d" % i for i in range(300)]
    assert {m.topic for m in got} == {topic}
    if opened.kind in CARRIES_MSG_ID:
        assert [m.msg_id for m in got] == [f"id-{i}" for i in range(300)]


async def test_an_unacked_message_comes_again_only_where_at_least_once_is_promised(
    opened: Opened,
) -> None:
    topic = f"{opened.base}orders.X"
    with trio.fail_after(GUARD):
        async with bus_of(opened) as bus, bus.subscribe(topic, maxsize=10) as subscription:
            await bus.publish(topic, b"order", msg_id="order-1")
            [first] = await take(subscription, 1)  # not acked: a crash before the ack
            again: list[BusMessage] = []
            # Well past claim_idle / ack_wait (0.5 s): redelivered by now, if ever.
            with trio.move_on_after(2 if opened.kind in AT_LEAST_ONCE else 1.5):
                again = await take(subscription, 1)
            for message in again:
                await message.ack()
    assert first.data == b"order"
    if opened.kind in AT_LEAST_ONCE:
        assert [(m.msg_id, m.data) for m in again] == [("order-1", b"order")]
    else:
        assert again == []  # at most once: ack is a no-op and nothing comes again


async def test_after_close_publishing_fails_and_subscriptions_end(opened: Opened) -> None:
    topic = f"{opened.base}trades.BTC"
    with trio.fail_after(GUARD):
        async with bus_of(opened) as bus, bus.subscribe(topic, maxsize=10) as subscription:
            await bus.publish(topic, b"1")
            assert [m.data for m in await take(subscription, 1)] == [b"1"]
            await bus.aclose()
            with pytest.raises(trio.ClosedResourceError):
                await bus.publish(topic, b"2")
            with pytest.raises((trio.EndOfChannel, StopAsyncIteration)):
                await subscription.receive_batch(1)  # type: ignore[attr-defined]


async def test_health_and_statistics_say_what_the_bus_is(opened: Opened) -> None:
    with trio.fail_after(GUARD):
        async with bus_of(opened) as bus:
            assert isinstance(bus, engine.HasHealth)
            health = bus.health()
            assert health.ready
            assert health.state in ("open", "connected")
            assert attrs.has(type(bus.statistics()))
            await bus.aclose()
            assert not bus.health().ready
