"""A circuit breaker per key: fail fast for what keeps failing, probe it now and then.

Each key has its own circuit, so one key opening does not touch the others::

    closed ──(threshold failures within window)──> open
    open ──(cooldown passed; next caller)──> half-open: that caller is the one probe
    half-open ──(probe succeeded)──> closed
    half-open ──(probe failed)──> open, for another cooldown

The arithmetic of one circuit lives in ``_breaker_circuit.py``, without
trio; this module holds the keyed table, the statistics and the logging.
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable
from typing import TypeVar, TypeVarTuple

import attrs
import trio

from ._breaker_circuit import Circuit, CircuitState
from ._counters import Tally, counter_metric, gauge_metric, metric_source
from ._exceptions import EngineError
from ._retry import ErrorFilter, ErrorPredicate, to_predicate
from ._validation import check_count, check_duration, check_name

logger = logging.getLogger("engine.breaker")

T = TypeVar("T")
PosArgsT = TypeVarTuple("PosArgsT")

Transition = Callable[[Hashable, CircuitState, CircuitState, float], None]
"""Told of each change of a circuit's state: ``(key, old, new, at)``, ``at`` on the trio clock."""


class CircuitOpen(EngineError):
    """A call was refused because its key's circuit is open.

    Attributes:
        key: the key whose circuit refused (``str(key)``).
        retry_at: ``trio.current_time()`` at which the circuit half-opens
            and lets one probe through; for a half-open circuit whose probe
            is still running, ``None``: try again once the probe ends.
    """

    __match_args__ = ("key", "retry_at")

    def __init__(self, key: str, retry_at: float | None) -> None:
        if retry_at is None:
            super().__init__(f"circuit {key!r} is half-open and its probe is in flight")
        else:
            super().__init__(f"circuit {key!r} is open until {retry_at:.3f}")
        self.key = key
        self.retry_at = retry_at


@metric_source(label="breaker")
@attrs.frozen(kw_only=True)
class BreakerStatistics:
    """A :class:`CircuitBreaker` at the moment of the snapshot, for /status and /metrics.

    Attributes:
        name: the breaker's name.
        threshold: failures within ``window`` that open a circuit.
        window: seconds failures are remembered.
        cooldown: seconds an open circuit refuses before its probe.
        max_keys: the most keys remembered.
        taken_at: ``trio.current_time()`` of the snapshot.
        keys: keys remembered now, by state (``closed``, ``open``, ``half_open``).
        opened: transitions to open.
        half_opened: transitions to half-open.
        closed: transitions from half-open to closed.
        successes: calls recorded as successes.
        failures: calls recorded as failures.
        rejected: calls refused (fail fast) by an open or probing circuit.
        forgotten: keys dropped to stay within ``max_keys``.
        states: each remembered key (as a string) and its state.
        retry_at: each open key and when it half-opens (trio clock).
    """

    name: str
    threshold: int
    window: float
    cooldown: float = attrs.field(
        metadata=gauge_metric("Seconds an open circuit refuses calls", name="cooldown_seconds")
    )
    max_keys: int = attrs.field(metadata=gauge_metric("The most keys remembered"))
    taken_at: float
    keys: dict[str, int] = attrs.field(
        metadata=gauge_metric("Keys remembered, by circuit state", label="state")
    )
    opened: int = attrs.field(default=0, metadata=counter_metric("Circuits that opened"))
    half_opened: int = attrs.field(default=0, metadata=counter_metric("Circuits that half-opened"))
    closed: int = attrs.field(default=0, metadata=counter_metric("Circuits that closed again"))
    successes: int = attrs.field(default=0, metadata=counter_metric("Calls that succeeded"))
    failures: int = attrs.field(default=0, metadata=counter_metric("Calls that failed"))
    rejected: int = attrs.field(default=0, metadata=counter_metric("Calls refused, failing fast"))
    forgotten: int = attrs.field(default=0, metadata=counter_metric("Keys dropped at max_keys"))
    states: dict[str, str]
    retry_at: dict[str, float]

    def open_keys(self) -> dict[str, float]:
        """The open keys and when each half-opens, soonest first."""
        return dict(sorted(self.retry_at.items(), key=lambda item: item[1]))


class _Tally(Tally[BreakerStatistics]):
    """The counters behind :meth:`CircuitBreaker.statistics`."""


