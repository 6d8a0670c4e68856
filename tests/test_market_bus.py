"""The market service on a real broker: Redis and NATS JetStream, started from PyPI wheels."""

from __future__ import annotations

import json

import httpx
import pytest
import trio

from engine.bus import NatsBus, RedisBus
from services.market._service import (
    MarketConfig,
    MarketService,
    RelayService,
    _bus_url,
    serve_market,
    serve_relay,
)
from tests.fixtures_nats import NatsServer
from tests.fixtures_nats import nats_server as nats_server
from tests.fixtures_redis import RedisServer
from tests.fixtures_redis import fresh_redis_server as fresh_redis_server
from tests.test_market_e2e import ws_client

GUARD = 30


async def first_trade(ws_url: str) -> dict[str, object]:
    async with ws_client(f"{ws_url}?topics=trades") as ws:
        message: dict[str, object] = json.loads(await ws.get_message())
        return message


async def ready_status(http: httpx.AsyncClient, url: str, wanted: int) -> httpx.Response:
    """Poll /ready, as a probe does, until it answers ``wanted``."""
    while (response := await http.get(f"{url}/ready")).status_code != wanted:  # noqa: ASYNC110
        await trio.sleep(0.05)
    return response


async def test_on_redis_the_service_streams_through_the_broker_and_ready_follows_it(
    fresh_redis_server: RedisServer,
) -> None:
    config = MarketConfig(port=0, ws_port=0, bus=fresh_redis_server.url)
    with trio.fail_after(GUARD):
        async with httpx.AsyncClient() as http, trio.open_nursery() as nursery:
            service: MarketService = await nursery.start(serve_market, config)
            assert isinstance(service.bus, RedisBus)
            trade = await first_trade(service.ws_url)
            assert trade["type"] == "trade"
            health = (await http.get(f"{service.url}/health")).json()
            assert health["sources"]["bus"] == {"state": "connected", "ready": True}
            assert health["sources"]["broadcast"]["state"] == "serving"
            await ready_status(http, service.url, 200)

            fresh_redis_server.kill()  # SIGKILL: the broker is gone
            down = await ready_status(http, service.url, 503)
            assert "source 'bus' is not ready: reconnecting" in down.json()["reasons"]
            assert (await http.get(f"{service.url}/health")).status_code == 200  # alive

            fresh_redis_server.restart()  # same port
            await ready_status(http, service.url, 200)
            assert (await first_trade(service.ws_url))["type"] == "trade"  # flowing again
            stats = service.bus.statistics()
            assert stats.reconnects >= 1
            nursery.cancel_scope.cancel()


async def test_on_jetstream_each_event_is_stored_once_with_its_content_id(
    nats_server: NatsServer,
) -> None:
    url = f"{nats_server.url}?stream=MARKET"  # the service adds its topics as the subjects
    config = MarketConfig(port=0, ws_port=0, bus=url)
    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery:
            service: MarketService = await nursery.start(serve_market, config)
            assert isinstance(service.bus, NatsBus)
            assert service.bus.at_least_once
            assert (await first_trade(service.ws_url))["type"] == "trade"
            async with service.bus.subscribe("trades.>", maxsize=100) as trades:
                batch = await trades.receive_batch(10)
                for message in batch:
                    await message.ack()
            stats = service.bus.statistics()
            nursery.cancel_scope.cancel()
    assert all(m.msg_id is not None and m.msg_id.startswith(m.topic + ":") for m in batch)
    assert len({m.msg_id for m in batch}) == len(batch)
    assert stats.published > 0
    assert service.feed.statistics().malformed == 0  # every topic is in the stream


async def test_a_broadcast_role_instance_relays_what_the_whole_service_publishes(
    fresh_redis_server: RedisServer,
) -> None:
    whole = MarketConfig(port=0, ws_port=0, bus=fresh_redis_server.url)
    relay_config = MarketConfig(port=0, ws_port=0, bus=fresh_redis_server.url, role="broadcast")
    with trio.fail_after(GUARD):
        async with httpx.AsyncClient() as http, trio.open_nursery() as nursery:
            relay: RelayService = await nursery.start(serve_relay, relay_config)
            service: MarketService = await nursery.start(serve_market, whole)
            trade = await first_trade(relay.ws_url)  # published by the other instance
            assert trade["type"] == "trade"
            health = (await http.get(f"{relay.url}/health")).json()
            assert set(health["sources"]) == {"bus", "broadcast"}
            status = (await http.get(f"{relay.url}/status")).json()
            assert [c["name"] for c in status["supervisor"]["children"]] == ["broadcast"]
            assert service.feed.statistics().published > 0
            nursery.cancel_scope.cancel()


def test_the_broadcast_role_needs_a_shared_bus() -> None:
    with pytest.raises(ValueError, match="role 'broadcast' relays from a shared bus"):
        MarketConfig(role="broadcast")
    with pytest.raises(ValueError, match="role must be one of all, broadcast"):
        MarketConfig(role="ingest")


async def test_relays_on_jetstream_each_get_every_message(nats_server: NatsServer) -> None:
    url = f"{nats_server.url}?stream=MARKET"
    relay_config = MarketConfig(port=0, ws_port=0, bus=url, role="broadcast")
    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery:
            first: RelayService = await nursery.start(serve_relay, relay_config)
            second: RelayService = await nursery.start(serve_relay, relay_config)
            await nursery.start(serve_market, MarketConfig(port=0, ws_port=0, bus=url))
            for relay in (first, second):
                assert isinstance(relay.bus, NatsBus)
                assert not relay.bus.at_least_once  # core NATS: each gets all
                assert (await first_trade(relay.ws_url))["type"] == "trade"
            nursery.cancel_scope.cancel()


def test_a_relay_never_shares_a_consumer_group_with_the_other_relays() -> None:
    assert _bus_url("nats://h:4222?stream=M&ack_wait=2", "broadcast") == "nats://h:4222"
    relay = _bus_url("redis://:pw@h:6379?mode=streams", "broadcast")
    assert relay.startswith("redis://:pw@h:6379?mode=streams&group=relay-")
    named = "redis://h:6379?mode=streams&group=mine"
    assert _bus_url(named, "broadcast") == named
    for unchanged in ("memory://", "redis://h:6379/1", "nats://h:4222"):
        assert _bus_url(unchanged, "broadcast") == _bus_url(unchanged) == unchanged
