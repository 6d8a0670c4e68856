"""engine.run, the Shutdown signal, and graceful stops (virtual time and real processes)."""

from __future__ import annotations

import logging
import math
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

import engine
from engine._runtime import StopSignals, _serve_main

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = Path(__file__).resolve().parent / "runtime_scripts"
# Real-time guards: generous, so a slow machine does not flake.
GUARD = 10
PROCESS_GUARD = 30


def never_returns() -> tuple[list[float], Callable[[], Awaitable[None]]]:
    """A main that ignores the stop request, and the times it was cancelled at."""
    cancelled_at: list[float] = []

    async def main() -> None:
        try:
            await trio.sleep_forever()
        except trio.Cancelled:
            cancelled_at.append(trio.current_time())
            raise

    return cancelled_at, main


async def request_at(when: float, reason: str = "test") -> None:
    await trio.sleep_until(when)
    engine.current_shutdown().request(reason)


# --- Shutdown ---------------------------------------------------------------


async def test_request_records_reason_signal_and_time(autojump_clock: trio.abc.Clock) -> None:
    shutdown = engine.current_shutdown()
    assert not shutdown.requested
    assert shutdown.reason is None
    assert shutdown.requested_at is None
    await trio.sleep(4)
    shutdown.request("received SIGTERM", signal=signal.SIGTERM)
    assert shutdown.requested
    assert shutdown.reason == "received SIGTERM"
    assert shutdown.signal == signal.SIGTERM
    assert shutdown.requested_at == 4
    assert not shutdown.forced
    assert shutdown.force_reason is None


async def test_first_request_wins(autojump_clock: trio.abc.Clock) -> None:
    shutdown = engine.current_shutdown()
    shutdown.request("first")
    await trio.sleep(1)
    shutdown.request("second", signal=signal.SIGINT)
    assert (shutdown.reason, shutdown.signal, shutdown.requested_at) == ("first", None, 0)


async def test_wait_returns_when_requested(autojump_clock: trio.abc.Clock) -> None:
    shutdown = engine.current_shutdown()
    woke_at: list[float] = []

    async def waiter() -> None:
        await shutdown.wait()
        woke_at.append(trio.current_time())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter)
        await trio.sleep(2)
        await trio.testing.wait_all_tasks_blocked()
        assert woke_at == []
        shutdown.request("test")
    assert woke_at == [2]


async def test_wait_checkpoints_when_already_requested() -> None:
    shutdown = engine.current_shutdown()
    shutdown.request("test")
    with trio.testing.assert_checkpoints():
        await shutdown.wait()


async def test_force_requests_first_and_first_force_wins(autojump_clock: trio.abc.Clock) -> None:
    shutdown = engine.current_shutdown()
    await trio.sleep(3)
    shutdown.force("operator")
    shutdown.force("later")
    assert shutdown.requested
    assert shutdown.forced
    assert (shutdown.reason, shutdown.requested_at, shutdown.force_reason) == (
        "operator",
        3,
        "operator",
    )
    with trio.testing.assert_checkpoints():
        await shutdown.wait_forced()


async def test_request_rejects_bad_arguments() -> None:
    shutdown = engine.current_shutdown()
    with pytest.raises(ValueError, match="reason"):
        shutdown.request("")
    with pytest.raises(TypeError, match="signal"):
        shutdown.request("test", signal="15")  # type: ignore[arg-type]  # the wrong type is the test
    with pytest.raises(ValueError, match="reason"):
        shutdown.force("")
    assert not shutdown.requested


async def test_current_shutdown_is_one_object_per_run() -> None:
    assert engine.current_shutdown() is engine.current_shutdown()


def test_each_run_gets_a_fresh_shutdown() -> None:
    async def requested_and_mark() -> tuple[engine.Shutdown, bool]:
        shutdown = engine.current_shutdown()
        was_requested = shutdown.requested
        shutdown.request("test")
        return shutdown, was_requested

    first, first_was_requested = trio.run(requested_and_mark)
    second, second_was_requested = trio.run(requested_and_mark)
    assert first is not second
    assert not first_was_requested
    assert not second_was_requested


