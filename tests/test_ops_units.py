"""The rules behind the probes, the metrics collector and the log formatters, without a server."""

from __future__ import annotations

import io
import json
import logging
import math
from collections.abc import Iterator

import attrs
import pytest
import trio
import trio.lowlevel
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

import engine
from engine._counters import Tally, metric_source
from engine._metrics import _BUILDERS, EngineCollector, Families, build, builds
from engine._periodic import CycleStatistics
from engine._probes import Kind, Problem, liveness, readiness, to_jsonable, verdict_body, warnings


def child(name: str, state: str = "running", **changes: object) -> engine.ChildStatistics:
    fields: dict[str, object] = {
        "name": name,
        "state": engine.ChildState(state),
        "restart": "permanent",
        "ready": state == "running",
        "restarts": 0,
        "failures": 0,
        "stalls": 0,
        "stall_after": math.inf,
        "last_error": None,
        "last_error_at": None,
        "started_at": 0.0 if state in ("starting", "running") else None,
        "heartbeat_age": 0.5 if state in ("starting", "running") else None,
    }
    fields.update(changes)
    return engine.ChildStatistics(**fields)  # type: ignore[arg-type]  # built from a dict


def tree(*children: engine.ChildStatistics, failed: bool = False) -> engine.SupervisorStatistics:
    return engine.SupervisorStatistics(
        name="root",
        strategy="one_for_one",
        max_restarts=3,
        period=5.0,
        restarts_in_period=0,
        failed=failed,
        taken_at=100.0,
        children=children,
    )


def kinds(problems: list[Problem]) -> list[tuple[str, str | None]]:
    return [(p.kind.value, p.subject) for p in problems]


def test_healthy_tree_has_no_problems() -> None:
    stats = tree(child("feed", stall_after=10.0), child("done", "stopped"))
    assert liveness(stats) == []
    assert readiness(stats, stopping=None) == []
    assert liveness(None) == readiness(None, stopping=None) == []


def test_liveness_rules() -> None:
    stats = tree(
        child("stuck", stall_after=2.0, heartbeat_age=3.5),
        child("beating", stall_after=2.0, heartbeat_age=1.0),
        child("dead", "failed", last_error="OSError: refused"),
        child("oneoff", "failed", restart="temporary", last_error="ValueError: x"),
        child("waiting", "backing_off"),
        failed=True,
    )
    problems = liveness(stats)
    assert kinds(problems) == [
        ("supervisor_failed", "root"),
        ("child_stalled", "root/stuck"),
        ("child_failed", "root/dead"),
    ]
    stalled = problems[1]
    assert (stalled.seconds, stalled.limit) == (3.5, 2.0)
    assert stalled.message == (
        "child 'root/stuck' stalled: no heartbeat for 3.50 s (limit 2 s); "
        "its watchdog is cancelling it"
    )
    assert problems[2].error == "OSError: refused"


def cycle(**changes: object) -> CycleStatistics:
    fields: dict[str, object] = {
        "name": "watchlist",
        "interval": 5.0,
        "cycle_deadline": 5.0,
        "overrun_policy": "skip",
        "runs": 3,
        "successes": 2,
        "failures": 1,
        "timeouts": 1,
        "overruns": 0,
        "skipped_ticks": 0,
        "late_starts": 0,
        "running": False,
        "last_started_at": 10.0,
        "last_success_at": 5.0,
        "last_failure_at": 15.0,
        "last_error": "TooSlowError: cycle deadline of 5 s expired",
        "last_duration": 5.0,
        "next_tick_at": 20.0,
    }
    fields.update(changes)
    return CycleStatistics(**fields)  # type: ignore[arg-type]  # built from a dict


