"""The keyed circuit breaker: its states in virtual time, probes, statistics, memory bound."""

from __future__ import annotations

import logging
import math
import pickle
import re

import pytest
import trio
import trio.testing
from prometheus_client import CollectorRegistry, generate_latest

from engine._breaker import CircuitBreaker, CircuitOpen
from engine._breaker_circuit import Circuit, CircuitState
from engine._metrics import EngineCollector

from ._promlint import lint


class Down(Exception):
    """The error the failing calls raise."""


async def fails() -> None:
    await trio.sleep(0.5)
    raise Down


async def works() -> str:
    await trio.sleep(0.5)
    return "ok"


async def fail_times(breaker: CircuitBreaker, key: str, times: int) -> None:
    for _ in range(times):
        with pytest.raises(Down):
            await breaker.call(key, fails)


def transitions(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "engine.breaker"]


# --- the state machine, without a clock ----------------------------------------------


def test_a_circuit_opens_on_threshold_failures_within_the_window_only() -> None:
    circuit = Circuit(threshold=3, window=10, cooldown=30)
    for now in (0, 5, 10):  # the first has left the window when the third comes
        circuit.fail(False, now)
    assert circuit.state is CircuitState.CLOSED
    circuit.fail(False, 14.5)  # 5, 10, 14.5: three within 10 s
    assert (circuit.state, circuit.retry_at) == (CircuitState.OPEN, 44.5)


def test_an_open_circuit_admits_one_probe_after_its_cooldown() -> None:
    circuit = Circuit(threshold=1, window=10, cooldown=30)
    circuit.fail(False, 0)
    assert circuit.admit(29.9) is None
    assert circuit.state_at(29.9) is CircuitState.OPEN
    assert circuit.state_at(30) is CircuitState.HALF_OPEN
    assert circuit.admit(30) is True
    assert circuit.admit(30) is None  # the probe is in flight
    circuit.release(True)
    assert circuit.admit(31) is True  # a released probe frees the slot
    circuit.fail(True, 32)
    assert (circuit.state, circuit.retry_at) == (CircuitState.OPEN, 62)
    assert circuit.admit(62) is True
    circuit.succeed(True)
    assert (circuit.state, circuit.admit(62), circuit.idle) == (CircuitState.CLOSED, False, True)


def test_late_verdicts_of_calls_admitted_before_a_change_do_not_move_the_circuit() -> None:
    circuit = Circuit(threshold=1, window=10, cooldown=30)
    circuit.fail(False, 0)
    circuit.fail(False, 1)  # a call admitted while closed, failing after it opened
    assert circuit.retry_at == 30
    assert circuit.admit(30) is True
    circuit.succeed(False)  # a late success of an old call is not the probe's
    assert circuit.state is CircuitState.HALF_OPEN


# --- the keyed breaker, in virtual time ------------------------------------------------


async def test_a_key_opens_after_threshold_failures_and_then_fails_fast(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="engine.breaker")
    breaker = CircuitBreaker(threshold=3, window=60, cooldown=30, name="quotes")
    await fail_times(breaker, "ETHUSDT", 3)  # at 0.5, 1.0, 1.5
    assert breaker.state("ETHUSDT") is CircuitState.OPEN
    assert breaker.retry_at("ETHUSDT") == 31.5
    calls = 0

    async def counted() -> None:
        nonlocal calls
        calls += 1

    with pytest.raises(CircuitOpen) as caught:
        await breaker.call("ETHUSDT", counted)
    assert (caught.value.key, caught.value.retry_at, calls) == ("ETHUSDT", 31.5, 0)
    assert str(caught.value) == "circuit 'ETHUSDT' is open until 31.500"
    assert trio.current_time() == 1.5  # failing fast takes no time
    # Other keys are untouched.
    assert await breaker.call("BTCUSDT", works) == "ok"
    assert breaker.state("BTCUSDT") is CircuitState.CLOSED
    assert transitions(caplog) == [
        "breaker 'quotes': circuit 'ETHUSDT' opened (3 failure(s) within 60 s); half-opens in 30 s"
    ]


