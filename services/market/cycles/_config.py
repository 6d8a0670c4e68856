"""Settings of the watchlist cycle and of whale-flow detection, checked when built."""

from __future__ import annotations

import math
import types
from collections.abc import Callable, Mapping
from typing import Any

import attrs

import engine
from engine.lowlevel import check_choice, check_count, check_duration, check_name

from .._symbols import check_symbol, check_symbols, to_symbols

_OVERFLOWS = (
    engine.HubOverflow.DROP_OLDEST,
    engine.HubOverflow.DROP_NEWEST,
    engine.HubOverflow.BLOCK,
)

Validator = Callable[[object, "attrs.Attribute[Any]", Any], None]


def _finite_duration(instance: object, attribute: attrs.Attribute[float], value: float) -> None:
    check_duration(attribute.name, value)
    if math.isinf(value):
        raise ValueError(f"{attribute.name} must be finite, got {value!r}")


def _duration(instance: object, attribute: attrs.Attribute[float], value: float) -> None:
    check_duration(attribute.name, value)


def _count(minimum: int) -> Validator:
    def check(instance: object, attribute: attrs.Attribute[int], value: int) -> None:
        check_count(attribute.name, value, minimum=minimum)

    return check


def _name(instance: object, attribute: attrs.Attribute[str], value: str) -> None:
    check_name(attribute.name, value)


def _base_url(instance: object, attribute: attrs.Attribute[str], value: str) -> None:
    if not isinstance(value, str) or not value.startswith(("http://", "https://")):
        raise ValueError(f"base_url must start with http:// or https://, got {value!r}")


def _strip_slash(value: str) -> str:
    return value.rstrip("/") if isinstance(value, str) else value


@attrs.frozen
class WatchlistConfig:
    """What the watchlist fetches, how often, and how long each step may take.

    The three deadlines nest, innermost shortest:
    ``request_deadline <= batch_deadline <= cycle_deadline <= interval``.
    A request deadline longer than its batch's could never fire (the batch
    deadline would always come first), and a cycle deadline longer than the
    interval would let a slow cycle run into the next tick; both are
    configuration mistakes, so they raise. Equal deadlines are allowed: when
    two fire at the same instant, the outer one is the one reported.

    Args:
        base_url: the REST base, ``https://api.binance.com`` or the embedded
            simulator's ``http://127.0.0.1:<port>``.
        symbols: the watchlist, upper-case Binance symbols, no repeats.
        interval: seconds between cycles; finite, > 0.
        batch_size: symbols per request (``symbols=[...]``); Binance charges
            the same weight (2) for 1 to 20 symbols, so 20 is the default.
        cycle_deadline: seconds each cycle may take; defaults to ``interval``.
        batch_deadline: seconds each batch may take once it has a slot,
            including the per-symbol requests of a split batch; defaults to
            0.8 * ``cycle_deadline``.
        request_deadline: seconds each HTTP request may take, answer body
            included; defaults to 0.5 * ``batch_deadline``.
        concurrency: batches in flight at once, >= 1.
        retry_attempts: attempts per request, >= 1 (1: no retry). Transient
            errors (a connection error, HTTP 429 or 5xx) are tried again,
            after a wait from ``retry_backoff`` or the answer's
            ``Retry-After``, within the batch deadline.
        retry_backoff: the caps of the waits between attempts (full jitter
            draws each wait below its cap).
        breaker_threshold: failures of a symbol within ``breaker_window``
            that open its circuit, >= 1: the symbol is then left out of the
            requests until ``breaker_cooldown`` has passed.
        breaker_window: seconds a symbol's failure is remembered; defaults to
            ``breaker_threshold * interval``, so that many failing cycles in
            a row open the circuit.
        breaker_cooldown: seconds an open circuit leaves its symbol out
            before it is tried again, alone (the probe); finite, > 0.
        name: the cycle's name in logs, statistics and the supervision tree.

    Raises:
        TypeError, ValueError: for a bad setting; the message names it.
    """

    base_url: str = attrs.field(converter=_strip_slash, validator=_base_url)
    symbols: tuple[str, ...] = attrs.field(converter=to_symbols, validator=check_symbols)
    interval: float = attrs.field(default=5.0, kw_only=True, validator=_finite_duration)
    batch_size: int = attrs.field(default=20, kw_only=True, validator=_count(1))
    cycle_deadline: float = attrs.field(
        default=attrs.Factory(lambda self: self.interval, takes_self=True),
        kw_only=True,
        validator=_finite_duration,
    )
    batch_deadline: float = attrs.field(
        default=attrs.Factory(lambda self: 0.8 * self.cycle_deadline, takes_self=True),
        kw_only=True,
        validator=_finite_duration,
    )
    request_deadline: float = attrs.field(
        default=attrs.Factory(lambda self: 0.5 * self.batch_deadline, takes_self=True),
        kw_only=True,
        validator=_finite_duration,
    )
    concurrency: int = attrs.field(default=4, kw_only=True, validator=_count(1))
    retry_attempts: int = attrs.field(default=2, kw_only=True, validator=_count(1))
    retry_backoff: engine.Backoff = attrs.field(
        default=engine.Backoff(initial=0.25, maximum=2.0, jitter=0.0),
        kw_only=True,
        validator=attrs.validators.instance_of(engine.Backoff),
    )
    breaker_threshold: int = attrs.field(default=3, kw_only=True, validator=_count(1))
    breaker_window: float = attrs.field(
        default=attrs.Factory(lambda self: self.breaker_threshold * self.interval, takes_self=True),
        kw_only=True,
        validator=_duration,
    )
    breaker_cooldown: float = attrs.field(default=60.0, kw_only=True, validator=_finite_duration)
    name: str = attrs.field(default="watchlist", kw_only=True, validator=_name)

    def __attrs_post_init__(self) -> None:
        nested = (
            ("request_deadline", self.request_deadline, "batch_deadline", self.batch_deadline),
            ("batch_deadline", self.batch_deadline, "cycle_deadline", self.cycle_deadline),
            ("cycle_deadline", self.cycle_deadline, "interval", self.interval),
        )
        for inner, inner_value, outer, outer_value in nested:
            if inner_value > outer_value:
                raise ValueError(
                    f"{inner} must be <= {outer} (deadlines nest: request <= batch <= "
                    f"cycle <= interval), got {inner}={inner_value:g} > {outer}={outer_value:g}"
                )

    @property
    def stall_after(self) -> float:
        """A ``stall_after`` for the supervised child that runs the watchlist.

        ``2 * (interval + cycle_deadline)``: comfortably above the longest
        normal gap between heartbeats (one ``interval``), so the watchdog
        fires only when the loop itself is stuck in something that ignores
        cancellation, the one case the cycle deadline cannot cut.
        """
        return 2 * (self.interval + self.cycle_deadline)