def test_a_failing_cycle_is_a_warning_on_health_not_a_failure() -> None:
    stats = tree(
        child("watchlist", attached=(cycle(),)),
        child("ticker", attached=(cycle(name="ticker", last_failure_at=None, failures=0),)),
    )
    assert liveness(stats) == []
    (warning,) = warnings(stats)
    assert (warning.kind, warning.subject) == (Kind.CYCLE_FAILING, "root/watchlist")
    assert warning.message == (
        "cycle 'watchlist' of child 'root/watchlist': its latest run failed "
        "(TooSlowError: cycle deadline of 5 s expired); 1 of 3 runs failed"
    )
    # A later success clears it.
    recovered = tree(child("watchlist", attached=(cycle(last_success_at=20.0),)))
    assert warnings(recovered) == []
    assert warnings(None) == []


def test_readiness_adds_children_not_ready_and_stopping() -> None:
    stats = tree(
        child("feed", "starting"),
        child("refresher", "backing_off", last_error="TimeoutError: slow"),
        child("oneoff", "failed", restart="transient", last_error="ValueError: x"),
        child("ok"),
    )
    problems = readiness(stats, stopping="received SIGTERM")
    assert kinds(problems) == [
        ("stopping", None),
        ("not_ready", "root/feed"),
        ("not_ready", "root/refresher"),
    ]
    assert problems[0].message == "stopping: received SIGTERM"
    assert (
        problems[2].message
        == "child 'root/refresher' is restarting (last error: TimeoutError: slow)"
    )


def test_nested_supervisors_are_judged_with_their_paths() -> None:
    inner = engine.SupervisorStatistics(
        name="indicators",
        strategy="one_for_all",
        max_restarts=1,
        period=1.0,
        restarts_in_period=2,
        failed=True,
        taken_at=100.0,
        children=(child("ema", "failed", last_error="KeyError: 'x'"),),
    )
    stats = tree(child("scans", attached=(inner,)))
    assert kinds(liveness(stats)) == [
        ("supervisor_failed", "root/scans/indicators"),
        ("child_failed", "root/scans/ema"),
    ]


def test_verdict_body_and_json_conversion() -> None:
    status, body = verdict_body([], loop=None)
    assert (status, json.loads(body)) == (
        200,
        {"status": "ok", "reasons": [], "problems": [], "loop": None},
    )
    status, body = verdict_body(liveness(tree(failed=True)))
    decoded = json.loads(body)
    assert status == 503
    assert decoded["status"] == "failing"
    assert decoded["problems"][0]["kind"] == Kind.SUPERVISOR_FAILED.value
    converted = to_jsonable(tree(child("feed")))
    assert isinstance(converted, dict)
    feed = converted["children"][0]
    assert (feed["type"], feed["state"], feed["stall_after"]) == (
        "ChildStatistics",
        "running",
        None,
    )
    assert to_jsonable({"x": (1.5, math.nan, {1, 2})}) == {"x": [1.5, None, "{1, 2}"]}


@attrs.frozen
class PoolStatistics:
    name: str
    busy: int
    limit: float
    healthy: bool


class Source:
    def __init__(self, stats: object) -> None:
        self.stats = stats

    def statistics(self) -> object:
        return self.stats


def scrape(registry: CollectorRegistry) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(generate_latest(registry).decode())
        for s in family.samples
    }


