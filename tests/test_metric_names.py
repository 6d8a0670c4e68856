"""Every family on /metrics follows Prometheus's naming conventions.

Declared fields (``engine.counter_metric``, ``engine.gauge_metric``) become
counters, labelled counters and unit-named gauges; the linter in
``_promlint.py`` holds the whole exposition of a running market service, and
of an ops server watching every kind of engine source, to the conventions.
"""

from __future__ import annotations

import functools
import math

import attrs
import httpx
import pytest
import trio
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

import engine
from engine._metrics import EngineCollector, Families, build
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


def _child(name: str, state: str, **changes: object) -> engine.ChildStatistics:
    fields: dict[str, object] = {
        "name": name,
        "state": engine.ChildState(state),
        "restart": "permanent",
        "ready": True,
        "restarts": 1,
        "failures": 2,
        "stalls": 3,
        "stall_after": 10.0,
        "last_error": "E: x",
        "last_error_at": 4.0,
        "started_at": 5.0,
        "heartbeat_age": 0.5,
    }
    fields.update(changes)
    return engine.ChildStatistics(**fields)  # type: ignore[arg-type]  # built from a dict


def _every_kind_of_snapshot() -> list[tuple[str, object]]:
    """One snapshot of each engine statistics type, with every optional value set and unset."""
    cycle = engine.CycleStatistics(
        name="refresh", interval=60.0, cycle_deadline=30.0, overrun_policy="skip", runs=4,
        successes=3, failures=1, timeouts=1, overruns=2, skipped_ticks=5, late_starts=6,
        running=True, last_started_at=1.0, last_success_at=2.0, last_failure_at=3.0,
        last_error="TooSlowError: x", last_duration=0.25, next_tick_at=7.0,
    )  # fmt: skip
    idle = engine.CycleStatistics(
        name="idle", interval=1.0, cycle_deadline=math.inf, overrun_policy="immediate", runs=0,
        successes=0, failures=0, timeouts=0, overruns=0, skipped_ticks=0, late_starts=0,
        running=False, last_started_at=None, last_success_at=None, last_failure_at=None,
        last_error=None, last_duration=None, next_tick_at=None,
    )  # fmt: skip
    consumers = engine.ConsumerStatistics(
        name="processors", workers=4, on_error="continue", processed=10, errors=2, busy=1,
        processing_seconds_total=1.5, processing_seconds_max=0.5, last_error="ValueError: x",
        last_error_at=9.0,
    )  # fmt: skip
    unwatched = {"stall_after": math.inf, "heartbeat_age": None, "ready": False}
    inner = engine.SupervisorStatistics(
        name="indicators", strategy="one_for_all", max_restarts=1, period=1.0,
        restarts_in_period=2, failed=True, taken_at=100.0,
        children=(_child("ema", "failed", started_at=None, **unwatched),),
    )  # fmt: skip
    root = engine.SupervisorStatistics(
        name="root", strategy="one_for_one", max_restarts=3, period=5.0, restarts_in_period=1,
        failed=False, taken_at=100.0,
        children=(
            _child("feed", "running", attached=(consumers,)),
            _child("watchlist", "backing_off", ready=False, attached=(cycle, idle)),
            _child("scans", "starting", ready=False, attached=(inner,)),
            _child("done", "stopped", **unwatched),
        ),
    )  # fmt: skip
    channel = engine.ChannelStatistics(
        maxsize=10, overflow="drop_oldest", sent=12, delivered=5, dropped=3, depth=4,
        peak_depth=9, senders_waiting=1, receivers_waiting=2, open_send_channels=3,
        open_receive_channels=4,
    )  # fmt: skip
    subscriptions = (
        engine.SubscriptionStatistics(("t.>",), 5, "drop_oldest", 10, 4, 3, 0, 3, 5, False),
        engine.SubscriptionStatistics(("t.a", "u.*"), 2, "disconnect", 7, 2, 0, 3, 2, 2, True),
    )
    bridges = engine.BridgeStatistics(
        thread_calls=1, threads_abandoned=2, threads_abandoned_running=3,
        iterator_threads_abandoned=4, process_calls=5, workers_killed=6, workers_crashed=7,
        batch_ok=8, batch_error=9, batch_timeout=10, batch_crashed=11, batch_cancelled=12,
    )  # fmt: skip
    stall = engine.LoopStall("feed", "x.py:1 in f: g()", ("x.py:1 in f",), 0.5, ongoing=False)
    loop = engine.LoopStatistics(
        threshold=0.1, per_step=True, stalls=2, stall_seconds_total=0.75,
        stall_seconds_max=0.5, last_stall=stall,
    )  # fmt: skip
    batch = engine.BatchStatistics(
        total=10, completed=7, ok=3, error=1, timeout=1, crashed=1, cancelled=1, in_flight=2,
        calls=4, split_chunks=1,
    )  # fmt: skip
    return [
        ("demo", DemoStatistics(7, {"full": 2, "origin": 1}, 3, 1700000000.5, 4)),
        ("root", root),
        ("ticks", channel),
        ("trades", engine.HubStatistics(name="trades", published=11, subscriptions=subscriptions)),
        ("processors", consumers),
        ("refresh", cycle),
        ("", bridges),
        ("", loop),
        ("scan", batch),
        ("pool", engine.ProcessPoolStatistics(workers=2, busy=1, idle_workers=1)),
    ]


