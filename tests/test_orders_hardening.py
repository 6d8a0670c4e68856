"""The order log cannot be held by its file: a FIFO, a directory, a hung file system.

A path that names something other than a regular file is never opened (a
FIFO's waiting writer is never woken), and is waited on as a missing file
is; a file-system call that never returns (a dead network mount, played
here by a tail, given through ``tail_factory``, that blocks on an event) is
abandoned when the follower is cancelled, counted, and the file it holds is
closed when it returns; hung calls, closes included, hold no more than the
log's own threads. Tests that time how promptly a cancelled follower
returns, or that wait out a hung close, use the real clock and bound it;
the others use the autojump clock.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import trio
import trio.testing

import engine
from engine.bus import MemoryBus
from services.market.orders import OrderLog, OrderLogConfig
from services.market.orders._log import CLOSE_WAIT, FILE_THREADS
from services.market.orders._regions import FileRef
from services.market.orders._tail import Event, Look, Tail
from tests.test_market_service import service_process, wait_for

GUARD = 1000  # virtual seconds: an absolute bound under the autojump clock
REAL_GUARD = 30  # real seconds: an absolute bound for the real-clock tests
PROMPT = 2.0  # real seconds a cancelled follower may take to return, at most
# Real seconds after which a test's safety net unblocks a call that the code
# under test must never wait on: if it does wait, the test fails on its
# asserts rather than hanging.
SAFETY = 8.0


def line(oid: int) -> bytes:
    body = {"coin": "BTC", "side": "B", "limitPx": "1.5", "sz": "1", "oid": oid, "timestamp": 1}
    record = {"time": f"t{oid}", "user": "0xabc", "status": "open", "order": body}
    return json.dumps(record).encode() + b"\n"


def descriptors_of(path: Path) -> list[int]:
    """This process's open descriptors of ``path``."""
    found = []
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # the listing's own descriptor, gone already
            if os.readlink(f"/proc/self/fd/{name}") == str(path):
                found.append(int(name))
    return found


def _open_writer(path: Path) -> None:
    """Open and close the FIFO ``path`` for writing: a reader blocked in open() returns."""
    with contextlib.suppress(OSError):  # ENXIO: no reader waiting, nothing to unblock
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))


@contextlib.contextmanager
def unblocking_after(
    seconds: float, action: Callable[..., object], *args: object
) -> Iterator[None]:
    """Run ``action(*args)`` after ``seconds`` in a timer thread, and again as the block ends.

    The second run unblocks whatever a failed test left blocked, so no
    thread outlives the test (``action`` must be harmless to repeat).
    """
    timer = threading.Timer(seconds, action, args)
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
        timer.join()
        action(*args)


# -- not a regular file ------------------------------------------------------------------


def _make(kind: str, path: Path) -> None:
    if kind == "fifo":
        os.mkfifo(path)
    else:
        path.mkdir()


@pytest.mark.parametrize(("kind", "described"), [("fifo", "a FIFO"), ("dir", "a directory")])
async def test_a_path_that_is_not_a_regular_file_is_refused_and_waited_on(
    tmp_path: Path,
    autojump_clock: trio.testing.MockClock,
    caplog: pytest.LogCaptureFixture,
    kind: str,
    described: str,
) -> None:
    path = tmp_path / "orders.log"
    _make(kind, path)
    log = OrderLog(OrderLogConfig(path, poll_interval=1.0, workers=0), MemoryBus())
    caplog.set_level(logging.WARNING, logger="market.orders")
    with unblocking_after(SAFETY, _open_writer, path), trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(log.follow)
            await trio.sleep(3.5)  # four looks at the path, one refusal
            stats = log.statistics()
            assert (stats.following, stats.refusals, stats.refused) == (False, 1, described)
            assert descriptors_of(path) == []  # not held open
            cancelled_at = trio.current_time()
            nursery.cancel_scope.cancel()
        assert trio.current_time() == cancelled_at
    warnings = [r.getMessage() for r in caplog.records if r.name == "market.orders"]
    assert warnings == [f"{path} is {described}, not a regular file: not opened; "
                        "waiting for a regular file there"]  # fmt: skip
    assert not log.statistics().following