async def test_collector_builds_from_fresh_snapshots_and_falls_back_for_new_types() -> None:
    cycle = engine.CycleStatistics(
        name="refresh", interval=60.0, cycle_deadline=math.inf, overrun_policy="skip", runs=4,
        successes=3, failures=1, timeouts=1, overruns=2, skipped_ticks=2, late_starts=0,
        running=False, last_started_at=1.0, last_success_at=2.0, last_failure_at=3.0,
        last_error="TooSlowError: x", last_duration=0.25, next_tick_at=None,
    )  # fmt: skip
    stats = tree(child("watchlist", stall_after=30.0, restarts=2, attached=(cycle,)))
    pool = Source(PoolStatistics("pool", busy=3, limit=math.inf, healthy=True))
    registry = CollectorRegistry()
    registry.register(EngineCollector(Source(stats), {"pool": pool}, None))
    page = scrape(registry)

    assert page[("engine_child_restarts_total", frozenset({("child", "root/watchlist")}))] == 2
    assert (
        page[("engine_child_stall_after_seconds", frozenset({("child", "root/watchlist")}))] == 30
    )
    label = frozenset({("cycle", "root/watchlist/refresh")})
    assert page[("engine_cycle_overruns_total", label)] == 2
    assert page[("engine_cycle_last_duration_seconds", label)] == 0.25
    # No builder for PoolStatistics yet: its finite numbers are still gauges.
    assert page[("engine_pool_busy", frozenset({("source", "pool")}))] == 3
    assert page[("engine_pool_healthy", frozenset({("source", "pool")}))] == 1
    assert not any(name == "engine_pool_limit" for name, _ in page)

    # A builder makes it a first-class citizen, and scrapes see fresh values.
    @builds(PoolStatistics)
    def _pool(families: Families, name: str, stats: PoolStatistics) -> None:
        families.counter("engine_pool_jobs", "Jobs run", {"pool": name}, stats.busy * 10)

    pool.stats = PoolStatistics("pool", busy=4, limit=1.0, healthy=True)
    try:
        page = scrape(registry)
    finally:
        del _BUILDERS[PoolStatistics]
    assert page[("engine_pool_jobs_total", frozenset({("pool", "pool")}))] == 40
    assert ("engine_pool_busy", frozenset({("source", "pool")})) not in page


async def test_collector_reports_channels_hubs_and_the_loop() -> None:
    send, receive = engine.open_channel[int](4, overflow="drop_newest")
    for i in range(6):
        send.send_nowait(i)
    hub = engine.Hub[int](name="trades")
    registry = CollectorRegistry()
    async with engine.open_loop_watch() as watch, hub.subscribe("t.>", maxsize=1) as _:
        registry.register(EngineCollector(None, {"ticks": send, "trades": hub}, watch))
        hub.publish_nowait("t.a", 1)
        hub.publish_nowait("t.b", 2)
        page = scrape(registry)
    await receive.aclose()
    await send.aclose()
    ticks = frozenset({("channel", "ticks")})
    assert page[("engine_channel_sent_total", ticks)] == 6
    assert page[("engine_channel_dropped_total", ticks)] == 2
    assert page[("engine_channel_depth", ticks)] == 4
    trades = frozenset({("hub", "trades")})
    assert page[("engine_hub_published_total", trades)] == 2
    assert page[("engine_hub_subscriptions", trades)] == 1
    assert page[("engine_hub_subscription_drops", trades)] == 1
    assert page[("engine_loop_stall_threshold_seconds", frozenset())] == 0.1
    assert page[("engine_loop_stalls_total", frozenset())] == 0


@pytest.fixture
def log_stream() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    root = logging.getLogger()
    level = root.level
    handler = engine.configure_logging("INFO", stream=stream)
    yield stream
    root.removeHandler(handler)
    root.setLevel(level)


def test_text_logs_carry_component_and_context_and_no_secrets(log_stream: io.StringIO) -> None:
    log = logging.getLogger("engine.supervisor")
    log.warning(
        "connecting to %s",
        "redis://feed:hunter2@cache:6379/0",
        extra={
            "child": "feed",
            "restarts": 2,
            "api_key": "AKIA-SECRET",
            "Authorization": "Bearer x",
        },
    )
    line = log_stream.getvalue()
    assert (
        " WARNING engine.supervisor [child=feed restarts=2 api_key=*** Authorization=***]: " in line
    )
    assert line.rstrip().endswith("connecting to redis://feed:***@cache:6379/0")
    assert "hunter2" not in line
    assert "AKIA" not in line


