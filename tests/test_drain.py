"""Supervisor.shutdown(): children stop last started first, drain within budget, are counted."""

from __future__ import annotations

import logging
import math
import threading

import pytest
import trio
import trio.testing

import engine

VIRTUAL_GUARD = 1000


async def drains_on_stop(name: str, log: list[str]) -> None:
    """A child that takes part: waits for its stop request, then returns."""
    stop = engine.current_stop()
    await stop.wait()
    log.append(f"{name} stopping ({stop.reason})")
    await trio.sleep(0.1)  # finishing its work
    log.append(f"{name} stopped")


async def test_children_stop_last_started_first_each_before_the_next(
    autojump_clock: trio.testing.MockClock,
) -> None:
    log: list[str] = []
    with trio.fail_after(VIRTUAL_GUARD):
        async with engine.open_supervisor(name="app") as sup:
            for name in ("source", "middle", "sink"):
                sup.start_soon(drains_on_stop, name, log, name=name)
            await trio.sleep(1)
            report = await sup.shutdown("time to go")
            log.append("body goes on")
    assert log == [
        "sink stopping (time to go)",
        "sink stopped",
        "middle stopping (time to go)",
        "middle stopped",
        "source stopping (time to go)",
        "source stopped",
        "body goes on",
    ]
    assert [c.name for c in report.children] == ["sink", "middle", "source"]
    assert {c.outcome for c in report.children} == {"returned"}
    assert [c.seconds for c in report.children] == pytest.approx([0.1, 0.1, 0.1])
    assert report.graceful
    assert report.dropped == 0
    assert report.seconds == pytest.approx(0.3)
    assert [c.state for c in sup.statistics().children] == [engine.ChildState.STOPPED] * 3


async def test_a_child_that_never_asked_for_its_stop_is_cancelled_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with engine.open_supervisor() as sup:
        sup.start_soon(trio.sleep_forever, name="oblivious", shutdown=30)
        await trio.sleep(1)
        report = await sup.shutdown()
    [child] = report.children
    assert (child.outcome, child.seconds, child.budget) == ("cancelled", 0.0, 30.0)
    assert not report.graceful