def test_current_shutdown_outside_a_run_raises() -> None:
    with pytest.raises(RuntimeError):
        engine.current_shutdown()


# --- the grace period, in virtual time ---------------------------------------


async def test_main_returning_without_a_stop(autojump_clock: trio.abc.Clock) -> None:
    async def main(a: int, b: int) -> int:
        await trio.sleep(8)
        return a + b

    assert await _serve_main(main, (2, 3), 5) == 5
    assert trio.current_time() == 8
    assert not engine.current_shutdown().requested


async def test_main_is_cancelled_when_the_grace_expires(autojump_clock: trio.abc.Clock) -> None:
    cancelled_at, main = never_returns()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(request_at, 2)
        with pytest.raises(engine.ForcedShutdown) as excinfo:
            await _serve_main(main, (), 5)
    assert cancelled_at == [7]
    assert trio.current_time() == 7
    assert excinfo.value.reason == "grace period of 5 s expired (stop requested: test)"
    assert excinfo.value.signal is None
    assert excinfo.value.exit_status == 1
    assert engine.current_shutdown().forced


async def test_main_finishing_within_the_grace_returns_its_value(
    autojump_clock: trio.abc.Clock,
) -> None:
    shutdown = engine.current_shutdown()

    async def main() -> str:
        shutdown.request("test")
        await trio.sleep(3)  # in-flight work, not interrupted by the request
        return "done"

    assert await _serve_main(main, (), 5) == "done"
    assert trio.current_time() == 3
    await trio.sleep(10)  # past where the grace would have expired
    assert not shutdown.forced


async def test_zero_grace_cancels_at_once(autojump_clock: trio.abc.Clock) -> None:
    cancelled_at, main = never_returns()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(request_at, 2)
        with pytest.raises(engine.ForcedShutdown, match="grace period of 0 s expired"):
            await _serve_main(main, (), 0)
    assert cancelled_at == [2]


async def test_infinite_grace_waits_until_forced(autojump_clock: trio.abc.Clock) -> None:
    cancelled_at, main = never_returns()

    async def request_then_force() -> None:
        await request_at(1)
        await trio.sleep(10_000)
        assert cancelled_at == []
        engine.current_shutdown().force("operator")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(request_then_force)
        with pytest.raises(engine.ForcedShutdown) as excinfo:
            await _serve_main(main, (), math.inf)
    assert cancelled_at == [10_001]
    assert excinfo.value.reason == "operator (stop requested: test)"


async def test_grace_counts_from_a_request_made_before_main_started(
    autojump_clock: trio.abc.Clock,
) -> None:
    engine.current_shutdown().request("early")
    await trio.sleep(3)
    cancelled_at, main = never_returns()
    with pytest.raises(engine.ForcedShutdown):
        await _serve_main(main, (), 5)
    assert cancelled_at == [5]


async def test_force_cancels_main_before_the_grace_expires(
    autojump_clock: trio.abc.Clock,
) -> None:
    cancelled_at, main = never_returns()

    async def request_then_force() -> None:
        await request_at(1)
        await trio.sleep(2)
        engine.current_shutdown().force("received SIGINT while stopping")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(request_then_force)
        with pytest.raises(engine.ForcedShutdown, match="received SIGINT while stopping"):
            await _serve_main(main, (), 60)
    assert cancelled_at == [3]


async def test_an_outer_cancel_is_not_a_forced_shutdown(autojump_clock: trio.abc.Clock) -> None:
    cancelled_at, main = never_returns()
    with trio.move_on_after(2) as scope:
        await _serve_main(main, (), 5)
    assert scope.cancelled_caught
    assert cancelled_at == [2]
    assert not engine.current_shutdown().requested


# --- main's own outcome -------------------------------------------------------


async def test_main_exception_propagates_unchanged() -> None:
    async def main() -> None:
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom") as excinfo:
        await _serve_main(main, (), 5)
    assert type(excinfo.value) is ValueError  # not wrapped in a group


