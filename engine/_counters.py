"""Statistics declared once: the frozen snapshot, the counters behind it, its metric families.

A component's statistics are one ``@attrs.frozen`` class, and its fields say
all there is to say about them:

* A field with a default is *counted*: a :class:`Tally` of the class holds a
  mutable copy of it, starting at the default, which the component updates
  as things happen.
* A field without a default is *given* when the snapshot is taken: a
  setting (a name, a bound) or a value read from elsewhere.
* ``metadata=counter_metric(...)`` or ``gauge_metric(...)`` exports a field
  on ``/metrics``, with its help text.
* :func:`metric_source` on the class names the label that carries the
  source's name, and exports the declared fields only.

So the help text, the counter and the snapshot field are written once::

    @engine.metric_source(label="queue")
    @attrs.frozen
    class QueueStatistics:
        name: str
        maxsize: int = attrs.field(metadata=engine.gauge_metric("The bound", name="capacity"))
        sent: int = attrs.field(default=0, metadata=engine.counter_metric("Messages accepted"))
        last_error: str | None = None


    class _Tally(engine.Tally[QueueStatistics]):
        "The counters behind QueueStatistics."


    class Queue:
        def __init__(self, name: str, maxsize: int) -> None:
            self.name, self.maxsize = name, maxsize
            self._tally = _Tally()

        def put(self, item: object) -> None:
            self._tally.sent += 1

        def statistics(self) -> QueueStatistics:
            return self._tally.snapshot(name=self.name, maxsize=self.maxsize)

``/metrics`` then shows ``engine_queue_sent_total{queue="jobs"}`` and
``engine_queue_capacity{queue="jobs"}`` for a source registered as ``jobs``.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar, Generic, Literal, TypeVar, cast, get_args

import attrs

S = TypeVar("S")
C = TypeVar("C", bound=type)

METRIC = "engine.metric"
"""The key of a field's :class:`MetricSpec` in its attrs metadata."""

_SNAKE = re.compile(r"[a-z][a-z0-9_]*")


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
        _check_snake(what, value)
    return {METRIC: spec}


def _check_snake(what: str, value: str | None) -> None:
    if value is not None and not (isinstance(value, str) and _SNAKE.fullmatch(value)):
        raise ValueError(f"{what} must be snake_case, got {value!r}")


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
    sample carries the source's name as label ``source`` (or as the class's
    :func:`metric_source` says). A field holding a mapping of counts is one
    labelled family: each key is the value of ``label``. A field whose value
    is ``None`` or not finite is left out.

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
    Undeclared numeric fields of a class without :func:`metric_source` are
    gauges too; declare one to give it help text, a unit in its name, or a
    label for a mapping.

    Raises:
        ValueError: an empty doc, or a label or name that is not snake_case.
    """
    return _metric(MetricSpec("gauge", doc, label, name))


@attrs.frozen
class SourceSpec:
    """How a statistics class is exported as a whole (private: see :func:`metric_source`)."""

    label: str | None


_SOURCES: dict[type, SourceSpec] = {}


def metric_source(*, label: str | None) -> Callable[[C], C]:
    """Class decorator: how the samples of a statistics class are labelled.

    Without it, each sample of a source carries the name it was registered
    under as label ``source``, and numeric fields nobody declared are
    exported as gauges too, so nothing is invisible. With it, the name goes
    under ``label`` (``label="cycle"`` gives ``engine_cycle_runs_total{cycle=
    "refresh"}``), or nowhere for ``label=None`` (a source the whole run has
    one of), and only the fields declared with :func:`counter_metric` or
    :func:`gauge_metric` are exported.

    Args:
        label: the label the source's name goes under, or ``None``.

    Returns:
        A decorator that registers the class and returns it unchanged.

    Raises:
        ValueError: a label that is not snake_case.
        TypeError: the decorated class is not an attrs class.
    """
    _check_snake("label", label)

    def register(cls: C) -> C:
        if not attrs.has(cast(type, cls)):
            raise TypeError(f"metric_source decorates an attrs class, got {cls!r}")
        _SOURCES[cls] = SourceSpec(label)
        return cls

    return register


def source_spec(cls: type) -> SourceSpec | None:
    """What :func:`metric_source` declared for ``cls``, or ``None``."""
    return _SOURCES.get(cls)


class _TallyType(type):
    """Gives each ``Tally[Statistics]`` subclass one slot per counted field."""

    def __new__(
        mcs, name: str, bases: tuple[type, ...], namespace: dict[str, Any], **kwargs: Any
    ) -> _TallyType:
        statistics = _parameter(namespace.get("__orig_bases__", ()))
        if statistics is None and any(isinstance(base, _TallyType) for base in bases):
            # A subclass of a tally keeps fixed slots: a misspelt counter fails.
            namespace.setdefault("__slots__", ())
        if statistics is not None:
            fields = attrs.fields(statistics)
            slots = namespace.get("__slots__", ())
            own = (slots,) if isinstance(slots, str) else tuple(slots)
            defined = {*namespace, *own}
            counted = [
                f for f in fields if f.default is not attrs.NOTHING and f.name not in defined
            ]
            namespace["__slots__"] = own + tuple(f.name for f in counted)
            namespace["_statistics"] = statistics
            namespace["_starts"] = tuple(_start(statistics, f) for f in counted)
            # The snapshot takes every field the tally has: counted, or
            # defined by the subclass (a slot of its own, a property).
            namespace["_read"] = tuple(
                (f.name, f.alias or f.name) for f in fields if f.name in defined or f in counted
            )
            namespace["_copied"] = tuple(
                f.alias or f.name for f in counted if _is_factory(f.default)
            )
        return super().__new__(mcs, name, bases, namespace, **kwargs)


def _parameter(orig_bases: tuple[object, ...]) -> type | None:
    """``X`` of a ``Tally[X]`` among the bases, if it is an attrs class."""
    for base in orig_bases:
        origin = getattr(base, "__origin__", None)
        if isinstance(origin, _TallyType):
            (argument,) = get_args(base)
            if isinstance(argument, type) and attrs.has(argument):
                return argument
            raise TypeError(f"Tally[...] takes an attrs statistics class, got {argument!r}")
    return None


def _start(statistics: type, field: attrs.Attribute[Any]) -> tuple[str, Callable[[], object]]:
    """The field's name and what makes its starting value (a fresh one per tally)."""
    default: Any = field.default
    if not _is_factory(default):
        return field.name, lambda: default
    if default.takes_self:
        raise TypeError(f"{statistics.__name__}.{field.name}: no Factory taking self")
    return field.name, default.factory