async def test_after_the_cooldown_one_probe_goes_through_and_the_others_fail_fast(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="engine.breaker")
    breaker = CircuitBreaker(threshold=1, cooldown=10, name="quotes")
    await fail_times(breaker, "ETHUSDT", 1)  # opens at 0.5, half-opens at 10.5
    await trio.sleep_until(10.5)
    outcomes: list[tuple[int, str, float | None]] = []

    async def caller(n: int) -> None:
        try:
            outcomes.append((n, await breaker.call("ETHUSDT", works), None))
        except CircuitOpen as exc:
            outcomes.append((n, "refused", exc.retry_at))

    async with trio.open_nursery() as nursery:
        for n in range(5):
            nursery.start_soon(caller, n)
        await trio.testing.wait_all_tasks_blocked()
        assert breaker.state("ETHUSDT") is CircuitState.HALF_OPEN
        assert breaker.statistics().keys == {"closed": 0, "open": 0, "half_open": 1}
    # Task start order is not fixed: exactly one of the five probed.
    assert sorted(o[1] for o in outcomes) == ["ok", "refused", "refused", "refused", "refused"]
    assert [o[2] for o in outcomes if o[1] == "refused"] == [None] * 4
    assert outcomes[-1][1] == "ok"  # the probe ended last, at 11
    assert trio.current_time() == 11
    assert breaker.state("ETHUSDT") is CircuitState.CLOSED
    stats = breaker.statistics()
    assert (stats.opened, stats.half_opened, stats.closed, stats.rejected) == (1, 1, 1, 4)
    assert transitions(caplog)[1:] == [
        "breaker 'quotes': circuit 'ETHUSDT' half-open: one probe",
        "breaker 'quotes': circuit 'ETHUSDT' closed: its probe succeeded",
    ]


async def test_a_failed_probe_opens_the_circuit_for_another_cooldown(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="engine.breaker")
    breaker = CircuitBreaker(threshold=2, window=10, cooldown=20, name="quotes")
    await fail_times(breaker, "ETHUSDT", 2)  # opens at 1
    await trio.sleep_until(21)
    await fail_times(breaker, "ETHUSDT", 1)  # the probe fails at 21.5
    assert breaker.retry_at("ETHUSDT") == 41.5
    with pytest.raises(CircuitOpen):
        await breaker.call("ETHUSDT", works)
    assert transitions(caplog)[-1] == (
        "breaker 'quotes': circuit 'ETHUSDT' opened (its probe failed); half-opens in 20 s"
    )
    assert breaker.statistics().opened == 2


async def test_on_transition_is_told_each_change_with_its_time(
    autojump_clock: trio.testing.MockClock,
) -> None:
    seen: list[tuple[object, CircuitState, CircuitState, float]] = []

    def on_transition(key: object, old: CircuitState, new: CircuitState, at: float) -> None:
        seen.append((key, old, new, at))

    breaker = CircuitBreaker(threshold=2, window=10, cooldown=20, on_transition=on_transition)
    await fail_times(breaker, "ETHUSDT", 2)  # opens at 1
    await trio.sleep_until(21)
    await fail_times(breaker, "ETHUSDT", 1)  # half-opens at 21, the probe fails at 21.5
    await trio.sleep_until(42)
    assert await breaker.call("ETHUSDT", works) == "ok"  # the probe closes it at 42.5
    closed, open_, half = CircuitState.CLOSED, CircuitState.OPEN, CircuitState.HALF_OPEN
    assert seen == [
        ("ETHUSDT", closed, open_, 1.0),
        ("ETHUSDT", open_, half, 21.0),
        ("ETHUSDT", half, open_, 21.5),
        ("ETHUSDT", open_, half, 42.0),
        ("ETHUSDT", half, closed, 42.5),
    ]
    with pytest.raises(TypeError, match="on_transition must be callable or None"):
        CircuitBreaker(on_transition="log")  # type: ignore[arg-type]


async def test_a_cancelled_probe_lets_the_next_caller_probe(
    autojump_clock: trio.testing.MockClock,
) -> None:
    breaker = CircuitBreaker(threshold=1, cooldown=10)
    await fail_times(breaker, "ETHUSDT", 1)
    await trio.sleep_until(10.5)
    with trio.move_on_after(0.25):
        await breaker.call("ETHUSDT", works)
    assert breaker.state("ETHUSDT") is CircuitState.HALF_OPEN
    assert await breaker.call("ETHUSDT", works) == "ok"
    assert breaker.state("ETHUSDT") is CircuitState.CLOSED


async def test_errors_failure_on_refuses_are_no_verdict(
    autojump_clock: trio.testing.MockClock,
) -> None:
    breaker = CircuitBreaker(threshold=1, failure_on=Down)

    async def bug() -> None:
        raise KeyError("not the key's fault")

    for _ in range(3):
        with pytest.raises(KeyError):
            await breaker.call("ETHUSDT", bug)
    assert breaker.state("ETHUSDT") is CircuitState.CLOSED
    assert (breaker.statistics().failures, breaker.statistics().successes) == (0, 0)