async def test_main_exception_group_stays_a_group() -> None:
    async def fail(exc: Exception) -> None:
        raise exc

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(fail, ValueError("a"))
            nursery.start_soon(fail, KeyError("b"))

    with pytest.RaisesGroup(ValueError, KeyError):
        await _serve_main(main, (), 5)


async def test_an_error_in_main_cleanup_beats_forced_shutdown(
    autojump_clock: trio.abc.Clock,
) -> None:
    async def main() -> None:
        try:
            await trio.sleep_forever()
        finally:
            raise RuntimeError("cleanup failed")

    engine.current_shutdown().request("test")
    with pytest.raises(RuntimeError, match="cleanup failed"):
        await _serve_main(main, (), 5)
    assert trio.current_time() == 5


# --- logging -----------------------------------------------------------------


async def test_stop_and_forced_stop_are_logged(
    autojump_clock: trio.abc.Clock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="engine.runtime")
    _, main = never_returns()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(request_at, 1, "received SIGTERM")
        with pytest.raises(engine.ForcedShutdown):
            await _serve_main(main, (), 2.5)
    assert [(r.name, r.levelno, r.getMessage()) for r in caplog.records] == [
        (
            "engine.runtime",
            logging.INFO,
            "stop requested (received SIGTERM); main has 2.5 s to finish",
        ),
        (
            "engine.runtime",
            logging.WARNING,
            "stop forced (grace period of 2.5 s expired); cancelling main",
        ),
    ]


async def test_infinite_grace_is_logged_as_no_limit(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="engine.runtime")

    async def main() -> None:
        engine.current_shutdown().request("test")
        await trio.testing.wait_all_tasks_blocked()

    await _serve_main(main, (), math.inf)
    assert caplog.messages == ["stop requested (test); main has no time limit to finish"]


# --- what signals do, in virtual time -----------------------------------------


async def test_first_signal_requests_and_second_forces(autojump_clock: trio.abc.Clock) -> None:
    shutdown = engine.current_shutdown()
    signals = StopSignals(shutdown)
    await trio.sleep(2)
    signals.on_signal(signal.SIGTERM)
    assert (shutdown.reason, shutdown.signal, shutdown.requested_at) == (
        "received SIGTERM",
        signal.SIGTERM,
        2,
    )
    assert not shutdown.forced
    signals.on_signal(signal.SIGINT)
    assert shutdown.force_reason == "received SIGINT while stopping"
    signals.on_signal(signal.SIGTERM)  # a third changes nothing
    assert shutdown.force_reason == "received SIGINT while stopping"
    assert shutdown.signal == signal.SIGTERM


async def test_a_signal_after_a_code_request_keeps_the_stop_graceful() -> None:
    shutdown = engine.current_shutdown()
    signals = StopSignals(shutdown)
    shutdown.request("config reload failed")
    signals.on_signal(signal.SIGTERM)
    assert not shutdown.forced
    assert shutdown.reason == "config reload failed"
    signals.on_signal(signal.SIGTERM)
    assert shutdown.forced


# --- engine.run in this process -----------------------------------------------


def test_run_returns_main_value_and_leaves_nothing_behind() -> None:
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    threads = threading.active_count()

    async def add(a: int, b: int) -> int:
        await trio.lowlevel.checkpoint()
        return a + b

    assert engine.run(add, 2, 3, grace_period=1) == 5
    assert {s: signal.getsignal(s) for s in handlers} == handlers
    assert threading.active_count() == threads


def test_run_propagates_main_exception_unchanged() -> None:
    async def main() -> None:
        raise KeyError("missing")

    with pytest.raises(KeyError, match="missing") as excinfo:
        engine.run(main)
    assert type(excinfo.value) is KeyError


def test_run_stops_gracefully_on_sigterm_sent_to_itself() -> None:
    async def main() -> tuple[int | None, str | None]:
        shutdown = engine.current_shutdown()
        os.kill(os.getpid(), signal.SIGTERM)
        with trio.fail_after(GUARD):  # a failure, not a hang, if the signal is lost
            await shutdown.wait()
        return shutdown.signal, shutdown.reason

    assert engine.run(main, grace_period=math.inf) == (signal.SIGTERM, "received SIGTERM")