async def test_a_draining_child_past_its_budget_is_cancelled_and_told_why(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    seen: list[str | None] = []

    async def slow_to_stop() -> None:
        stop = engine.current_stop()
        await stop.wait()
        try:
            await trio.sleep_forever()
        finally:
            seen.append(stop.force_reason)

    async with engine.open_supervisor() as sup:
        sup.start_soon(slow_to_stop, name="slow", shutdown=2)
        await trio.sleep(1)
        report = await sup.shutdown()
    [child] = report.children
    assert (child.outcome, child.seconds) == ("cancelled", 2.0)
    assert seen == ["shutdown budget of 2 s expired"]
    assert "child 'slow' cancelled at shutdown: shutdown budget of 2 s expired" in caplog.text


async def test_what_a_cancelled_child_held_is_counted_and_logged(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    send, receive = engine.open_channel[int](100)

    async def wedged(message: int) -> None:
        await trio.sleep_forever()  # the sink hangs: the queue cannot drain

    for i in range(10):
        send.send_nowait(i)
    async with engine.open_supervisor() as sup:
        group = engine.Consumers(wedged, name="sink")
        sup.start_soon(
            group.run, receive, name="sink", shutdown=1, holds=lambda: send.statistics().depth
        )
        await trio.sleep(1)
        with caplog.at_level(logging.WARNING):
            report = await sup.shutdown()
    [child] = report.children
    assert (child.outcome, child.dropped) == ("cancelled", 9)  # one was in the handler
    assert report.dropped == 9
    assert "child 'sink' dropped 9 held at shutdown (cancelled)" in caplog.text


async def test_a_source_stops_first_and_the_consumers_empty_the_queue(
    autojump_clock: trio.testing.MockClock,
) -> None:
    send, receive = engine.open_channel[int](1000, overflow="block")
    produced: list[int] = []
    handled: list[int] = []
    backlog = trio.Event()

    async def source() -> None:
        stop = engine.current_stop()
        i = 0
        while not stop.requested:
            await send.send(i)
            produced.append(i)
            i += 1
            if send.statistics().depth >= 900:  # a backlog, with the source still going
                backlog.set()
            if i % 50 == 0:
                await trio.sleep(0.01)

    async def handle(message: int) -> None:
        await trio.sleep(0.001)
        handled.append(message)

    async with engine.open_supervisor() as sup:
        group = engine.Consumers(handle, workers=4, name="sink")
        await sup.start(group.run, receive, name="sink", holds=lambda: send.statistics().depth)
        sup.start_soon(source, name="source", shutdown=1)
        await backlog.wait()
        report = await sup.shutdown()
    assert [(c.name, c.outcome, c.dropped) for c in report.children] == [
        ("source", "returned", None),
        ("sink", "returned", 0),
    ]
    assert len(produced) > 900
    assert sorted(handled) == produced
    assert report.graceful


async def test_nothing_restarts_or_starts_once_shutting_down(
    autojump_clock: trio.testing.MockClock,
) -> None:
    runs: list[str] = []

    async def crashes() -> None:
        runs.append("crashes")
        raise RuntimeError("boom")

    async def returns_when_stopped() -> None:
        runs.append("permanent")
        await engine.current_stop().wait()

    async with engine.open_supervisor(max_restarts=10, period=60) as sup:
        sup.start_soon(crashes, name="crashes", backoff=engine.Backoff(initial=5, jitter=0))
        sup.start_soon(returns_when_stopped, name="permanent")
        await trio.sleep(1)  # crashes is backing off for 5 s
        report = await sup.shutdown()
        with pytest.raises(RuntimeError, match="shutting down"):
            sup.start_soon(trio.sleep_forever, name="late")
        await trio.sleep(60)
    assert sorted(runs) == ["crashes", "permanent"]  # each ran once: no restart
    assert [(c.name, c.outcome) for c in report.children] == [
        ("permanent", "returned"),
        ("crashes", "not_running"),
    ]
    states = {c.name: c.state for c in sup.statistics().children}
    assert states == {"crashes": engine.ChildState.STOPPED, "permanent": engine.ChildState.STOPPED}


async def test_a_child_that_fails_while_stopping_is_reported_not_restarted(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def fails_on_stop() -> None:
        await engine.current_stop().wait()
        raise OSError("flush failed")

    async with engine.open_supervisor() as sup:
        sup.start_soon(fails_on_stop, name="flusher")
        await trio.sleep(1)
        report = await sup.shutdown()
    [child] = report.children
    assert (child.outcome, child.error) == ("failed", "OSError: flush failed")
    assert sup.statistics().children[0].state is engine.ChildState.FAILED


async def test_a_second_shutdown_waits_for_the_first_and_gets_its_report(
    autojump_clock: trio.testing.MockClock,
) -> None:
    reports: list[engine.ShutdownReport] = []
    async with engine.open_supervisor() as sup:
        sup.start_soon(drains_on_stop, "a", [], name="a")
        await trio.sleep(1)
        async with trio.open_nursery() as nursery:
            for _ in range(2):
                nursery.start_soon(lambda: _append(reports, sup.shutdown()))
    assert len(reports) == 2
    assert reports[0] is reports[1]


async def _append(
    reports: list[engine.ShutdownReport], shutdown: object
) -> None:  # a coroutine, awaited here
    reports.append(await shutdown)  # type: ignore[misc]


async def test_shutdown_arguments_are_checked() -> None:
    async with engine.open_supervisor() as sup:
        with pytest.raises(ValueError, match="reason"):
            await sup.shutdown("")
        with pytest.raises(ValueError, match="shutdown must be >= 0"):
            sup.start_soon(trio.sleep_forever, name="x", shutdown=-1)
        with pytest.raises(TypeError, match="shutdown must be a number"):
            sup.start_soon(trio.sleep_forever, name="x", shutdown="5")  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="holds must be a callable"):
            sup.start_soon(trio.sleep_forever, name="x", holds=3)  # type: ignore[arg-type]
        sup.cancel()


async def test_cancel_cancels_the_body_too_and_shutdown_does_not(
    autojump_clock: trio.testing.MockClock,
) -> None:
    after: list[str] = []
    async with engine.open_supervisor() as sup:
        sup.start_soon(trio.sleep_forever, name="a")
        await sup.shutdown()
        await trio.sleep(1)
        after.append("after shutdown")
    async with engine.open_supervisor() as sup:
        sup.start_soon(trio.sleep_forever, name="a")
        sup.cancel()
        await trio.sleep(1)
        after.append("after cancel")  # never runs: the body was cancelled
    assert after == ["after shutdown"]


async def test_a_nested_supervisor_drains_when_its_child_is_asked_to_stop(
    autojump_clock: trio.testing.MockClock,
) -> None:
    log: list[str] = []

    async def subtree() -> None:
        async with engine.open_supervisor(name="inner") as inner:
            inner.start_soon(drains_on_stop, "inner-a", log, name="a")
            inner.start_soon(drains_on_stop, "inner-b", log, name="b")
            await engine.current_stop().wait()
        log.append("subtree done")

    async with engine.open_supervisor(name="outer") as sup:
        sup.start_soon(drains_on_stop, "first", log, name="first")
        sup.start_soon(subtree, name="subtree", shutdown=math.inf)
        await trio.sleep(1)
        report = await sup.shutdown("bye")
    assert log == [
        "inner-b stopping (bye)",
        "inner-b stopped",
        "inner-a stopping (bye)",
        "inner-a stopped",
        "subtree done",
        "first stopping (bye)",
        "first stopped",
    ]
    assert [c.outcome for c in report.children] == ["returned", "returned"]


async def test_outside_a_supervised_child_current_stop_is_the_runs_shutdown() -> None:
    assert engine.current_stop() is engine.current_shutdown()
    seen: list[bool] = []

    async def child() -> None:
        seen.append(engine.current_stop() is engine.current_shutdown())

    async with engine.open_supervisor() as sup:
        await sup.start(_ready_then, child, name="c", restart="temporary")
    assert seen == [False]


async def _ready_then(fn: object, *, task_status: trio.TaskStatus[None]) -> None:
    task_status.started()
    await fn()  # type: ignore[operator]


def test_engine_run_grace_period_bounds_the_whole_drain() -> None:
    stopped: list[str | None] = []

    async def never_done(watching: trio.Event) -> None:
        stop = engine.current_stop()
        watching.set()
        await stop.wait()
        try:
            await trio.sleep_forever()  # drains for ever
        finally:
            stopped.append(stop.force_reason)

    async def main() -> None:
        watching = trio.Event()
        async with engine.open_supervisor() as sup:
            sup.start_soon(never_done, watching, name="stuck", shutdown=math.inf)
            await watching.wait()
            engine.current_shutdown().request("test")
            await engine.current_shutdown().wait()
            await sup.shutdown()

    def run() -> None:
        engine.run(main, grace_period=0.3, handle_signals=False)

    outcome: list[BaseException] = []

    def target() -> None:
        try:
            run()
        except BaseException as exc:  # checked below
            outcome.append(exc)

    thread = threading.Thread(target=target)
    thread.start()
    thread.join(10)
    assert not thread.is_alive()
    [error] = outcome
    assert isinstance(error, engine.ForcedShutdown)
    assert "grace period of 0.3 s expired" in str(error)
    assert stopped == [None]  # cancelled with main, before its own (infinite) budget


async def test_stop_one_child_drains_it_like_shutdown(
    autojump_clock: trio.testing.MockClock,
) -> None:
    log: list[str] = []
    async with engine.open_supervisor() as sup:
        sup.start_soon(drains_on_stop, "a", log, name="a")
        sup.start_soon(trio.sleep_forever, name="b")
        await trio.sleep(1)
        a = await sup.stop("a")
        b = await sup.stop("b")
        await trio.sleep(10)  # neither is restarted, though both are permanent
        assert sup.children == ()
    assert log == ["a stopping (stop('a') was called)", "a stopped"]
    assert a.outcome == "returned"
    assert a.seconds == pytest.approx(0.1)
    assert (b.outcome, b.seconds) == ("cancelled", 0.0)
