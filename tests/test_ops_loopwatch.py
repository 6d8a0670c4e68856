"""The loop-stall detector: it names the task that blocks the loop, and the line."""

from __future__ import annotations

import logging
import math
import socket
import threading
import time

import pytest
import trio
import trio.lowlevel

import engine


def blocking_call(seconds: float) -> None:
    time.sleep(seconds)


async def blocker(seconds: float) -> None:
    await trio.lowlevel.checkpoint()
    blocking_call(seconds)  # a synchronous call inside a task: the bug of seed 004


@pytest.mark.parametrize(("per_step", "seconds"), [(False, 0.5), (True, 0.3)])
async def test_a_blocking_sleep_is_caught_named_and_counted(
    per_step: bool, seconds: float, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="engine.loop")
    with trio.fail_after(5):
        async with engine.open_loop_watch(per_step=per_step) as watch:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(blocker, seconds, name="blocker")
            await trio.sleep(0.1)  # the feeder wakes late once: the end of the stall
            stats = watch.statistics()

    assert (stats.stalls, stats.per_step, stats.threshold) == (1, per_step, 0.1)
    stall = stats.last_stall
    assert stall is not None
    assert stall.task == "blocker"
    assert not stall.ongoing
    assert stall.where is not None
    assert stall.where.endswith("in blocking_call: time.sleep(seconds)")
    assert "in blocker: blocking_call(seconds)" in stall.stack[-2]
    # Lag mode measures from the feeder's due time, so up to one poll less.
    assert seconds - 0.03 <= stall.seconds < seconds + 0.2
    assert stats.stall_seconds_total == stats.stall_seconds_max == stall.seconds

    # Logged twice: by the thread while it lasts, by the loop once it ends.
    while_stalled, after = (r for r in caplog.records if r.name == "engine.loop")
    assert "in task 'blocker' at " in while_stalled.getMessage()
    assert "still stalled" in while_stalled.getMessage()
    assert while_stalled.task == "blocker"  # type: ignore[attr-defined]  # from extra
    assert after.getMessage().startswith(f"event loop stalled {stall.seconds:.2f} s in task")
    assert after.levelno == logging.WARNING


async def test_a_busy_but_turning_loop_is_not_stalled() -> None:
    with trio.fail_after(5):
        async with engine.open_loop_watch(threshold=0.5) as watch:
            deadline = trio.current_time() + 0.3
            while trio.current_time() < deadline:
                blocking_call(0.002)  # many short steps, each far below the threshold
                await trio.lowlevel.checkpoint()
            assert watch.current_stall() is None
    assert watch.statistics().stalls == 0
    assert watch.statistics().last_stall is None


async def test_the_thread_sees_a_stall_while_it_lasts() -> None:
    seen: list[engine.LoopStall | None] = []
    watching: list[engine.LoopWatch] = []
    opened, stalled = threading.Event(), threading.Event()

    def observe() -> None:
        # Other threads may ask while the loop is blocked.
        opened.wait(3)
        (watch,) = watching
        deadline = time.monotonic() + 3
        while (stall := watch.current_stall()) is None and time.monotonic() < deadline:
            time.sleep(0.005)
        while stall is not None and stall.task is None and time.monotonic() < deadline:
            time.sleep(0.005)  # the watch thread is still sampling the stack
            stall = watch.current_stall()
        seen.append(stall)
        stalled.set()

    # Started before the watch opens: starting a thread waits for it to run,
    # and on a busy machine that wait alone can stall the loop, at another line.
    observer = threading.Thread(target=observe)
    observer.start()
    with trio.fail_after(5):
        async with engine.open_loop_watch() as watch:
            watching.append(watch)
            opened.set()
            stalled.wait(3)  # blocks the loop until the observer has seen the stall
            await trio.to_thread.run_sync(observer.join)

    (stall,) = seen
    assert stall is not None
    assert stall.ongoing
    assert stall.seconds > 0.1
    assert stall.where is not None
    assert "in test_the_thread_sees_a_stall_while_it_lasts: stalled.wait(3)" in stall.where


async def test_the_stall_answer_survives_garbage_on_the_port() -> None:
    # While the loop is blocked the watch thread answers the ops port; a
    # malformed request gets a 400 from the stdlib handler, not a crash.
    replies: list[bytes] = []
    done = threading.Event()

    def send_garbage(host: str, port: int) -> None:
        try:
            for request in (b"\x00garbage\r\n\r\n", b"GET /health HTTP/1.0\r\n\r\n"):
                with socket.create_connection((host, port), timeout=2) as conn:
                    conn.sendall(request)
                    replies.append(b"".join(iter(lambda: conn.recv(4096), b"")))
        finally:
            done.set()

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            ops: engine.OpsServer = await nursery.start(engine.serve_ops, None, "127.0.0.1", 0)
            sender = threading.Thread(target=send_garbage, args=(ops.host, ops.port))
            sender.start()
            done.wait(4)  # the loop stays blocked until both replies are in
            await trio.to_thread.run_sync(sender.join)
            nursery.cancel_scope.cancel()
    assert replies[0].startswith(b"HTTP/1.0 400 ")
    assert replies[1].startswith(b"HTTP/1.0 503 ")
    assert b'"kind":"loop_stalled"' in replies[1]


async def test_threshold_is_checked_and_inf_turns_detection_off() -> None:
    with pytest.raises(ValueError, match="threshold must be > 0"):
        async with engine.open_loop_watch(threshold=0):
            pass  # pragma: no cover
    with trio.fail_after(5):
        async with engine.open_loop_watch(threshold=math.inf) as watch:
            blocking_call(0.15)
            await trio.sleep(0.05)
    assert watch.statistics().stalls == 0