def test_json_logs_are_one_object_per_line(log_stream: io.StringIO) -> None:
    engine.configure_logging("WARNING", json=True, stream=log_stream)  # replaces, not adds
    assert sum(1 for h in logging.getLogger().handlers if h.get_name() == "engine") == 1
    log = logging.getLogger("engine.loop")
    log.info("not shown")
    try:
        raise RuntimeError("boom at https://u:pw@example.com")
    except RuntimeError:
        log.exception("stalled", extra={"task": "feed", "password": "pw"})
    (line,) = log_stream.getvalue().splitlines()[-1:]
    entry = json.loads(line)
    assert (entry["level"], entry["logger"], entry["message"]) == (
        "ERROR",
        "engine.loop",
        "stalled",
    )
    assert (entry["task"], entry["password"]) == ("feed", "***")
    assert "https://u:***@example.com" in entry["exception"]
    assert "not shown" not in log_stream.getvalue()


def test_configure_logging_rejects_unknown_levels() -> None:
    with pytest.raises(ValueError, match="level must be one of"):
        engine.configure_logging("LOUD")


async def test_loop_statistics_are_plain_values() -> None:
    async with engine.open_loop_watch(threshold=0.2, per_step=True) as watch:
        await trio.lowlevel.checkpoint()
        stats = watch.statistics()
    assert stats == engine.LoopStatistics(
        threshold=0.2,
        per_step=True,
        stalls=0,
        stall_seconds_total=0.0,
        stall_seconds_max=0.0,
        last_stall=None,
    )


# -- statistics declared once: engine.Tally and engine.metric_source ---------


@metric_source(label="queue")
@attrs.frozen
class QueueStatistics:
    """The module docstring's example of ``engine/_counters.py``."""

    name: str
    maxsize: int = attrs.field(metadata=engine.gauge_metric("The bound", name="capacity"))
    sent: int = attrs.field(default=0, metadata=engine.counter_metric("Messages accepted"))
    by_kind: dict[str, int] = attrs.field(
        factory=dict, metadata=engine.counter_metric("Messages by kind", label="kind")
    )
    last_error: str | None = None


class _QueueTally(Tally[QueueStatistics]):
    """The counters behind QueueStatistics."""


class Queue:
    def __init__(self, name: str, maxsize: int) -> None:
        self.name, self.maxsize = name, maxsize
        self._tally = _QueueTally()

    def put(self, kind: str) -> None:
        self._tally.sent += 1
        self._tally.by_kind[kind] = self._tally.by_kind.get(kind, 0) + 1

    def statistics(self) -> QueueStatistics:
        return self._tally.snapshot(name=self.name, maxsize=self.maxsize)


def test_a_tally_counts_the_fields_with_a_default_and_snapshots_the_class() -> None:
    queue = Queue("jobs", 8)
    assert queue.statistics() == QueueStatistics(name="jobs", maxsize=8)
    queue.put("a")
    queue.put("a")
    first = queue.statistics()
    queue.put("b")
    assert first == QueueStatistics("jobs", 8, sent=2, by_kind={"a": 2})  # its own mapping
    assert queue.statistics() == QueueStatistics("jobs", 8, sent=3, by_kind={"a": 2, "b": 1})
    assert vars(_QueueTally)["__slots__"] == ("sent", "by_kind", "last_error")
    assert _QueueTally().by_kind is not _QueueTally().by_kind
    assert repr(queue._tally) == "_QueueTally(sent=3, by_kind={'a': 2, 'b': 1}, last_error=None)"


def test_a_tally_refuses_misspelt_and_missing_fields() -> None:
    tally = _QueueTally()
    with pytest.raises(AttributeError):
        tally.sentt += 1
    with pytest.raises(AttributeError):
        tally.sentt = 1
    with pytest.raises(TypeError, match="maxsize"):
        tally.snapshot(name="jobs")
    assert tally.snapshot(name="jobs", maxsize=1, sent=5).sent == 5  # given wins
    with pytest.raises(TypeError, match="subclass Tally"):
        Tally()


