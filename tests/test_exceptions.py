"""Every engine exception survives pickling: errors cross process boundaries."""

from __future__ import annotations

import pickle

import pytest

import engine

EXAMPLES: list[engine.EngineError] = [
    engine.EngineError("plain"),
    engine.ChildStartError("feed", "OSError: refused"),
    engine.ChildStalled("feed", 30.0, 31.5),
    engine.RestartIntensityExceeded(
        "root", "feed", 3, 10.0, [engine.FailureRecord(1.0, "feed", "OSError: x")]
    ),
    engine.ForcedShutdown("grace expired", 15),
    engine.SubscriberDisconnected(("trades.>",), 10, 90),
    engine.SerializationError("result", "of f: <lock>"),
    engine.WorkerCrashed("calling f", exit_code=None, signal=9),
]


@pytest.mark.parametrize("error", EXAMPLES, ids=lambda e: type(e).__name__)
def test_exceptions_round_trip_through_pickle(error: engine.EngineError) -> None:
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is type(error)
    assert str(copy) == str(error)
    assert vars(copy) == vars(error)


def test_every_exception_derives_from_engine_error() -> None:
    for name in engine.__all__:
        value = getattr(engine, name)
        if isinstance(value, type) and issubclass(value, BaseException):
            assert issubclass(value, engine.EngineError), name


def test_exceptions_match_on_the_arguments_they_were_built_from() -> None:
    error: engine.EngineError = engine.ChildStalled("feed", 30.0, 31.5)
    match error:
        case engine.ChildStartError(child, reason):
            pytest.fail(f"matched the wrong class: {child} {reason}")
        case engine.ChildStalled(child, stall_after, silent_for):
            assert (child, stall_after, silent_for) == ("feed", 30.0, 31.5)
        case _:
            pytest.fail("no case matched")