async def test_a_fifo_replaced_by_a_regular_file_is_followed(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    path = tmp_path / "orders.log"
    os.mkfifo(path)
    bus = MemoryBus()
    log = OrderLog(OrderLogConfig(path, poll_interval=1.0, workers=0, publish="order"), bus)
    with unblocking_after(SAFETY, _open_writer, path), trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery, bus.subscribe("orders.>", maxsize=100) as sub:
            nursery.start_soon(log.follow)
            await trio.sleep(2.5)
            assert log.statistics().refused == "a FIFO"
            await engine.to_thread(path.unlink)
            await engine.to_thread(path.write_bytes, line(1))
            message = await anext(sub)
            assert json.loads(message.data)["oid"] == 1
            stats = log.statistics()
            assert (stats.following, stats.refusals, stats.refused) == (True, 1, "")
            nursery.cancel_scope.cancel()


async def test_a_rotation_to_a_fifo_keeps_following_the_old_file(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    path = tmp_path / "orders.log"
    path.write_bytes(line(1))
    bus = MemoryBus()
    log = OrderLog(OrderLogConfig(path, poll_interval=1.0, workers=0, publish="order"), bus)
    with unblocking_after(SAFETY, _open_writer, path), trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery, bus.subscribe("orders.>", maxsize=100) as sub:
            await nursery.start(log.follow)
            assert json.loads((await anext(sub)).data)["oid"] == 1
            await engine.to_thread(path.rename, tmp_path / "orders.log.1")
            await engine.to_thread(os.mkfifo, path)
            await trio.sleep(2.5)
            stats = log.statistics()
            assert (stats.refusals, stats.refused, stats.rotations) == (1, "a FIFO", 0)
            # The old file, still followed, gets one more line from its writer.
            await engine.to_thread(_append, tmp_path / "orders.log.1", line(2))
            assert json.loads((await anext(sub)).data)["oid"] == 2
            await engine.to_thread(path.unlink)
            await engine.to_thread(path.write_bytes, line(3))
            assert json.loads((await anext(sub)).data)["oid"] == 3
            stats = log.statistics()
            assert (stats.refusals, stats.refused, stats.rotations) == (1, "", 1)
            nursery.cancel_scope.cancel()


def _append(path: Path, data: bytes) -> None:
    with open(path, "ab") as file:
        file.write(data)


def _wchan(thread: threading.Thread) -> str:
    """Where in the kernel ``thread`` is blocked (Linux), ``"0"`` if it is not."""
    try:
        with open(f"/proc/self/task/{thread.native_id}/wchan") as file:
            return file.read()
    except OSError:  # the thread has ended
        return "0"


@contextlib.contextmanager
def fifo_writer_waiting(path: Path) -> Iterator[threading.Thread]:
    """A thread blocked opening the FIFO ``path`` for writing, until a reader opens it."""
    thread = threading.Thread(target=lambda: os.close(os.open(path, os.O_WRONLY)))
    thread.start()
    try:
        deadline = time.monotonic() + SAFETY
        while _wchan(thread) != "wait_for_partner":  # inside open(), waiting for a reader
            if not thread.is_alive() or time.monotonic() > deadline:
                pytest.skip("cannot see the writer wait in open() (/proc/<pid>/task/<tid>/wchan)")
            time.sleep(0.01)
        yield thread
    finally:
        os.close(os.open(path, os.O_RDONLY | os.O_NONBLOCK))  # the writer's open returns
        thread.join(SAFETY)


@pytest.mark.parametrize(
    "opener",
    [
        pytest.param(lambda path: FileRef(path, 0, 0).open(), id="worker"),
        pytest.param(lambda path: Tail(path, from_end=False).open(), id="follower"),
    ],
)
def test_a_fifo_at_the_path_is_never_opened_so_its_writer_is_never_woken(
    tmp_path: Path, opener: Callable[[str], object]
) -> None:
    path = tmp_path / "orders.log"
    os.mkfifo(path)
    with fifo_writer_waiting(path) as writer:
        assert opener(str(path)) in (None, False)  # None from a worker, False from a tail
        # A reader's open, even a non-blocking one, would have woken it.
        assert _wchan(writer) == "wait_for_partner"


def test_refused_stays_current_while_the_old_file_keeps_growing(tmp_path: Path) -> None:
    path, old = tmp_path / "orders.log", tmp_path / "orders.log.1"
    path.write_bytes(line(1))
    tail = Tail(str(path), from_end=False)
    assert tail.open()
    try:
        tail.seen = len(line(1))
        path.rename(old)
        os.mkfifo(path)
        _append(old, line(2))  # each look finds growth: the old file is read first
        assert tail.look() == Look(len(line(1) + line(2)), Event.NONE)
        assert tail.refused == "a FIFO"
        path.unlink()
        _append(old, line(3))
        assert tail.look() == Look(len(line(1) + line(2) + line(3)), Event.NONE)
        assert tail.refused is None
    finally:
        tail.close()


# -- a hung file system ------------------------------------------------------------------


class HungTail(Tail):
    """A tail one of whose calls blocks, as on a dead mount, until ``release`` is set.

    ``hang`` names the call: ``"open"``; ``"look"``, holding the file's
    descriptor as a look stuck in ``fstat`` does; ``"look-elsewhere"``,
    before it touches the descriptor; ``"close"``, any close of a
    descriptor; ``""``, none.
    """

    def __init__(self, path: str, *, from_end: bool, hang: str, release: threading.Event) -> None:
        super().__init__(path, from_end=from_end)
        self.hang = hang
        self.release = release
        self.entered = threading.Event()
        self.finished = threading.Event()

    def _block(self) -> None:
        self.entered.set()
        self.release.wait()

    def open(self) -> bool:
        if self.hang != "open":
            return super().open()
        try:
            self._block()
            return super().open()
        finally:
            self.finished.set()

    def look(self) -> Look:
        if self.hang not in ("look", "look-elsewhere"):
            return super().look()
        try:
            if self.hang == "look":
                with self._using():
                    self._block()
            else:
                self._block()
            return super().look()
        finally:
            self.finished.set()

    def close_descriptor(self, fd: int) -> None:
        if self.hang != "close":
            return super().close_descriptor(fd)
        try:
            self._block()
            return super().close_descriptor(fd)
        finally:
            self.finished.set()


class HungTails:
    """An order log's ``tail_factory``: run ``i`` of ``follow`` gets a tail hanging ``plan[i]``."""

    def __init__(self, *plan: str, release: threading.Event) -> None:
        self.plan = plan
        self.release = release
        self.made: list[HungTail] = []

    def __call__(self, path: str, *, from_end: bool) -> HungTail:
        hang = self.plan[len(self.made)] if len(self.made) < len(self.plan) else ""
        self.made.append(HungTail(path, from_end=from_end, hang=hang, release=self.release))
        return self.made[-1]


def hung_log(path: Path, tails: HungTails) -> OrderLog:
    config = OrderLogConfig(path, poll_interval=0.05, workers=0)
    return OrderLog(config, MemoryBus(), tail_factory=tails)


async def wait_for_thread(event: threading.Event) -> None:
    """Until ``event`` is set by a thread (the caller's guard bounds it)."""
    await trio.to_thread.run_sync(event.wait, abandon_on_cancel=True)


@pytest.mark.parametrize("hang", ["open", "look"])
async def test_a_hung_file_system_call_is_abandoned_when_the_follower_is_cancelled(
    tmp_path: Path, hang: str
) -> None:
    path = tmp_path / "orders.log"
    path.write_bytes(line(1))
    release = threading.Event()
    tails = HungTails(hang, release=release)
    log = hung_log(path, tails)
    before = engine.bridge_statistics()
    with unblocking_after(SAFETY, release.set), trio.fail_after(REAL_GUARD):
        async with trio.open_nursery() as nursery:
            if hang == "open":
                nursery.start_soon(log.follow)
            else:
                await nursery.start(log.follow)
            await trio.testing.wait_all_tasks_blocked()
            [tail] = tails.made
            await wait_for_thread(tail.entered)
            cancelled = time.monotonic()
            nursery.cancel_scope.cancel()
        took = time.monotonic() - cancelled
        assert took < PROMPT
        stats = engine.bridge_statistics()
        assert stats.threads_abandoned - before.threads_abandoned == 1
        assert stats.threads_abandoned_running - before.threads_abandoned_running == 1
        assert log.statistics().file_threads == 1  # the hung call still holds its thread
        # A hung look still holds the file: it is closed when the look returns.
        assert len(descriptors_of(path)) == (1 if hang == "look" else 0)
        release.set()
        await wait_for_thread(tail.finished)
    # Released, the open went ahead and the look ended: nothing was kept open.
    assert descriptors_of(path) == []
    assert not log.statistics().following


async def test_hung_calls_hold_no_more_than_the_logs_own_threads(tmp_path: Path) -> None:
    path = tmp_path / "orders.log"
    path.write_bytes(line(1))
    release = threading.Event()
    tails = HungTails(*["open"] * (FILE_THREADS + 2), release=release)
    log = hung_log(path, tails)
    with unblocking_after(SAFETY, release.set), trio.fail_after(REAL_GUARD):
        for attempt in range(FILE_THREADS + 2):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(log.follow)
                await trio.testing.wait_all_tasks_blocked()
                if attempt < FILE_THREADS:
                    await wait_for_thread(tails.made[-1].entered)
                nursery.cancel_scope.cancel()
        # The later runs waited for a thread, and gave up when cancelled, starting none.
        assert log.statistics().file_threads == FILE_THREADS
        assert [tail.entered.is_set() for tail in tails.made] == [True] * FILE_THREADS + [False] * 2
        release.set()
        for tail in tails.made[:FILE_THREADS]:
            await wait_for_thread(tail.finished)
    assert descriptors_of(path) == []


async def test_hung_closes_hold_no_more_than_the_logs_own_threads(tmp_path: Path) -> None:
    path = tmp_path / "orders.log"
    path.write_bytes(line(1))
    release = threading.Event()
    tails = HungTails(*["close"] * (FILE_THREADS + 2), release=release)
    log = hung_log(path, tails)
    with unblocking_after(SAFETY, release.set), trio.fail_after(REAL_GUARD):
        for attempt in range(FILE_THREADS + 2):
            async with trio.open_nursery() as nursery:
                if attempt < FILE_THREADS:
                    await nursery.start(log.follow)
                else:  # no thread left to open the file with
                    nursery.start_soon(log.follow)
                    await trio.testing.wait_all_tasks_blocked()
                cancelled = time.monotonic()
                nursery.cancel_scope.cancel()
            assert time.monotonic() - cancelled < CLOSE_WAIT + PROMPT
            if attempt < FILE_THREADS:
                await wait_for_thread(tails.made[-1].entered)  # its close hangs
        stats = log.statistics()
        assert (stats.file_threads, stats.unclosed_files) == (FILE_THREADS, 0)
        assert [tail.entered.is_set() for tail in tails.made] == [True] * FILE_THREADS + [False] * 2
        assert len(descriptors_of(path)) == FILE_THREADS
        release.set()
        for tail in tails.made[:FILE_THREADS]:
            await wait_for_thread(tail.finished)
    assert descriptors_of(path) == []


async def test_a_close_that_finds_no_thread_is_left_to_the_next_one(tmp_path: Path) -> None:
    path = tmp_path / "orders.log"
    path.write_bytes(line(1))
    release = threading.Event()
    # Looks hung elsewhere than on the file: each run's file is free to
    # close, but the last run finds no thread left to close it with.
    tails = HungTails(*["look-elsewhere"] * FILE_THREADS, release=release)
    log = hung_log(path, tails)
    with unblocking_after(SAFETY, release.set), trio.fail_after(REAL_GUARD):
        for _ in range(FILE_THREADS):
            async with trio.open_nursery() as nursery:
                await nursery.start(log.follow)
                await wait_for_thread(tails.made[-1].entered)
                cancelled = time.monotonic()
                nursery.cancel_scope.cancel()
            assert time.monotonic() - cancelled < CLOSE_WAIT + PROMPT
        stats = log.statistics()
        assert (stats.file_threads, stats.unclosed_files) == (FILE_THREADS, 1)
        assert len(descriptors_of(path)) == 1
        release.set()
        for tail in tails.made:
            await wait_for_thread(tail.finished)
        assert len(descriptors_of(path)) == 1  # its close never started
        # The next run's close closes it with its own.
        async with trio.open_nursery() as nursery:
            await nursery.start(log.follow)
            nursery.cancel_scope.cancel()
    assert log.statistics().unclosed_files == 0
    assert descriptors_of(path) == []


# -- the service -------------------------------------------------------------------------


def _refused(client: httpx.Client) -> object:
    """What ``/status`` says the order log's path names, if not a regular file."""
    return client.get("/status").json().get("sources", {}).get("orders", {}).get("refused")


@pytest.mark.subprocess
def test_the_service_stops_on_sigterm_with_a_fifo_as_its_order_log(tmp_path: Path) -> None:
    fifo = tmp_path / "orders.fifo"
    os.mkfifo(fifo)
    flags = ("--order-log", str(fifo), "--rate", "200", "--grace-period", "5")
    with (
        service_process(*flags) as (process, url, _),
        httpx.Client(base_url=url, timeout=5) as client,
    ):
        # The follower is polling the FIFO it refused to open.
        wait_for(lambda: _refused(client) == "a FIFO", 20)
        process.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        # 0: a graceful stop, inside the 5 s grace period (a forced stop
        # would be 128 + SIGTERM).
        assert process.wait(timeout=15) == 0
        assert time.monotonic() - signalled < 5
