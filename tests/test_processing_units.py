"""The processing engine's parts without worker processes: limits, values, the formula service."""

from __future__ import annotations

import datetime
import logging
import math
import pickle

import attrs
import numpy as np
import pytest

from services.market.candles import Candles, DateRange
from services.market.processing import (
    WARMUP_FACTOR,
    FormulaService,
    Parameters,
    ProcessingJob,
    ProcessingResult,
)
from services.market.processing._limits import (
    FILES_PER_WORKER,
    FILES_RESERVED,
    TASKS_PER_WORKER,
    WORKER_MEMORY,
    SystemLimits,
    resolve_max_workers,
)
from services.market.scans import parse_formula

ROOMY = SystemLimits(
    cpus=8, tasks=None, tasks_in_use=0, files=None, files_in_use=0, memory_available=None
)


def test_max_workers_defaults_to_the_cpu_count_or_4() -> None:
    assert resolve_max_workers(None, ROOMY) == 8
    assert resolve_max_workers(None, attrs.evolve(ROOMY, cpus=None)) == 4
    assert resolve_max_workers(3, ROOMY) == 3


def test_max_workers_past_the_process_limit_is_refused_naming_it() -> None:
    limits = attrs.evolve(ROOMY, tasks=1000, tasks_in_use=980)
    room = 20 // TASKS_PER_WORKER
    assert resolve_max_workers(room, limits) == room
    with pytest.raises(ValueError, match=rf"RLIMIT_NPROC is 1000 .* room for {room} workers"):
        resolve_max_workers(room + 1, limits)
    with pytest.raises(ValueError, match="room for 0 workers"):
        resolve_max_workers(1, attrs.evolve(limits, tasks_in_use=1000))


def test_max_workers_past_the_descriptor_limit_is_refused_naming_it() -> None:
    limits = attrs.evolve(ROOMY, files=1024, files_in_use=100)
    room = (1024 - 100 - FILES_RESERVED) // FILES_PER_WORKER
    assert resolve_max_workers(room, limits) == room
    with pytest.raises(ValueError, match=rf"RLIMIT_NOFILE is 1024 with 100 open, room for {room}"):
        resolve_max_workers(room + 1, limits)


def test_max_workers_past_available_memory_is_refused_naming_it() -> None:
    limits = attrs.evolve(ROOMY, memory_available=10 * WORKER_MEMORY)
    assert resolve_max_workers(10, limits) == 10
    with pytest.raises(ValueError, match="exceeds available memory: 640 MiB holds 10 workers"):
        resolve_max_workers(11, limits)


def test_more_workers_than_cpus_is_allowed_with_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="market.processing"):
        assert resolve_max_workers(9, ROOMY) == 9
    assert "max_workers=9 is more than the 8 CPUs" in caplog.text


def test_the_current_limits_are_read() -> None:
    limits = SystemLimits.current()
    assert limits.files_in_use > 0
    assert limits.cpus is None or limits.cpus >= 1
    assert limits.memory_available is None or limits.memory_available > 0


def test_parameters_are_a_frozen_hashable_picklable_mapping() -> None:
    parameters = Parameters({"period": 14})
    assert parameters == {"period": 14}
    assert dict(parameters) == {"period": 14}
    assert hash(parameters) == hash(Parameters([("period", 14)]))
    assert pickle.loads(pickle.dumps(parameters)) == parameters
    assert repr(parameters) == "Parameters({'period': 14})"
    with pytest.raises(TypeError):
        parameters["period"] = 7  # type: ignore[index]
    with pytest.raises(TypeError, match="parameters must be a mapping"):
        ProcessingJob(["SYM1"], "1d", JANUARY, "rsi14 < 30", parameters=[("a", 1)])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="parameter names must be strings"):
        ProcessingJob(["SYM1"], "1d", JANUARY, "rsi14 < 30", parameters={1: 2})  # type: ignore[dict-item]


