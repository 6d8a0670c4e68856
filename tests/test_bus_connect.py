"""engine.bus.connect(url): the scheme picks the adapter; options are checked at call time."""

from __future__ import annotations

import pytest
import trio

from engine.bus import MemoryBus, connect


async def test_memory_url_opens_a_memory_bus_closed_at_the_end() -> None:
    async with connect("memory://") as bus:
        assert isinstance(bus, MemoryBus)
        async with bus.subscribe("trades.*", maxsize=4) as subscription:
            await bus.publish("trades.BTC", b"1")
            assert [m.data for m in await subscription.receive_batch(4)] == [b"1"]
    with pytest.raises(trio.ClosedResourceError):
        await bus.publish("trades.BTC", b"2")


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("kafka://host:9092", "must start with one of memory://, redis://"),
        ("memory://bus?mode=streams", "memory:// bus takes no path or options"),
        ("redis://host:6379?mode=streams&bogus=1", "unknown option 'bogus'"),
        ("redis://host:6379?maxlen=lots", "maxlen='lots' is not valid"),
        ("redis://host:6379?group=a&group=b", "option 'group' twice"),
        ("nats://host:4222?ack_wait=soon", "ack_wait='soon' is not valid"),
        ("nats://host:4222?mode=streams", "unknown option 'mode'"),
    ],
)
def test_bad_urls_are_refused_at_call_time(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        connect(url)


@pytest.mark.parametrize(
    "url",
    [
        "kafka://user:hunter2@host",
        "redis://:hunter2@host:6379?bogus=1",
        "nats://hunter2@host:4222?bogus=1",
    ],
)
def test_secrets_never_reach_the_error(url: str) -> None:
    with pytest.raises(ValueError, match="bus url") as refused:
        connect(url)
    assert "hunter2" not in str(refused.value)
    assert "***@host" in str(refused.value)


def test_url_must_be_a_string() -> None:
    with pytest.raises(TypeError, match="url must be a string"):
        connect(b"memory://")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "url",
    [
        "redis://h:6379?mode=streams&claim_idle=inf",
        "nats://h:4222?stream=S&ack_wait=inf",
        "nats://h:4222?stream=S&duplicate_window=inf",
    ],
)
def test_a_setting_sent_to_the_server_as_a_number_must_be_finite(url: str) -> None:
    with pytest.raises(ValueError, match="must be a finite number of seconds"):
        connect(url)


@pytest.mark.parametrize(
    "url", ["redis://:hun/ter2@host:0/0", "rediss://host:0?password=hunter2", "redis://:hunter2@:1"]
)
def test_a_redis_url_refused_never_shows_its_password(url: str) -> None:
    with pytest.raises(ValueError, match="url") as refused:
        connect(url)
    assert "hunter2" not in str(refused.value)
    assert "ter2" not in str(refused.value)