def test_run_second_signal_raises_forced_shutdown() -> None:
    async def main() -> None:
        with trio.fail_after(GUARD):  # a failure, not a hang, if a signal is lost
            os.kill(os.getpid(), signal.SIGTERM)
            await engine.current_shutdown().wait()
            os.kill(os.getpid(), signal.SIGINT)
            await trio.sleep_forever()

    with pytest.raises(engine.ForcedShutdown) as excinfo:
        engine.run(main, grace_period=math.inf)
    assert excinfo.value.signal == signal.SIGTERM
    assert excinfo.value.exit_status == 128 + signal.SIGTERM
    assert excinfo.value.reason == (
        "received SIGINT while stopping (stop requested: received SIGTERM)"
    )


def test_run_counts_signals_that_arrive_while_the_loop_is_busy() -> None:
    async def main() -> None:
        # No checkpoint between the two: both wait in trio's queue at once.
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)
        with trio.fail_after(GUARD):  # a failure, not a hang, if they merge into one
            await trio.sleep_forever()

    with pytest.raises(engine.ForcedShutdown, match="received SIGTERM while stopping"):
        engine.run(main, grace_period=math.inf)


async def idle() -> None:
    await trio.lowlevel.checkpoint()


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"grace_period": -1}, ValueError, "grace_period must be >= 0"),
        ({"grace_period": math.nan}, ValueError, "grace_period must not be NaN"),
        ({"grace_period": "5"}, TypeError, "grace_period must be a number"),
        ({"grace_period": True}, TypeError, "grace_period must be a number"),
        ({"main": None}, TypeError, "main must be an async function"),
    ],
)
def test_run_rejects_bad_arguments(
    kwargs: dict[str, Any], error: type[Exception], match: str
) -> None:
    main = kwargs.pop("main", idle)
    with pytest.raises(error, match=match):
        engine.run(main, **kwargs)


def test_run_rejects_a_coroutine_object_without_leaking_it() -> None:
    with pytest.raises(TypeError, match=r"pass main, not main\(\)"):
        engine.run(idle())  # type: ignore[arg-type]  # the classic mistake is the test


def test_run_in_another_thread_needs_handle_signals_false() -> None:
    results: list[object] = []

    def target(handle_signals: bool) -> None:
        try:
            results.append(engine.run(idle, handle_signals=handle_signals))
        except RuntimeError as exc:
            results.append(exc)

    for handle_signals in (True, False):
        thread = threading.Thread(target=target, args=(handle_signals,))
        thread.start()
        thread.join(PROCESS_GUARD)
        assert not thread.is_alive()
    refused, ran = results
    assert isinstance(refused, RuntimeError)
    assert "handle_signals=False" in str(refused)
    assert ran is None


# --- real processes ------------------------------------------------------------


class Child:
    """A child Python process whose stdout and stderr are read line by line."""

    def __init__(self, process: trio.Process) -> None:
        assert process.stdout is not None
        self.process = process
        self._stdout = process.stdout
        self._buffer = bytearray()
        self.lines: list[str] = []

    async def _readline(self) -> str | None:
        while b"\n" not in self._buffer:
            chunk = await self._stdout.receive_some()
            if not chunk:
                return None
            self._buffer += chunk
        line, _, rest = bytes(self._buffer).partition(b"\n")
        self._buffer[:] = rest
        self.lines.append(line.decode())
        return self.lines[-1]

    async def wait_for_line(self, wanted: str) -> None:
        while (line := await self._readline()) != wanted:
            assert line is not None, f"exited before printing {wanted!r}: {self.lines}"

    async def wait_for_exit(self) -> int:
        while await self._readline() is not None:
            pass
        return await self.process.wait()