def _to_thresholds(value: Mapping[str, float] | None) -> Mapping[str, float]:
    # A read-only copy: the caller's dict may change, the config must not.
    return types.MappingProxyType(dict(value) if value is not None else {})


def check_notional(name: str, value: object) -> float:
    """A notional threshold: a finite number > 0."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a number, got {value!r}")
    if not 0 < value < math.inf:
        raise ValueError(f"{name} must be > 0 and finite, got {value!r}")
    return float(value)


def _threshold(instance: object, attribute: attrs.Attribute[float], value: float) -> None:
    check_notional(attribute.name, value)


def _thresholds(
    instance: object, attribute: attrs.Attribute[Mapping[str, float]], value: Mapping[str, float]
) -> None:
    for symbol, threshold in value.items():
        check_symbol("thresholds", symbol)
        check_notional(f"thresholds[{symbol!r}]", threshold)


def _pattern(instance: object, attribute: attrs.Attribute[str], value: str) -> None:
    check_name(attribute.name, value)
    if " " in value:
        raise ValueError(f"{attribute.name} must be a bus topic pattern, got {value!r}")


def _prefix(instance: object, attribute: attrs.Attribute[str], value: str) -> None:
    check_name(attribute.name, value)
    if any(c in value for c in " *>") or value.startswith(".") or value.endswith("."):
        raise ValueError(
            f"{attribute.name} must be plain topic tokens like 'whales', got {value!r}"
        )


def _overflow(value: str) -> engine.HubOverflow:
    return check_choice("overflow", value, _OVERFLOWS)


@attrs.frozen(kw_only=True)
class WhaleFlowConfig:
    """What counts as a whale trade, and how long flows are aggregated.

    Notional is ``price * qty`` in the symbol's quote currency: US dollars
    for the ``USDT``/``USDC``/``FDUSD`` pairs the default threshold is meant
    for. Give symbols quoted in anything else (``ETHBTC``) their own
    threshold in ``thresholds``.

    Args:
        threshold_usd: the notional at or above which a trade is a whale.
        thresholds: per-symbol thresholds that replace ``threshold_usd``.
        window: seconds a whale counts in its symbol's flow, on the trio
            clock (so tests run it in virtual time).
        history: whales kept for :meth:`WhaleFlows.recent`, newest first.
        max_window_trades: whales kept per symbol in the flow window; past
            it the oldest leave the window early and are counted as
            ``window_evictions`` (a declared bound instead of unbounded memory).
        pattern: the bus pattern the trades come from.
        publish_prefix: whales are published on ``<publish_prefix>.<SYMBOL>``.
        queue_size: the bound of the bus subscription's queue.
        overflow: its policy: ``"drop_oldest"`` (default; the bus counts
            what it drops), ``"drop_newest"`` or ``"block"`` (slows the
            publishers of trades to the pace of detection).

    Raises:
        TypeError, ValueError: for a bad setting; the message names it.
    """

    threshold_usd: float = attrs.field(default=100_000.0, validator=_threshold)
    thresholds: Mapping[str, float] = attrs.field(
        factory=dict, converter=_to_thresholds, validator=_thresholds, hash=False
    )
    window: float = attrs.field(default=60.0, validator=_finite_duration)
    history: int = attrs.field(default=500, validator=_count(1))
    max_window_trades: int = attrs.field(default=10_000, validator=_count(1))
    pattern: str = attrs.field(default="trades.>", validator=_pattern)
    publish_prefix: str = attrs.field(default="whales", validator=_prefix)
    queue_size: int = attrs.field(default=10_000, validator=_count(1))
    overflow: engine.HubOverflow = attrs.field(
        default=engine.HubOverflow.DROP_OLDEST, converter=_overflow
    )

    def threshold(self, symbol: str) -> float:
        """The whale threshold of ``symbol``: its own, or ``threshold_usd``."""
        return self.thresholds.get(symbol, self.threshold_usd)