class _Snapshots(Collector):
    def collect(self) -> list[Metric]:
        families = Families()
        for name, stats in _every_kind_of_snapshot():
            build(families, name, stats)
        return list(families)


def test_the_exposition_of_every_engine_statistics_type_is_exactly_this() -> None:
    # Every family, type, help text, label and value, in any order of families.
    registry = CollectorRegistry()
    registry.register(_Snapshots())
    text = generate_latest(registry).decode()
    assert sorted(text.splitlines()) == sorted(_EXPOSITION.splitlines())


_EXPOSITION = """\
# HELP engine_demo_received_total Messages read
# TYPE engine_demo_received_total counter
engine_demo_received_total{source="demo"} 7.0
# HELP engine_demo_rejected_total Refused by reason
# TYPE engine_demo_rejected_total counter
engine_demo_rejected_total{reason="full",source="demo"} 2.0
engine_demo_rejected_total{reason="origin",source="demo"} 1.0
# HELP engine_demo_depth Messages waiting
# TYPE engine_demo_depth gauge
engine_demo_depth{source="demo"} 3.0
# HELP engine_demo_last_seen_timestamp_seconds When the last message came, in seconds since the epoch
# TYPE engine_demo_last_seen_timestamp_seconds gauge
engine_demo_last_seen_timestamp_seconds{source="demo"} 1.7000000005e+09
# HELP engine_demo_peers DemoStatistics.peers
# TYPE engine_demo_peers gauge
engine_demo_peers{source="demo"} 4.0
# HELP engine_supervisor_failed 1 once it gave up
# TYPE engine_supervisor_failed gauge
engine_supervisor_failed{supervisor="root"} 0.0
engine_supervisor_failed{supervisor="root/scans/indicators"} 1.0
# HELP engine_supervisor_restarts_in_period Restarts counted against the intensity limit now
# TYPE engine_supervisor_restarts_in_period gauge
engine_supervisor_restarts_in_period{supervisor="root"} 1.0
engine_supervisor_restarts_in_period{supervisor="root/scans/indicators"} 2.0
# HELP engine_supervisor_max_restarts The restart intensity limit
# TYPE engine_supervisor_max_restarts gauge
engine_supervisor_max_restarts{supervisor="root"} 3.0
engine_supervisor_max_restarts{supervisor="root/scans/indicators"} 1.0
# HELP engine_child_restarts_total Starts after the first
# TYPE engine_child_restarts_total counter
engine_child_restarts_total{child="root/feed"} 1.0
engine_child_restarts_total{child="root/watchlist"} 1.0
engine_child_restarts_total{child="root/scans"} 1.0
engine_child_restarts_total{child="root/scans/ema"} 1.0
engine_child_restarts_total{child="root/done"} 1.0
# HELP engine_child_failures_total Runs that raised or stalled
# TYPE engine_child_failures_total counter
engine_child_failures_total{child="root/feed"} 2.0
engine_child_failures_total{child="root/watchlist"} 2.0
engine_child_failures_total{child="root/scans"} 2.0
engine_child_failures_total{child="root/scans/ema"} 2.0
engine_child_failures_total{child="root/done"} 2.0
# HELP engine_child_stalls_total Runs cancelled by the watchdog
# TYPE engine_child_stalls_total counter
engine_child_stalls_total{child="root/feed"} 3.0
engine_child_stalls_total{child="root/watchlist"} 3.0
engine_child_stalls_total{child="root/scans"} 3.0
engine_child_stalls_total{child="root/scans/ema"} 3.0
engine_child_stalls_total{child="root/done"} 3.0
# HELP engine_child_ready 1 when the current run is ready
# TYPE engine_child_ready gauge
engine_child_ready{child="root/feed"} 1.0
engine_child_ready{child="root/watchlist"} 0.0
engine_child_ready{child="root/scans"} 0.0
engine_child_ready{child="root/scans/ema"} 0.0
engine_child_ready{child="root/done"} 0.0
# HELP engine_child_state 1 for the state the child is in
# TYPE engine_child_state gauge
engine_child_state{child="root/feed",state="starting"} 0.0
engine_child_state{child="root/feed",state="running"} 1.0
engine_child_state{child="root/feed",state="backing_off"} 0.0
engine_child_state{child="root/feed",state="stopped"} 0.0
engine_child_state{child="root/feed",state="failed"} 0.0
engine_child_state{child="root/watchlist",state="starting"} 0.0
engine_child_state{child="root/watchlist",state="running"} 0.0
engine_child_state{child="root/watchlist",state="backing_off"} 1.0
engine_child_state{child="root/watchlist",state="stopped"} 0.0
engine_child_state{child="root/watchlist",state="failed"} 0.0
engine_child_state{child="root/scans",state="starting"} 1.0
engine_child_state{child="root/scans",state="running"} 0.0
engine_child_state{child="root/scans",state="backing_off"} 0.0
engine_child_state{child="root/scans",state="stopped"} 0.0
engine_child_state{child="root/scans",state="failed"} 0.0
engine_child_state{child="root/scans/ema",state="starting"} 0.0
engine_child_state{child="root/scans/ema",state="running"} 0.0
engine_child_state{child="root/scans/ema",state="backing_off"} 0.0
engine_child_state{child="root/scans/ema",state="stopped"} 0.0
engine_child_state{child="root/scans/ema",state="failed"} 1.0
engine_child_state{child="root/done",state="starting"} 0.0
engine_child_state{child="root/done",state="running"} 0.0
engine_child_state{child="root/done",state="backing_off"} 0.0
engine_child_state{child="root/done",state="stopped"} 1.0
engine_child_state{child="root/done",state="failed"} 0.0
# HELP engine_child_heartbeat_age_seconds Seconds since the running child last beat
# TYPE engine_child_heartbeat_age_seconds gauge
engine_child_heartbeat_age_seconds{child="root/feed"} 0.5
engine_child_heartbeat_age_seconds{child="root/watchlist"} 0.5
engine_child_heartbeat_age_seconds{child="root/scans"} 0.5
# HELP engine_child_stall_after_seconds Heartbeat limit
# TYPE engine_child_stall_after_seconds gauge
engine_child_stall_after_seconds{child="root/feed"} 10.0
engine_child_stall_after_seconds{child="root/watchlist"} 10.0
engine_child_stall_after_seconds{child="root/scans"} 10.0
# HELP engine_consumer_processed_total Messages handled
# TYPE engine_consumer_processed_total counter
engine_consumer_processed_total{consumer="root/feed/processors"} 10.0
engine_consumer_processed_total{consumer="processors"} 10.0
# HELP engine_consumer_errors_total Messages the handler raised on
# TYPE engine_consumer_errors_total counter
engine_consumer_errors_total{consumer="root/feed/processors"} 2.0
engine_consumer_errors_total{consumer="processors"} 2.0
# HELP engine_consumer_processing_seconds_total Time spent in the handler
# TYPE engine_consumer_processing_seconds_total counter
engine_consumer_processing_seconds_total{consumer="root/feed/processors"} 1.5
engine_consumer_processing_seconds_total{consumer="processors"} 1.5
# HELP engine_consumer_processing_seconds_max Longest single call of the handler
# TYPE engine_consumer_processing_seconds_max gauge
engine_consumer_processing_seconds_max{consumer="root/feed/processors"} 0.5
engine_consumer_processing_seconds_max{consumer="processors"} 0.5
# HELP engine_consumer_busy Workers inside the handler now
# TYPE engine_consumer_busy gauge
engine_consumer_busy{consumer="root/feed/processors"} 1.0
engine_consumer_busy{consumer="processors"} 1.0
# HELP engine_consumer_workers Workers in the group
# TYPE engine_consumer_workers gauge
engine_consumer_workers{consumer="root/feed/processors"} 4.0
engine_consumer_workers{consumer="processors"} 4.0
# HELP engine_cycle_runs_total Runs started
# TYPE engine_cycle_runs_total counter
engine_cycle_runs_total{cycle="root/watchlist/refresh"} 4.0
engine_cycle_runs_total{cycle="root/watchlist/idle"} 0.0
engine_cycle_runs_total{cycle="refresh"} 4.0
# HELP engine_cycle_successes_total Runs that returned
# TYPE engine_cycle_successes_total counter
engine_cycle_successes_total{cycle="root/watchlist/refresh"} 3.0
engine_cycle_successes_total{cycle="root/watchlist/idle"} 0.0
engine_cycle_successes_total{cycle="refresh"} 3.0
# HELP engine_cycle_failures_total Runs that raised or hit the cycle deadline
# TYPE engine_cycle_failures_total counter
engine_cycle_failures_total{cycle="root/watchlist/refresh"} 1.0
engine_cycle_failures_total{cycle="root/watchlist/idle"} 0.0
engine_cycle_failures_total{cycle="refresh"} 1.0
# HELP engine_cycle_timeouts_total Runs cut by the cycle deadline
# TYPE engine_cycle_timeouts_total counter
engine_cycle_timeouts_total{cycle="root/watchlist/refresh"} 1.0
engine_cycle_timeouts_total{cycle="root/watchlist/idle"} 0.0
engine_cycle_timeouts_total{cycle="refresh"} 1.0
# HELP engine_cycle_overruns_total Runs that carried past the next tick
# TYPE engine_cycle_overruns_total counter
engine_cycle_overruns_total{cycle="root/watchlist/refresh"} 2.0
engine_cycle_overruns_total{cycle="root/watchlist/idle"} 0.0
engine_cycle_overruns_total{cycle="refresh"} 2.0
# HELP engine_cycle_skipped_ticks_total Ticks without a run
# TYPE engine_cycle_skipped_ticks_total counter
engine_cycle_skipped_ticks_total{cycle="root/watchlist/refresh"} 5.0
engine_cycle_skipped_ticks_total{cycle="root/watchlist/idle"} 0.0
engine_cycle_skipped_ticks_total{cycle="refresh"} 5.0
# HELP engine_cycle_late_starts_total Runs started off the grid
# TYPE engine_cycle_late_starts_total counter
engine_cycle_late_starts_total{cycle="root/watchlist/refresh"} 6.0
engine_cycle_late_starts_total{cycle="root/watchlist/idle"} 0.0
engine_cycle_late_starts_total{cycle="refresh"} 6.0
# HELP engine_cycle_running 1 while a run is in progress
# TYPE engine_cycle_running gauge
engine_cycle_running{cycle="root/watchlist/refresh"} 1.0
engine_cycle_running{cycle="root/watchlist/idle"} 0.0
engine_cycle_running{cycle="refresh"} 1.0
# HELP engine_cycle_interval_seconds Seconds between ticks
# TYPE engine_cycle_interval_seconds gauge
engine_cycle_interval_seconds{cycle="root/watchlist/refresh"} 60.0
engine_cycle_interval_seconds{cycle="root/watchlist/idle"} 1.0
engine_cycle_interval_seconds{cycle="refresh"} 60.0
# HELP engine_cycle_last_duration_seconds Seconds the latest finished run took
# TYPE engine_cycle_last_duration_seconds gauge
engine_cycle_last_duration_seconds{cycle="root/watchlist/refresh"} 0.25
engine_cycle_last_duration_seconds{cycle="refresh"} 0.25
# HELP engine_channel_sent_total Messages accepted by send
# TYPE engine_channel_sent_total counter
engine_channel_sent_total{channel="ticks"} 12.0
# HELP engine_channel_delivered_total Messages handed to a receiver
# TYPE engine_channel_delivered_total counter
engine_channel_delivered_total{channel="ticks"} 5.0
# HELP engine_channel_dropped_total Messages discarded by the overflow policy
# TYPE engine_channel_dropped_total counter
engine_channel_dropped_total{channel="ticks"} 3.0
# HELP engine_channel_depth Messages buffered now
# TYPE engine_channel_depth gauge
engine_channel_depth{channel="ticks"} 4.0
# HELP engine_channel_peak_depth Highest depth seen
# TYPE engine_channel_peak_depth gauge
engine_channel_peak_depth{channel="ticks"} 9.0
# HELP engine_channel_capacity The buffer's bound
# TYPE engine_channel_capacity gauge
engine_channel_capacity{channel="ticks"} 10.0
# HELP engine_channel_senders_waiting Tasks blocked in send
# TYPE engine_channel_senders_waiting gauge
engine_channel_senders_waiting{channel="ticks"} 1.0
# HELP engine_channel_receivers_waiting Tasks blocked in receive
# TYPE engine_channel_receivers_waiting gauge
engine_channel_receivers_waiting{channel="ticks"} 2.0
# HELP engine_hub_published_total Messages published
# TYPE engine_hub_published_total counter
engine_hub_published_total{hub="trades"} 11.0
# HELP engine_hub_subscriptions Live subscriptions
# TYPE engine_hub_subscriptions gauge
engine_hub_subscriptions{hub="trades"} 2.0
# HELP engine_hub_queued_messages Messages queued in subscriptions
# TYPE engine_hub_queued_messages gauge
engine_hub_queued_messages{hub="trades"} 5.0
# HELP engine_hub_subscription_drops Messages dropped or lost by the live subscriptions
# TYPE engine_hub_subscription_drops gauge
engine_hub_subscription_drops{hub="trades"} 6.0
# HELP engine_hub_disconnected_subscriptions Subscriptions cut off by the disconnect policy
# TYPE engine_hub_disconnected_subscriptions gauge
engine_hub_disconnected_subscriptions{hub="trades"} 1.0
# HELP engine_bridge_calls_total Calls through a bridge
# TYPE engine_bridge_calls_total counter
engine_bridge_calls_total{bridge="thread"} 1.0
engine_bridge_calls_total{bridge="process"} 5.0
# HELP engine_bridge_threads_abandoned_total Thread calls whose caller was cancelled while the thread ran
# TYPE engine_bridge_threads_abandoned_total counter
engine_bridge_threads_abandoned_total 2.0
# HELP engine_bridge_iterator_threads_abandoned_total Blocking-iterator threads that did not stop in time
# TYPE engine_bridge_iterator_threads_abandoned_total counter
engine_bridge_iterator_threads_abandoned_total 4.0
# HELP engine_bridge_workers_killed_total Worker processes killed because their caller was cancelled
# TYPE engine_bridge_workers_killed_total counter
engine_bridge_workers_killed_total 6.0
# HELP engine_bridge_workers_crashed_total Worker processes that died during a call
# TYPE engine_bridge_workers_crashed_total counter
engine_bridge_workers_crashed_total 7.0
# HELP engine_bridge_threads_abandoned_running Abandoned threads still running
# TYPE engine_bridge_threads_abandoned_running gauge
engine_bridge_threads_abandoned_running 3.0
# HELP engine_batch_items_total map_batch items by outcome
# TYPE engine_batch_items_total counter
engine_batch_items_total{status="ok"} 8.0
engine_batch_items_total{status="error"} 9.0
engine_batch_items_total{status="timeout"} 10.0
engine_batch_items_total{status="crashed"} 11.0
engine_batch_items_total{status="cancelled"} 12.0
# HELP engine_loop_stalls_total Event-loop stalls
# TYPE engine_loop_stalls_total counter
engine_loop_stalls_total 2.0
# HELP engine_loop_stall_seconds_total Summed length of the stalls
# TYPE engine_loop_stall_seconds_total counter
engine_loop_stall_seconds_total 0.75
# HELP engine_loop_stall_seconds_max The longest stall
# TYPE engine_loop_stall_seconds_max gauge
engine_loop_stall_seconds_max 0.5
# HELP engine_loop_stall_threshold_seconds What counts as a stall
# TYPE engine_loop_stall_threshold_seconds gauge
engine_loop_stall_threshold_seconds 0.1
# HELP engine_batch_total BatchStatistics.total
# TYPE engine_batch_total gauge
engine_batch_total{source="scan"} 10.0
# HELP engine_batch_completed BatchStatistics.completed
# TYPE engine_batch_completed gauge
engine_batch_completed{source="scan"} 7.0
# HELP engine_batch_ok BatchStatistics.ok
# TYPE engine_batch_ok gauge
engine_batch_ok{source="scan"} 3.0
# HELP engine_batch_error BatchStatistics.error
# TYPE engine_batch_error gauge
engine_batch_error{source="scan"} 1.0
# HELP engine_batch_timeout BatchStatistics.timeout
# TYPE engine_batch_timeout gauge
engine_batch_timeout{source="scan"} 1.0
# HELP engine_batch_crashed BatchStatistics.crashed
# TYPE engine_batch_crashed gauge
engine_batch_crashed{source="scan"} 1.0
# HELP engine_batch_cancelled BatchStatistics.cancelled
# TYPE engine_batch_cancelled gauge
engine_batch_cancelled{source="scan"} 1.0
# HELP engine_batch_in_flight BatchStatistics.in_flight
# TYPE engine_batch_in_flight gauge
engine_batch_in_flight{source="scan"} 2.0
# HELP engine_batch_calls BatchStatistics.calls
# TYPE engine_batch_calls gauge
engine_batch_calls{source="scan"} 4.0
# HELP engine_batch_split_chunks BatchStatistics.split_chunks
# TYPE engine_batch_split_chunks gauge
engine_batch_split_chunks{source="scan"} 1.0
# HELP engine_process_pool_workers ProcessPoolStatistics.workers
# TYPE engine_process_pool_workers gauge
engine_process_pool_workers{source="pool"} 2.0
# HELP engine_process_pool_busy ProcessPoolStatistics.busy
# TYPE engine_process_pool_busy gauge
engine_process_pool_busy{source="pool"} 1.0
# HELP engine_process_pool_idle_workers ProcessPoolStatistics.idle_workers
# TYPE engine_process_pool_idle_workers gauge
engine_process_pool_idle_workers{source="pool"} 1.0
"""  # noqa: E501 -- help texts as served