async def start_child(nursery: trio.Nursery, *argv: str | Path) -> Child:
    process: trio.Process = await nursery.start(
        partial(
            trio.run_process,
            [sys.executable, *map(str, argv)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            check=False,
            cwd=ROOT,
        )
    )
    return Child(process)


@pytest.mark.subprocess
@pytest.mark.parametrize("first_signal", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_process_finishes_in_flight_work_and_exits_zero(
    first_signal: signal.Signals,
) -> None:
    with trio.fail_after(PROCESS_GUARD):
        async with trio.open_nursery() as nursery:
            child = await start_child(nursery, SCRIPTS / "graceful_worker.py")
            await child.wait_for_line("ready")
            child.process.send_signal(first_signal)
            status = await child.wait_for_exit()
    assert status == 0, child.lines
    requested = child.lines.index(f"stop requested: received {first_signal.name}")
    started = [line for line in child.lines[:requested] if line.startswith("started item ")]
    item = started[-1].removeprefix("started item ")
    # The item in flight when the stop came finished; nothing started after it.
    assert child.lines[requested + 1 :] == [f"finished item {item}", "stopped cleanly"]


@pytest.mark.subprocess
async def test_process_second_signal_stops_it_at_once() -> None:
    with trio.fail_after(PROCESS_GUARD):
        async with trio.open_nursery() as nursery:
            child = await start_child(nursery, SCRIPTS / "ignores_shutdown.py", "30")
            await child.wait_for_line("ready")
            child.process.send_signal(signal.SIGTERM)
            await child.wait_for_line("stop requested: received SIGTERM")
            second_sent = trio.current_time()
            child.process.send_signal(signal.SIGINT)
            status = await child.wait_for_exit()
            took = trio.current_time() - second_sent
    assert status == 128 + signal.SIGTERM, child.lines
    assert took < 10  # far inside the 30 s grace, even on a slow machine
    assert "forced: received SIGINT while stopping (stop requested: received SIGTERM)" in (
        child.lines
    )


@pytest.mark.subprocess
async def test_process_is_stopped_when_the_grace_expires() -> None:
    with trio.fail_after(PROCESS_GUARD):
        async with trio.open_nursery() as nursery:
            child = await start_child(nursery, SCRIPTS / "ignores_shutdown.py", "0.3")
            await child.wait_for_line("ready")
            sent = trio.current_time()
            child.process.send_signal(signal.SIGTERM)
            status = await child.wait_for_exit()
            took = trio.current_time() - sent
    assert status == 128 + signal.SIGTERM, child.lines
    assert 0.3 <= took < 10
    assert "forced: grace period of 0.3 s expired (stop requested: received SIGTERM)" in (
        child.lines
    )


@pytest.mark.subprocess
async def test_process_exits_zero_when_a_signal_races_main_returning() -> None:
    with trio.fail_after(PROCESS_GUARD):
        async with trio.open_nursery() as nursery:
            child = await start_child(nursery, SCRIPTS / "signal_as_main_returns.py")
            status = await child.wait_for_exit()
    assert status == 0, child.lines
    assert child.lines == ["engine.run returned 'done'"]


@pytest.mark.subprocess
async def test_docs_example_stops_gracefully() -> None:
    with trio.fail_after(PROCESS_GUARD):
        async with trio.open_nursery() as nursery:
            child = await start_child(nursery, ROOT / "docs" / "examples" / "runtime_graceful.py")
            status = await child.wait_for_exit()
    assert status == 0, child.lines
    lines = child.lines
    assert "processing item 3" in lines
    requested = lines.index(
        "engine.runtime: stop requested (received SIGTERM); main has 5 s to finish"
    )
    item = lines[requested - 1].removeprefix("processing item ")
    done = int(item)
    assert done >= 3
    assert lines[requested + 1 :] == [
        f"finished item {item}",
        f"stopped after {done} items (received SIGTERM)",
        f"engine.run returned {done}; exit status 0",
    ]
    started = [line for line in lines if line.startswith("processing item")]
    finished = [line for line in lines if line.startswith("finished item")]
    assert len(started) == len(finished) == done


def test_docs_page_quotes_the_example_as_it_is() -> None:
    example = (ROOT / "docs" / "examples" / "runtime_graceful.py").read_text()
    quoted = example[example.index("async def process") :].strip()
    assert quoted in (ROOT / "docs" / "runtime.md").read_text()