def test_a_tally_subclass_may_add_slots_and_compute_fields() -> None:
    class Buffered(Tally[QueueStatistics]):
        __slots__ = ("items", "maxsize")

        def __init__(self) -> None:
            super().__init__()
            self.items: list[str] = []
            self.maxsize = 4

        @property
        def sent(self) -> int:
            return len(self.items)

    tally = Buffered()
    tally.items.append("x")
    assert vars(Buffered)["__slots__"] == ("items", "maxsize", "by_kind", "last_error")
    assert tally.snapshot(name="b") == QueueStatistics("b", 4, sent=1)


def test_a_tally_needs_an_attrs_class_and_plain_defaults() -> None:
    with pytest.raises(TypeError, match="attrs statistics class"):

        class _NotAttrs(Tally[int]):
            pass

    @attrs.frozen
    class SelfMade:
        size: int = attrs.field(default=attrs.Factory(lambda self: 1, takes_self=True))

    with pytest.raises(TypeError, match="Factory taking self"):

        class _SelfMadeTally(Tally[SelfMade]):
            pass


async def test_a_metric_source_exports_its_declared_fields_under_its_label() -> None:
    queue = Queue("jobs", 8)
    queue.put("a")
    registry = CollectorRegistry()
    registry.register(EngineCollector(None, {"jobs": queue}, None))
    page = {
        (name, labels): value
        for (name, labels), value in scrape(registry).items()
        if name.startswith("engine_queue")
    }
    jobs = frozenset({("queue", "jobs")})
    assert page == {
        ("engine_queue_capacity", jobs): 8,
        ("engine_queue_sent_total", jobs): 1,
        ("engine_queue_by_kind_total", jobs | {("kind", "a")}): 1,
    }

    @metric_source(label=None)
    @attrs.frozen
    class RunWideStatistics:
        calls: int = attrs.field(metadata=engine.counter_metric("Calls"))
        workers: int = 3  # undeclared: not exported

    families = Families()
    build(families, "ignored", RunWideStatistics(calls=2))
    (family,) = families
    assert [(s.name, s.labels, s.value) for s in family.samples] == [
        ("engine_run_wide_calls_total", {}, 2)
    ]


def test_bad_metric_sources_are_refused() -> None:
    with pytest.raises(ValueError, match="label must be snake_case"):
        metric_source(label="Queue")
    with pytest.raises(TypeError, match="attrs class"):
        metric_source(label="x")(Queue)


async def test_fresh_components_report_their_statistics_class_defaults() -> None:
    cycle = engine.Cycle(trio.lowlevel.checkpoint, interval=2.0, name="c")
    assert cycle.statistics() == engine.CycleStatistics("c", 2.0, 2.0, "skip")
    group = engine.Consumers(trio.sleep, workers=2, name="g")
    assert group.statistics() == engine.ConsumerStatistics("g", 2, "continue")
    send, receive = engine.open_channel[int](3)
    assert send.statistics() == engine.ChannelStatistics(
        3, "block", open_send_channels=1, open_receive_channels=1
    )
    assert engine.bridge_statistics() == engine.BridgeStatistics()
    await send.aclose()
    await receive.aclose()


def test_a_tally_snapshots_a_private_field_by_its_init_name() -> None:
    @attrs.frozen
    class S:
        name: str
        _hidden: int = 0

    class _T(Tally[S]):
        """Counters."""

    tally = _T()
    tally._hidden = 3
    assert tally.snapshot(name="x") == S(name="x", hidden=3)


def test_a_tally_takes_one_slot_given_as_a_string() -> None:
    @attrs.frozen
    class S:
        sent: int = 0

    class _T(Tally[S]):
        __slots__ = "extra"

    tally = _T()
    tally.extra = 1
    assert not hasattr(tally, "e")
    assert tally.snapshot() == S(sent=0)


def test_a_subclass_of_a_tally_still_refuses_a_misspelt_counter() -> None:
    @attrs.frozen
    class S:
        sent: int = 0

    class _T(Tally[S]):
        """Counters."""

    class _U(_T):
        """More behaviour, same counters."""

    tally = _U()
    tally.sent += 1
    with pytest.raises(AttributeError):
        tally.snet = 1
    assert tally.snapshot() == S(sent=1)