JANUARY = DateRange(datetime.date(2024, 1, 1), datetime.date(2024, 1, 31))


def test_a_job_pickles_whole() -> None:
    job = ProcessingJob(["SYM1"], "1d", JANUARY, "rsi(period) < 30", parameters={"period": 9})
    again = pickle.loads(pickle.dumps(job))
    assert again == job
    assert again.formula is not None
    assert again.formula.canonical() == "rsi9 < 30"
    with pytest.raises(TypeError, match="formula must be a string, a Formula or None"):
        ProcessingJob(["SYM1"], "1d", JANUARY, 3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="id must be a non-empty string"):
        ProcessingJob(["SYM1"], "1d", JANUARY, id="")


def test_results_with_nan_values_equal_their_copies() -> None:
    result = ProcessingResult("SYM1", (1, 2), {"rsi14": math.nan}, 1.5)
    assert result == pickle.loads(pickle.dumps(result))
    assert result.ok
    assert result != ProcessingResult("SYM1", (1, 2), {"rsi14": 3.0}, 1.5)
    assert result != ProcessingResult("SYM1", (1, 2), {}, 1.5)
    assert result != "SYM1"
    assert not ProcessingResult("SYM1", error="boom").ok


def _candles(closes: list[float], first_ms: int = 0) -> Candles:
    times = first_ms + 86_400_000 * np.arange(len(closes))
    prices = np.array(closes, dtype=float)
    return Candles(times, prices, prices, prices, prices, np.ones(len(closes)))


def test_evaluate_reports_matching_bars_from_the_start_and_the_last_values() -> None:
    service = FormulaService()
    formula = parse_formula("close > sma3")
    candles = _candles([1, 2, 3, 4, 1, 5])  # sma3 from the third bar: 2, 3, 2.67, 3.33
    matches, values = service.evaluate(formula, candles)
    day = 86_400_000
    assert matches == (2 * day, 3 * day, 5 * day)
    assert values["close"] == 5.0
    assert values["sma3"] == pytest.approx(10 / 3)
    matches, _ = service.evaluate(formula, candles, start_ms=4 * day)
    assert matches == (5 * day,)
    # A start after every bar: nothing matches, and there is no last bar in range.
    matches, values = service.evaluate(formula, candles, start_ms=10 * day)
    assert matches == ()
    assert all(math.isnan(v) for v in values.values())


def test_warmup_reads_a_window_once_and_a_smoothed_indicator_three_times() -> None:
    service = FormulaService()
    assert service.warmup_bars(parse_formula("close > open")) == 0
    assert service.warmup_bars(parse_formula("close > sma50")) == 50
    assert service.warmup_bars(parse_formula("rsi14 < 30")) == WARMUP_FACTOR * 15
    assert service.warmup_bars(parse_formula("rsi14 < 30 and close > sma200")) == 200


def test_an_outcome_without_a_value_becomes_a_result_saying_why() -> None:
    import engine
    from services.market.processing._engine import TIMEOUT_ERROR, _result

    def outcome(status: engine.Status, error: BaseException | None) -> engine.Outcome[str, object]:
        return engine.Outcome(0, "SYM1", status, None, error, 0.0, 0.25)

    assert _result(outcome(engine.Status.ERROR, ValueError("bad bar"))) == ProcessingResult(
        "SYM1", (), {}, 250.0, "bad bar"
    )
    # An exception without a message is named by its type.
    assert _result(outcome(engine.Status.ERROR, ValueError())).error == "ValueError"
    assert _result(outcome(engine.Status.TIMEOUT, TimeoutError())).error == TIMEOUT_ERROR
    assert _result(outcome(engine.Status.CANCELLED, None)).error == "Processing cancelled"
    crashed = engine.WorkerCrashed("calling x", exit_code=None, signal=9)
    assert _result(outcome(engine.Status.CRASHED, crashed)).error == (
        "worker process killed by SIGKILL while processing SYM1"
    )