def _is_factory(default: object) -> bool:
    return isinstance(default, attrs.Factory)  # type: ignore[arg-type]  # attrs types Factory as a function


class Tally(Generic[S], metaclass=_TallyType):
    """The mutable counters behind a frozen statistics class ``S``.

    Subclass ``Tally[S]`` once per statistics class. The subclass gets one
    slot per field of ``S`` that has a default (its *counted* fields), set
    to that default (a fresh one from an ``attrs.Factory``). The component
    updates them as plain attributes, as fast as any slot, and
    :meth:`snapshot` turns them into an ``S``. A subclass may add slots and
    methods of its own, and may compute a field with a property instead of
    counting it: the field then gets no slot, and :meth:`snapshot` reads
    the property. See the module docstring for an example.

    Type checkers do not see the counted attributes: they are made from
    ``S`` when the subclass is created. A misspelt one fails at run time on
    its first use, since a tally has fixed slots and no ``__dict__``.
    """

    __slots__ = ()
    _statistics: ClassVar[type[Any] | None] = None
    _starts: ClassVar[tuple[tuple[str, Callable[[], object]], ...]] = ()
    _read: ClassVar[tuple[tuple[str, str], ...]] = ()  # (attribute, init argument)
    _copied: ClassVar[tuple[str, ...]] = ()

    def __init__(self) -> None:
        if self._statistics is None:
            raise TypeError("Tally needs its statistics class: subclass Tally[YourStatistics]")
        for name, start in self._starts:
            setattr(self, name, start())

    def snapshot(self, **given: object) -> S:
        """The frozen statistics: the tally's fields, and ``given`` for the others.

        Args:
            **given: the fields the tally does not hold (settings, values
                read elsewhere); one the tally holds is replaced.

        Raises:
            TypeError: a field without a default is neither held nor given.
        """
        values: dict[str, object] = {arg: getattr(self, name) for name, arg in self._read}
        for name in self._copied:  # a mapping or a list: the snapshot gets its own
            values[name] = copy.copy(values[name])
        values.update(given)
        statistics = cast(type[S], self._statistics)
        return statistics(**values)

    def __repr__(self) -> str:
        counts = ", ".join(f"{name}={getattr(self, name)!r}" for name, _ in self._starts)
        return f"{type(self).__name__}({counts})"

    if TYPE_CHECKING:
        # The counted attributes, unseen by type checkers (see the docstring).
        def __getattr__(self, name: str) -> Any: ...
        def __setattr__(self, name: str, value: Any) -> None: ...