async def test_a_permit_counts_only_its_first_verdict(
    autojump_clock: trio.testing.MockClock,
) -> None:
    breaker = CircuitBreaker(threshold=2)
    permit = breaker.admit("ETHUSDT")
    assert (permit.key, permit.probe, permit.settled) == ("ETHUSDT", False, False)
    permit.fail()
    permit.fail()
    permit.succeed()
    assert permit.settled
    assert breaker.state("ETHUSDT") is CircuitState.CLOSED
    assert (breaker.statistics().failures, breaker.statistics().successes) == (1, 0)


async def test_memory_is_bounded_by_forgetting_idle_closed_keys(
    autojump_clock: trio.testing.MockClock,
) -> None:
    breaker = CircuitBreaker(threshold=1, cooldown=60, max_keys=3)
    await fail_times(breaker, "A", 1)  # open: kept
    for key in ("B", "C", "D", "E"):
        await breaker.call(key, works)
    stats = breaker.statistics()
    assert stats.states == {"A": "open", "D": "closed", "E": "closed"}
    assert stats.forgotten == 2
    # With every key open, the least recently used one goes.
    breaker = CircuitBreaker(threshold=1, cooldown=60, max_keys=2)
    for key in ("A", "B", "C"):
        await fail_times(breaker, key, 1)
    assert breaker.statistics().states == {"B": "open", "C": "open"}


async def test_statistics_show_each_key_and_are_exported_on_metrics(
    autojump_clock: trio.testing.MockClock,
) -> None:
    breaker = CircuitBreaker(threshold=1, cooldown=30, name="quotes")
    await breaker.call("BTCUSDT", works)
    await fail_times(breaker, "ETHUSDT", 1)  # opens at 1, half-opens at 31
    await fail_times(breaker, "SOLUSDT", 1)  # opens at 1.5
    await trio.sleep_until(31)
    stats = breaker.statistics()
    assert stats.keys == {"closed": 1, "open": 1, "half_open": 1}
    assert stats.states == {"BTCUSDT": "closed", "ETHUSDT": "half_open", "SOLUSDT": "open"}
    assert stats.retry_at == {"SOLUSDT": 31.5}
    assert stats.open_keys() == {"SOLUSDT": 31.5}
    assert (stats.taken_at, stats.successes, stats.failures) == (31, 1, 2)
    registry = CollectorRegistry()
    registry.register(EngineCollector(None, {"quotes": breaker}, None))
    text = generate_latest(registry).decode()
    assert 'engine_breaker_keys{breaker="quotes",state="open"} 1.0' in text
    assert 'engine_breaker_keys{breaker="quotes",state="half_open"} 1.0' in text
    assert 'engine_breaker_opened_total{breaker="quotes"} 2.0' in text
    assert 'engine_breaker_rejected_total{breaker="quotes"} 0.0' in text
    assert "SOLUSDT" not in text  # per-key detail is for /status, not a label per key
    assert lint(text) == []


def test_circuit_open_survives_a_pickle_and_matches() -> None:
    error = pickle.loads(pickle.dumps(CircuitOpen("ETHUSDT", 31.5)))
    match error:
        case CircuitOpen("ETHUSDT", retry_at):
            assert retry_at == 31.5
        case _:
            pytest.fail(f"no match: {error!r}")
    assert str(CircuitOpen("ETHUSDT", None)) == (
        "circuit 'ETHUSDT' is half-open and its probe is in flight"
    )


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"threshold": 0}, ValueError, "threshold must be >= 1, got 0"),
        ({"window": 0}, ValueError, "window must be > 0"),
        ({"cooldown": math.inf}, ValueError, "cooldown must be finite"),
        ({"cooldown": "5"}, TypeError, "cooldown must be a number"),
        ({"max_keys": 0}, ValueError, "max_keys must be >= 1"),
        ({"failure_on": "Down"}, TypeError, "failure_on must be Exception types"),
        ({"name": ""}, ValueError, "name"),
    ],
)
def test_bad_settings_are_refused_naming_the_setting(
    kwargs: dict[str, object], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=re.escape(message)):
        CircuitBreaker(**kwargs)  # type: ignore[arg-type]  # deliberately wrong types
