"""Prometheus metrics built from fresh statistics snapshots at scrape time.

:class:`EngineCollector` is a ``prometheus_client`` custom collector: it
holds no counters of its own. Each scrape takes ``statistics()`` of the
supervisor tree, of every registered source and of the bridges, and turns
each snapshot into samples through a builder chosen by the snapshot's type.
A new statistics type needs one builder decorated with ``@builds(Type)``,
or none: the fields of any attrs snapshot are exported by the generic
builder, as declared with :func:`counter_metric` and :func:`gauge_metric`
(counters, labelled counters, named units), and undeclared numeric fields as
gauges named ``engine_<type>_<field>``, so nothing is invisible.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Literal, Protocol, TypeVar

import attrs
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ._bridgestats import BridgeStatistics, bridge_statistics
from ._channels import ChannelStatistics
from ._consumers import ConsumerStatistics
from ._hub import HubStatistics
from ._loopwatch import LoopStatistics, LoopWatch
from ._periodic import CycleStatistics
from ._statistics import ChildState, SupervisorStatistics


class HasStatistics(Protocol):
    """Anything that can be observed: it has a ``statistics()`` snapshot."""

    def statistics(self) -> object: ...


S = TypeVar("S")

_METRIC = "engine.metric"


@attrs.frozen
class MetricSpec:
    """How one field of a statistics snapshot is exported (private: see :func:`counter_metric`)."""

    kind: Literal["counter", "gauge"]
    doc: str
    label: str | None
    name: str | None


def _metric(spec: MetricSpec) -> dict[str, MetricSpec]:
    if not isinstance(spec.doc, str) or not spec.doc:
        raise ValueError(f"doc must be a non-empty string, got {spec.doc!r}")
    for what, value in (("label", spec.label), ("name", spec.name)):
        if value is not None and not _SNAKE.fullmatch(value):
            raise ValueError(f"{what} must be snake_case, got {value!r}")
    return {_METRIC: spec}


def counter_metric(
    doc: str, *, label: str | None = None, name: str | None = None
) -> dict[str, MetricSpec]:
    """Field metadata that exports a field of a statistics snapshot as a counter.

    Use it for a count that only grows over the life of its source::

        @attrs.frozen
        class FeedStatistics:
            received: int = attrs.field(metadata=engine.counter_metric("Messages read"))
            rejected: dict[str, int] = attrs.field(
                metadata=engine.counter_metric("Refused, by reason", label="reason")
            )

    The family is ``engine_<type>_<name>_total``, where ``<type>`` is the
    snapshot's class name without ``Statistics``, in snake case, and each
    sample carries the source's name as label ``source``. A field holding a
    mapping of counts is one labelled family: each key is the value of
    ``label``. A field whose value is ``None`` is left out.

    Args:
        doc: the family's help text.
        label: for a mapping field, the label its keys go under.
        name: the family name's last part, if not the field's name (to name
            a unit: ``name="read_bytes"``). Never ends in ``_total``: the
            exposition adds it.

    Returns:
        The ``metadata=`` of an :func:`attrs.field`.

    Raises:
        ValueError: an empty doc, or a label or name that is not snake_case.
    """
    if name is not None and name.endswith("_total"):
        raise ValueError(f"name must not end in _total (the exposition adds it), got {name!r}")
    return _metric(MetricSpec("counter", doc, label, name))


def gauge_metric(
    doc: str, *, label: str | None = None, name: str | None = None
) -> dict[str, MetricSpec]:
    """Field metadata that exports a field of a statistics snapshot as a gauge.

    The same as :func:`counter_metric`, for a value that goes up and down (a
    depth, a state, a point in time: ``name="last_update_timestamp_seconds"``).
    Undeclared numeric fields are gauges too; declare one to give it help
    text, a unit in its name, or a label for a mapping.

    Raises:
        ValueError: an empty doc, or a label or name that is not snake_case.
    """
    return _metric(MetricSpec("gauge", doc, label, name))


class Families:
    """Metric families of one scrape, created on first use, in first-use order."""

    def __init__(self) -> None:
        self._families: dict[str, CounterMetricFamily | GaugeMetricFamily] = {}

    def counter(self, name: str, doc: str, labels: Mapping[str, str], value: float) -> None:
        """Add a sample of counter ``name`` (without ``_total``; the exposition adds it)."""
        family = self._families.get(name)
        if family is None:
            family = CounterMetricFamily(name, doc, labels=list(labels))
            self._families[name] = family
        family.add_metric(list(labels.values()), value)

    def gauge(self, name: str, doc: str, labels: Mapping[str, str], value: float) -> None:
        """Add a sample of gauge ``name``."""
        family = self._families.get(name)
        if family is None:
            family = GaugeMetricFamily(name, doc, labels=list(labels))
            self._families[name] = family
        family.add_metric(list(labels.values()), value)

    def __iter__(self) -> Iterator[Metric]:
        return iter(self._families.values())


Builder = Callable[[Families, str, Any], None]
_BUILDERS: dict[type, Builder] = {}


def builds(kind: type[S]) -> Callable[[Callable[[Families, str, S], None]], Builder]:
    """Register the builder of one statistics type: ``builder(families, name, stats)``."""

    def register(builder: Callable[[Families, str, S], None]) -> Builder:
        _BUILDERS[kind] = builder
        return builder

    return register


def build(families: Families, name: str, stats: object) -> None:
    """Add the samples of one snapshot, found by its type, to ``families``."""
    _BUILDERS.get(type(stats), _generic)(families, name, stats)


class EngineCollector(Collector):
    """The engine's custom collector for one ops server's registry.

    Args:
        supervisor: the root of the supervision tree, or ``None``.
        sources: more things to observe, by the name used as their label.
        watch: the loop-stall detector, or ``None``.
    """

    def __init__(
        self,
        supervisor: HasStatistics | None,
        sources: Mapping[str, HasStatistics],
        watch: LoopWatch | None,
    ) -> None:
        self._supervisor = supervisor
        self._sources = dict(sources)
        self._watch = watch

    def collect(self) -> Iterable[Metric]:
        """Fresh samples of everything observed (call it in the trio thread)."""
        families = Families()
        if self._supervisor is not None:
            stats = self._supervisor.statistics()
            build(families, getattr(stats, "name", "supervisor"), stats)
        for name, source in self._sources.items():
            build(families, name, source.statistics())
        build(families, "", bridge_statistics())
        if self._watch is not None:
            build(families, "", self._watch.statistics())
        return families


# -- the supervision tree ---------------------------------------------------


@builds(SupervisorStatistics)
def _tree(families: Families, name: str, stats: SupervisorStatistics) -> None:
    _supervisor(families, stats, stats.name, stats.name)


def _supervisor(families: Families, sup: SupervisorStatistics, path: str, prefix: str) -> None:
    label = {"supervisor": path}
    families.gauge("engine_supervisor_failed", "1 once it gave up", label, sup.failed)
    families.gauge(
        "engine_supervisor_restarts_in_period",
        "Restarts counted against the intensity limit now",
        label,
        sup.restarts_in_period,
    )
    families.gauge(
        "engine_supervisor_max_restarts", "The restart intensity limit", label, sup.max_restarts
    )
    for child in sup.children:
        child_path = f"{prefix}/{child.name}"
        _child(families, child_path, child)
        for inner in child.attached:
            if isinstance(inner, SupervisorStatistics):
                _supervisor(families, inner, f"{child_path}/{inner.name}", child_path)
            else:
                build(families, f"{child_path}/{getattr(inner, 'name', '')}".rstrip("/"), inner)


def _child(families: Families, path: str, child: Any) -> None:
    label = {"child": path}
    families.counter("engine_child_restarts", "Starts after the first", label, child.restarts)
    families.counter("engine_child_failures", "Runs that raised or stalled", label, child.failures)
    families.counter("engine_child_stalls", "Runs cancelled by the watchdog", label, child.stalls)
    families.gauge("engine_child_ready", "1 when the current run is ready", label, child.ready)
    for state in ChildState:
        families.gauge(
            "engine_child_state",
            "1 for the state the child is in",
            {"child": path, "state": state.value},
            child.state is state,
        )
    if child.heartbeat_age is not None:
        families.gauge(
            "engine_child_heartbeat_age_seconds",
            "Seconds since the running child last beat",
            label,
            child.heartbeat_age,
        )
    if math.isfinite(child.stall_after):
        families.gauge(
            "engine_child_stall_after_seconds", "Heartbeat limit", label, child.stall_after
        )


@builds(CycleStatistics)
def _cycle(families: Families, name: str, stats: CycleStatistics) -> None:
    label = {"cycle": name}
    for field, doc in (
        ("runs", "Runs started"),
        ("successes", "Runs that returned"),
        ("failures", "Runs that raised or hit the cycle deadline"),
        ("timeouts", "Runs cut by the cycle deadline"),
        ("overruns", "Runs that carried past the next tick"),
        ("skipped_ticks", "Ticks without a run"),
        ("late_starts", "Runs started off the grid"),
    ):
        families.counter(f"engine_cycle_{field}", doc, label, getattr(stats, field))
    families.gauge("engine_cycle_running", "1 while a run is in progress", label, stats.running)
    families.gauge("engine_cycle_interval_seconds", "Seconds between ticks", label, stats.interval)
    if stats.last_duration is not None:
        families.gauge(
            "engine_cycle_last_duration_seconds",
            "Seconds the latest finished run took",
            label,
            stats.last_duration,
        )


@builds(ConsumerStatistics)
def _consumer(families: Families, name: str, stats: ConsumerStatistics) -> None:
    label = {"consumer": name}
    families.counter("engine_consumer_processed", "Messages handled", label, stats.processed)
    families.counter(
        "engine_consumer_errors", "Messages the handler raised on", label, stats.errors
    )
    families.counter(
        "engine_consumer_processing_seconds",
        "Time spent in the handler",
        label,
        stats.processing_seconds_total,
    )
    families.gauge(
        "engine_consumer_processing_seconds_max",
        "Longest single call of the handler",
        label,
        stats.processing_seconds_max,
    )
    families.gauge("engine_consumer_busy", "Workers inside the handler now", label, stats.busy)
    families.gauge("engine_consumer_workers", "Workers in the group", label, stats.workers)


# -- registered sources -----------------------------------------------------


@builds(ChannelStatistics)
def _channel(families: Families, name: str, stats: ChannelStatistics) -> None:
    label = {"channel": name}
    families.counter("engine_channel_sent", "Messages accepted by send", label, stats.sent)
    families.counter(
        "engine_channel_delivered", "Messages handed to a receiver", label, stats.delivered
    )
    families.counter(
        "engine_channel_dropped", "Messages discarded by the overflow policy", label, stats.dropped
    )
    families.gauge("engine_channel_depth", "Messages buffered now", label, stats.depth)
    families.gauge("engine_channel_peak_depth", "Highest depth seen", label, stats.peak_depth)
    families.gauge("engine_channel_capacity", "The buffer's bound", label, stats.maxsize)
    families.gauge(
        "engine_channel_senders_waiting", "Tasks blocked in send", label, stats.senders_waiting
    )
    families.gauge(
        "engine_channel_receivers_waiting",
        "Tasks blocked in receive",
        label,
        stats.receivers_waiting,
    )


@builds(HubStatistics)
def _hub(families: Families, name: str, stats: HubStatistics) -> None:
    label = {"hub": name}
    subs = stats.subscriptions
    families.counter("engine_hub_published", "Messages published", label, stats.published)
    families.gauge("engine_hub_subscriptions", "Live subscriptions", label, len(subs))
    families.gauge(
        "engine_hub_queued_messages",
        "Messages queued in subscriptions",
        label,
        sum(s.depth for s in subs),
    )
    # Subscriptions come and go, so a sum over the live ones is a gauge, not a counter.
    families.gauge(
        "engine_hub_subscription_drops",
        "Messages dropped or lost by the live subscriptions",
        label,
        sum(s.dropped + s.lost for s in subs),
    )
    families.gauge(
        "engine_hub_disconnected_subscriptions",
        "Subscriptions cut off by the disconnect policy",
        label,
        sum(1 for s in subs if s.disconnected),
    )


# -- the run: bridges and the loop ------------------------------------------


@builds(BridgeStatistics)
def _bridges(families: Families, name: str, stats: BridgeStatistics) -> None:
    calls = "Calls through a bridge"
    families.counter("engine_bridge_calls", calls, {"bridge": "thread"}, stats.thread_calls)
    families.counter("engine_bridge_calls", calls, {"bridge": "process"}, stats.process_calls)
    for field, doc in (
        ("threads_abandoned", "Thread calls whose caller was cancelled while the thread ran"),
        ("iterator_threads_abandoned", "Blocking-iterator threads that did not stop in time"),
        ("workers_killed", "Worker processes killed because their caller was cancelled"),
        ("workers_crashed", "Worker processes that died during a call"),
    ):
        families.counter(f"engine_bridge_{field}", doc, {}, getattr(stats, field))
    families.gauge(
        "engine_bridge_threads_abandoned_running",
        "Abandoned threads still running",
        {},
        stats.threads_abandoned_running,
    )
    for status in ("ok", "error", "timeout", "crashed", "cancelled"):
        families.counter(
            "engine_batch_items",
            "map_batch items by outcome",
            {"status": status},
            getattr(stats, f"batch_{status}"),
        )


@builds(LoopStatistics)
def _loop(families: Families, name: str, stats: LoopStatistics) -> None:
    families.counter("engine_loop_stalls", "Event-loop stalls", {}, stats.stalls)
    families.counter(
        "engine_loop_stall_seconds", "Summed length of the stalls", {}, stats.stall_seconds_total
    )
    families.gauge(
        "engine_loop_stall_seconds_max", "The longest stall", {}, stats.stall_seconds_max
    )
    families.gauge(
        "engine_loop_stall_threshold_seconds", "What counts as a stall", {}, stats.threshold
    )


# -- anything else ----------------------------------------------------------


def _generic(families: Families, name: str, stats: object) -> None:
    """The fields of an attrs snapshot, as declared; undeclared numeric ones as gauges."""
    cls = type(stats)
    if not attrs.has(cls):
        return
    kind = _snake(cls.__name__.removesuffix("Statistics")) or "source"
    for field in attrs.fields(cls):
        value = getattr(stats, field.name)
        spec: MetricSpec | None = field.metadata.get(_METRIC)
        if spec is None:
            if _number(value):
                families.gauge(
                    f"engine_{kind}_{field.name}",
                    f"{cls.__name__}.{field.name}",
                    {"source": name},
                    value,
                )
            continue
        add = families.counter if spec.kind == "counter" else families.gauge
        family = f"engine_{kind}_{spec.name or field.name}"
        if spec.label is not None and isinstance(value, Mapping):
            for key, count in value.items():
                if _number(count):
                    add(family, spec.doc, {"source": name, spec.label: str(key)}, count)
        elif _number(value):
            add(family, spec.doc, {"source": name}, value)


def _number(value: object) -> bool:
    return isinstance(value, bool | int | float) and math.isfinite(value)


_SNAKE = re.compile(r"[a-z][a-z0-9_]*")


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()