@attrs.define(eq=False)
class Permit:
    """Leave to make one call for ``key``; say how it went with exactly one of its methods.

    Got from :meth:`CircuitBreaker.admit`. Only the first of
    :meth:`succeed`, :meth:`fail` and :meth:`release` counts; later calls do
    nothing, so the code that settles a call may settle it once more on its
    way out.

    Attributes:
        key: the key the call is for.
        probe: whether this call is the half-open circuit's one probe.
    """

    key: Hashable
    probe: bool
    _breaker: CircuitBreaker = attrs.field(repr=False)
    _circuit: Circuit = attrs.field(repr=False)
    _settled: bool = attrs.field(default=False, repr=False)

    @property
    def settled(self) -> bool:
        """Whether the call has been settled already."""
        return self._settled

    def succeed(self) -> None:
        """The call succeeded: a probe closes its circuit."""
        if not self._settled:
            self._settled = True
            self._breaker._record(self, ok=True)

    def fail(self) -> None:
        """The call failed: counts towards opening; a failed probe reopens the circuit."""
        if not self._settled:
            self._settled = True
            self._breaker._record(self, ok=False)

    def release(self) -> None:
        """The call says nothing about the key (it was cancelled, say): no verdict.

        A probe's slot is freed, so the next caller probes instead.
        """
        if not self._settled:
            self._settled = True
            self._circuit.release(self.probe)


def _settings(threshold: int, window: float, cooldown: float, max_keys: int) -> None:
    check_count("threshold", threshold, minimum=1)
    check_duration("window", window)
    check_duration("cooldown", cooldown)
    if not math.isfinite(cooldown):
        raise ValueError(f"cooldown must be finite, got {cooldown!r}")
    check_count("max_keys", max_keys, minimum=1)


