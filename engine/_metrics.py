"""Prometheus metrics built from fresh statistics snapshots at scrape time.

:class:`EngineCollector` is a ``prometheus_client`` custom collector: it
holds no counters of its own. Each scrape takes ``statistics()`` of the
supervisor tree, of every registered source and of the bridges, and turns
each snapshot into samples. A snapshot's fields are exported as declared
with :func:`counter_metric` and :func:`gauge_metric`, its samples labelled as
its class's :func:`metric_source` says (see ``_counters.py``), and undeclared
numeric fields of other classes as gauges named ``engine_<type>_<field>``,
so nothing is invisible. A type whose families are derived rather than
declared (sums, a tree, a one-hot state) has a builder of its own,
registered with ``@builds(Type)``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Protocol, TypeVar

import attrs
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ._bridgestats import BridgeStatistics, bridge_statistics
from ._counters import METRIC, MetricSpec, source_spec
from ._counters import counter_metric as counter_metric
from ._counters import gauge_metric as gauge_metric
from ._hub import HubStatistics
from ._loopwatch import LoopWatch
from ._statistics import ChildState, SupervisorStatistics


class HasStatistics(Protocol):
    """Anything that can be observed: it has a ``statistics()`` snapshot."""

    def statistics(self) -> object:
        """A frozen snapshot of what it has done."""
        ...


S = TypeVar("S")


class Families:
    """Metric families of one scrape, created on first use, in first-use order."""

    def __init__(self) -> None:
        self._families: dict[str, CounterMetricFamily | GaugeMetricFamily] = {}

    def counter(self, name: str, doc: str, labels: Mapping[str, str], value: float) -> None:
        """Add a sample of counter ``name`` (without ``_total``; the exposition adds it)."""
        self._add(CounterMetricFamily, name, doc, labels, value)

    def gauge(self, name: str, doc: str, labels: Mapping[str, str], value: float) -> None:
        """Add a sample of gauge ``name``."""
        self._add(GaugeMetricFamily, name, doc, labels, value)

    def _add(
        self,
        kind: type[CounterMetricFamily | GaugeMetricFamily],
        name: str,
        doc: str,
        labels: Mapping[str, str],
        value: float,
    ) -> None:
        family = self._families.get(name)
        if family is None:
            family = self._families[name] = kind(name, doc, labels=list(labels))
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
    """Add the samples of one snapshot, by its type's builder or as declared, to ``families``."""
    _BUILDERS.get(type(stats), export_fields)(families, name, stats)


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


# -- derived families: the builders ------------------------------------------


@builds(SupervisorStatistics)
def _tree(families: Families, name: str, stats: SupervisorStatistics) -> None:
    # Labelled by path in the tree, not by the name the source was given.
    _supervisor(families, stats, stats.name, stats.name)


def _supervisor(families: Families, sup: SupervisorStatistics, path: str, prefix: str) -> None:
    export_fields(families, path, sup)
    for child in sup.children:
        child_path = f"{prefix}/{child.name}"
        export_fields(families, child_path, child)
        # One-hot: a gauge per state, 1 for the state the child is in.
        for state in ChildState:
            families.gauge(
                "engine_child_state",
                "1 for the state the child is in",
                {"child": child_path, "state": state.value},
                child.state is state,
            )
        for inner in child.attached:
            if isinstance(inner, SupervisorStatistics):
                _supervisor(families, inner, f"{child_path}/{inner.name}", child_path)
            else:
                build(families, f"{child_path}/{getattr(inner, 'name', '')}".rstrip("/"), inner)


@builds(HubStatistics)
def _hub(families: Families, name: str, stats: HubStatistics) -> None:
    export_fields(families, name, stats)
    # Sums over the live subscriptions. They come and go, so even the sum of
    # their drops is a gauge, not a counter.
    label = {"hub": name}
    subs = stats.subscriptions
    families.gauge("engine_hub_subscriptions", "Live subscriptions", label, len(subs))
    families.gauge(
        "engine_hub_queued_messages",
        "Messages queued in subscriptions",
        label,
        sum(s.depth for s in subs),
    )
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


@builds(BridgeStatistics)
def _bridges(families: Families, name: str, stats: BridgeStatistics) -> None:
    export_fields(families, name, stats)
    # Fields that are samples of one family each, told apart by a label: the
    # calls by bridge, and map_batch's items by outcome.
    calls = "Calls through a bridge"
    families.counter("engine_bridge_calls", calls, {"bridge": "thread"}, stats.thread_calls)
    families.counter("engine_bridge_calls", calls, {"bridge": "process"}, stats.process_calls)
    for status in ("ok", "error", "timeout", "crashed", "cancelled"):
        families.counter(
            "engine_batch_items",
            "map_batch items by outcome",
            {"status": status},
            getattr(stats, f"batch_{status}"),
        )


# -- declared families ------------------------------------------------------


def export_fields(families: Families, name: str, stats: object) -> None:
    """The fields of an attrs snapshot, as declared; undeclared numeric ones as gauges.

    Undeclared fields are left out for a class with :func:`metric_source`.
    """
    cls = type(stats)
    if not attrs.has(cls):
        return
    kind = _snake(cls.__name__.removesuffix("Statistics")) or "source"
    source = source_spec(cls)
    label = "source" if source is None else source.label
    labels = {} if label is None else {label: name}
    for field in attrs.fields(cls):
        value = getattr(stats, field.name)
        spec: MetricSpec | None = field.metadata.get(METRIC)
        if spec is None:
            if source is None and _number(value):
                families.gauge(
                    f"engine_{kind}_{field.name}", f"{cls.__name__}.{field.name}", labels, value
                )
            continue
        add = families.counter if spec.kind == "counter" else families.gauge
        family = f"engine_{kind}_{spec.name or field.name}"
        if spec.label is not None and isinstance(value, Mapping):
            for key, count in value.items():
                if _number(count):
                    add(family, spec.doc, {**labels, spec.label: str(key)}, count)
        elif _number(value):
            add(family, spec.doc, labels, value)


def _number(value: object) -> bool:
    return isinstance(value, bool | int | float) and math.isfinite(value)


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()
