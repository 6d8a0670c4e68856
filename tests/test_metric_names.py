"""Every family on /metrics follows Prometheus's naming conventions.

Declared fields (``engine.counter_metric``, ``engine.gauge_metric``) become
counters, labelled counters and unit-named gauges; the linter in
``_promlint.py`` holds the whole exposition of a running market service, and
of an ops server watching every kind of engine source, to the conventions.
"""

from __future__ import annotations

import functools

import attrs
import httpx
import pytest
import trio
from prometheus_client import CollectorRegistry, generate_latest

import engine
from engine._metrics import EngineCollector
from services.market._service import MarketConfig, MarketService, serve_market

from ._promlint import lint


@attrs.frozen
class DemoStatistics:
    """A source's snapshot with every kind of declared field."""

    received: int = attrs.field(metadata=engine.counter_metric("Messages read"))
    rejected: dict[str, int] = attrs.field(
        metadata=engine.counter_metric("Refused by reason", label="reason")
    )
    depth: int = attrs.field(metadata=engine.gauge_metric("Messages waiting"))
    last_seen: float | None = attrs.field(
        metadata=engine.gauge_metric(
            "When the last message came, in seconds since the epoch",
            name="last_seen_timestamp_seconds",
        )
    )
    peers: int = 0  # undeclared: a gauge named after the field


@attrs.define
class Demo:
    stats: DemoStatistics

    def statistics(self) -> DemoStatistics:
        return self.stats


async def _handle(item: int) -> None:
    await trio.lowlevel.checkpoint()


def _exposition(**sources: engine.HasStatistics) -> str:
    registry = CollectorRegistry()
    registry.register(EngineCollector(None, sources, None))
    return generate_latest(registry).decode()


async def test_declared_fields_become_counters_labelled_counters_and_named_gauges() -> None:
    stats = DemoStatistics(7, {"full": 2, "origin": 1}, 3, 1700000000.5, 4)
    text = _exposition(demo=Demo(stats))
    assert "# TYPE engine_demo_received_total counter" in text
    assert 'engine_demo_received_total{source="demo"} 7.0' in text
    assert 'engine_demo_rejected_total{reason="full",source="demo"} 2.0' in text
    assert 'engine_demo_rejected_total{reason="origin",source="demo"} 1.0' in text
    assert "# HELP engine_demo_depth Messages waiting" in text
    assert 'engine_demo_last_seen_timestamp_seconds{source="demo"} 1.7000000005e+09' in text
    assert 'engine_demo_peers{source="demo"} 4.0' in text
    assert lint(text) == []


async def test_a_field_with_no_value_yet_is_left_out() -> None:
    text = _exposition(demo=Demo(DemoStatistics(0, {}, 0, None)))
    assert "last_seen" not in text
    assert "engine_demo_rejected_total{" not in text


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: attrs.field(metadata=engine.counter_metric("")), "doc must be a non-empty string"),
        (
            lambda: attrs.field(metadata=engine.counter_metric("x", label="Reason")),
            "label must be snake_case",
        ),
        (
            lambda: attrs.field(metadata=engine.gauge_metric("x", name="lastSeen")),
            "name must be snake_case",
        ),
        (
            lambda: attrs.field(metadata=engine.counter_metric("x", name="sent_total")),
            "must not end in _total",
        ),
    ],
)
def test_bad_declarations_are_refused(call: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()  # type: ignore[operator]


@pytest.mark.parametrize(
    ("exposition", "problem"),
    [
        ("# HELP a_total x\n# TYPE a_total gauge\na_total 1\n", "must not end in _total"),
        ("# HELP a_count x\n# TYPE a_count gauge\na_count 1\n", "_count and _sum"),
        ("# HELP a_ms x\n# TYPE a_ms gauge\na_ms 1\n", "abbreviated units"),
        ("# HELP a_minutes x\n# TYPE a_minutes gauge\na_minutes 1\n", "not base units"),
        ("# HELP a_gauge x\n# TYPE a_gauge gauge\na_gauge 1\n", "type is in the name"),
        ("# HELP a_seen_at x\n# TYPE a_seen_at gauge\na_seen_at 1\n", "point in time"),
        ("# HELP a_age Seconds since\n# TYPE a_age gauge\na_age 1\n", "speaks of seconds"),
        ("# TYPE aB gauge\naB 1\n", "not snake_case"),
    ],
)
def test_the_linter_finds_each_convention_broken(exposition: str, problem: str) -> None:
    assert any(problem in line for line in lint(exposition)), lint(exposition)


def test_the_old_simulator_gauge_would_be_flagged() -> None:
    # The family promtool flagged on the service: a gauge with a counter's suffix.
    old = "# HELP engine_simulator_connections_total x\n"
    old += "# TYPE engine_simulator_connections_total gauge\n"
    old += 'engine_simulator_connections_total{source="simulator"} 1.0\n'
    assert lint(old) == ["engine_simulator_connections_total: a gauge must not end in _total"]


async def test_every_family_of_the_running_service_follows_the_conventions() -> None:
    client = httpx.AsyncClient()  # before the loop is watched: it loads CA certificates
    with trio.fail_after(30):
        async with client, trio.open_nursery() as nursery:
            service: MarketService = await nursery.start(
                serve_market, MarketConfig(port=0, ws_port=0)
            )
            # Let every source have something to count, a trade and a broadcast client.
            while service.feed.statistics().published == 0:  # noqa: ASYNC110 -- real time
                await trio.sleep(0.01)
            text = (await client.get(f"{service.url}/metrics")).text
            nursery.cancel_scope.cancel()
    assert "engine_feed_" in text
    assert "engine_broadcast_" in text
    assert lint(text) == []


async def test_every_engine_source_kind_follows_the_conventions() -> None:
    hub: engine.Hub[int] = engine.Hub()
    send, receive = engine.open_channel[int](4)
    consumers = engine.Consumers(_handle, name="consumers")
    cycle = engine.Cycle(trio.lowlevel.checkpoint, interval=1.0, name="cycle")
    client = httpx.AsyncClient()
    with trio.fail_after(30):
        async with client, trio.open_nursery() as nursery, engine.open_supervisor() as sup:
            await sup.start(cycle.run, name="cycle")
            sources: dict[str, engine.HasStatistics] = {
                "hub": hub,
                "channel": send,
                "consumers": consumers,
                "cycle": cycle,
            }
            serve = functools.partial(engine.serve_ops, sup, port=0, sources=sources)
            ops: engine.OpsServer = await nursery.start(serve)
            await engine.run_batch(abs, [-1, 2], bridge="thread")
            text = (await client.get(f"{ops.url}/metrics")).text
            sup.cancel()
            nursery.cancel_scope.cancel()
    for family in ("engine_hub_", "engine_channel_", "engine_cycle_", "engine_batch_items"):
        assert family in text
    assert lint(text) == []
    await receive.aclose()