class CircuitBreaker:
    """Circuits per key: fail fast for keys that keep failing, one probe per cooldown.

    A key's circuit opens when ``threshold`` failures fall within ``window``
    seconds. While open, :meth:`admit` refuses at once with
    :class:`CircuitOpen`, which says when the circuit half-opens. After
    ``cooldown`` seconds the next caller gets the one probe; other callers
    are refused until the probe is settled. A probe that succeeds closes the
    circuit (and forgets its failures); one that fails opens it for another
    ``cooldown``. Each change of state is logged once on the
    ``engine.breaker`` logger.

    Memory is bounded: at most ``max_keys`` keys are remembered. A new key
    past the bound drops the least recently used closed key without a probe
    in flight (or, if every key is open, the least recently used key).

    Times come from ``trio.current_time()``, so tests run it in virtual time.

    Args:
        threshold: failures within ``window`` that open a circuit, >= 1.
        window: seconds a failure is remembered, > 0 (``math.inf``: until
            the circuit closes after a probe).
        cooldown: seconds an open circuit refuses calls, finite, > 0.
        max_keys: the most keys remembered, >= 1.
        failure_on: exception types, or a predicate on the exception, that
            :meth:`call` records as failures; other exceptions release the
            permit without a verdict. Defaults to every :class:`Exception`.
        name: the name in logs and statistics.
        on_transition: called as ``on_transition(key, old, new, at)`` after
            each change of a circuit's state is logged (``at``:
            ``trio.current_time()``), from the call that caused it; it must
            be quick and must not block. What it raises propagates out of
            that call (:meth:`admit` or the permit's method), after the
            change has taken effect.

    Raises:
        TypeError, ValueError: for a bad setting; the message names it.
    """

    def __init__(
        self,
        *,
        threshold: int = 5,
        window: float = 60.0,
        cooldown: float = 30.0,
        max_keys: int = 10_000,
        failure_on: ErrorFilter = Exception,
        name: str = "breaker",
        on_transition: Transition | None = None,
    ) -> None:
        _settings(threshold, window, cooldown, max_keys)
        if on_transition is not None and not callable(on_transition):
            raise TypeError(f"on_transition must be callable or None, got {on_transition!r}")
        self._on_transition = on_transition
        self.threshold = threshold
        self.window = float(window)
        self.cooldown = float(cooldown)
        self.max_keys = max_keys
        self.name = check_name("name", name)
        self._failure_on: ErrorPredicate = to_predicate("failure_on", failure_on)
        self._circuits: OrderedDict[Hashable, Circuit] = OrderedDict()
        self._tally = _Tally()

    def state(self, key: Hashable) -> CircuitState:
        """The state of ``key``'s circuit now (an open one past its cooldown is half-open)."""
        circuit = self._circuits.get(key)
        if circuit is None:
            return CircuitState.CLOSED
        return circuit.state_at(trio.current_time())

    def retry_at(self, key: Hashable) -> float | None:
        """When ``key``'s open circuit half-opens, or ``None`` if it is not open."""
        circuit = self._circuits.get(key)
        if circuit is None or circuit.state_at(trio.current_time()) is not CircuitState.OPEN:
            return None
        return circuit.retry_at

    def admit(self, key: Hashable) -> Permit:
        """Leave to make one call for ``key``, or :class:`CircuitOpen` at once.

        Settle the permit with exactly one of :meth:`Permit.succeed`,
        :meth:`Permit.fail` or :meth:`Permit.release` when the call ends,
        also when it is cancelled: an unsettled probe keeps its circuit
        refusing everyone. :meth:`call` does this for you.

        Raises:
            CircuitOpen: the circuit is open, or half-open with its probe in flight.
        """
        now = trio.current_time()
        circuit = self._circuit(key)
        before = circuit.state
        probe = circuit.admit(now)
        if circuit.state is not before:
            try:
                self._changed(key, circuit, before)
            except BaseException:
                if probe is not None:
                    circuit.release(probe)  # nobody gets the permit: free the probe
                raise
        if probe is None:
            self._tally.rejected += 1
            retry_at = circuit.retry_at if circuit.state is CircuitState.OPEN else None
            raise CircuitOpen(str(key), retry_at)
        return Permit(key, probe, self, circuit)

    async def call(
        self, key: Hashable, fn: Callable[[*PosArgsT], Awaitable[T]], *args: *PosArgsT
    ) -> T:
        """``await fn(*args)`` through ``key``'s circuit.

        A return is a success; an exception ``failure_on`` accepts is a
        failure; any other exception, and cancellation, release the permit
        without a verdict. The exception propagates either way.

        Cancellation:
            Cancelling the caller cancels ``fn`` and releases the permit: a
            cancelled probe lets the next caller probe.

        Raises:
            CircuitOpen: at once, if the circuit refuses the call.
        """
        permit = self.admit(key)
        try:
            result = await fn(*args)
        except Exception as exc:
            try:
                if self._failure_on(exc):
                    permit.fail()
            finally:
                permit.release()  # a no-op once settled; frees a probe if failure_on raised
            raise
        except BaseException:
            permit.release()
            raise
        permit.succeed()
        return result

    def statistics(self) -> BreakerStatistics:
        """A frozen snapshot: counters, and each remembered key's state."""
        now = trio.current_time()
        keys = dict.fromkeys((s.value for s in CircuitState), 0)
        states: dict[str, str] = {}
        retry_at: dict[str, float] = {}
        for key, circuit in self._circuits.items():
            state = circuit.state_at(now)
            keys[state.value] += 1
            states[str(key)] = state.value
            if state is CircuitState.OPEN:
                retry_at[str(key)] = circuit.retry_at
        return self._tally.snapshot(
            name=self.name,
            threshold=self.threshold,
            window=self.window,
            cooldown=self.cooldown,
            max_keys=self.max_keys,
            taken_at=now,
            keys=keys,
            states=states,
            retry_at=retry_at,
        )

    # -- the table -----------------------------------------------------------

    def _circuit(self, key: Hashable) -> Circuit:
        circuit = self._circuits.get(key)
        if circuit is not None:
            self._circuits.move_to_end(key)
            return circuit
        if len(self._circuits) >= self.max_keys:
            self._forget_one()
        circuit = Circuit(threshold=self.threshold, window=self.window, cooldown=self.cooldown)
        self._circuits[key] = circuit
        return circuit

    def _forget_one(self) -> None:
        victim = next((k for k, c in self._circuits.items() if c.idle), next(iter(self._circuits)))
        del self._circuits[victim]
        self._tally.forgotten += 1

    def _record(self, permit: Permit, *, ok: bool) -> None:
        circuit = permit._circuit
        before = circuit.state
        tally = self._tally
        if ok:
            tally.successes += 1
            circuit.succeed(permit.probe)
        else:
            tally.failures += 1
            circuit.fail(permit.probe, trio.current_time())
        if circuit.state is not before:
            self._changed(permit.key, circuit, before)

    def _changed(self, key: Hashable, circuit: Circuit, before: CircuitState) -> None:
        tally = self._tally
        state = circuit.state
        if state is CircuitState.OPEN:
            tally.opened += 1
            logger.warning(
                "breaker %r: circuit %r opened (%s); half-opens in %g s",
                self.name,
                str(key),
                "its probe failed"
                if before is CircuitState.HALF_OPEN
                else f"{self.threshold} failure(s) within {self.window:g} s",
                self.cooldown,
            )
        elif state is CircuitState.HALF_OPEN:
            tally.half_opened += 1
            logger.info("breaker %r: circuit %r half-open: one probe", self.name, str(key))
        else:
            tally.closed += 1
            logger.info("breaker %r: circuit %r closed: its probe succeeded", self.name, str(key))
        if self._on_transition is not None:
            self._on_transition(key, before, state, trio.current_time())
