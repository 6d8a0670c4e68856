"""Threads and child processes a test left behind.

Take a :class:`Snapshot` before the code under test and call
:func:`find_leaks` after it. A thread counts as leaked when it is new and
still running Python code; a child process when it is new and has not
exited. Two kinds of survivors are expected and never count:

* trio's cached worker threads (``trio.to_thread``) that sit idle waiting
  for their next job. They exit on their own after ten idle seconds. A
  worker still *running* a job (an abandoned ``to_thread`` call) is a leak.
* multiprocessing's session-wide helpers (the resource tracker and the
  forkserver), started once on first use and shared by every later test.

Zombies (children that exited but were not reaped yet) do not count either:
they run nothing, and reaping them here would steal the exit status from
whoever owns them.
"""

from __future__ import annotations

import contextlib
import os
import select
import shlex
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterable
from types import CodeType, FrameType

import attrs
import psutil

from .._validation import check_duration

# Between polls while waiting out the grace period: short, so a leak check on
# a clean test costs nothing and one on a racing test little.
_POLL_INTERVAL = 0.01

# multiprocessing starts these once per session; their ``-c`` payload says so.
_SESSION_HELPERS = (
    "from multiprocessing.resource_tracker import main",
    "from multiprocessing.forkserver import main",
)

# (pid, create_time): a pid alone may be reused by the OS during a session.
_ProcessKey = tuple[int, float]


@attrs.frozen
class LeakedThread:
    """A thread that outlived the code under test.

    Attributes:
        name: the thread's name at the check. trio names a worker after the
            job it runs (``"sleep from test_x"``), which points at the culprit.
        ident: the thread's identifier.
        daemon: whether the thread is a daemon thread.
        stack: where the thread is, as a formatted traceback.
    """

    name: str
    ident: int
    daemon: bool
    stack: str

    def __str__(self) -> str:
        kind = "daemon thread" if self.daemon else "thread"
        return f"{kind} {self.name!r} (ident {self.ident}) at:\n{self.stack}"


@attrs.frozen
class LeakedProcess:
    """A child process (or grandchild) that outlived the code under test.

    Attributes:
        pid: the process id.
        cmdline: its command line; empty when the OS would not say.
        status: psutil's status at the check (``"sleeping"``, ``"running"``).
    """

    pid: int
    cmdline: tuple[str, ...]
    status: str

    def __str__(self) -> str:
        command = shlex.join(self.cmdline) if self.cmdline else "<command line unknown>"
        return f"process pid {self.pid} ({self.status}): {command}"


@attrs.frozen
class Leaks:
    """What :func:`find_leaks` found. False when nothing leaked.

    Attributes:
        threads: leaked threads, in :func:`threading.enumerate` order.
        processes: leaked child processes, in pid order.
    """

    threads: tuple[LeakedThread, ...] = ()
    processes: tuple[LeakedProcess, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.threads or self.processes)

    def __str__(self) -> str:
        if not self:
            return "no leaked threads or processes"
        parts = [f"{len(self.threads)} thread(s) and {len(self.processes)} process(es) leaked:"]
        parts.extend(str(thread) for thread in self.threads)
        parts.extend(str(process) for process in self.processes)
        return "\n".join(parts)


@attrs.frozen
class Snapshot:
    """The threads and child processes alive at one moment.

    Attributes:
        threads: every live thread.
        busy_workers: the trio worker threads among them that were running a
            job, so that a worker busy before the test is not blamed on it.
        processes: ``(pid, create_time)`` of every live descendant process.
    """

    threads: frozenset[threading.Thread]
    busy_workers: frozenset[threading.Thread]
    processes: frozenset[_ProcessKey]

    @classmethod
    def take(cls) -> Snapshot:
        """Record the threads and child processes alive now.

        Returns:
            The snapshot to hand to :func:`find_leaks` later.
        """
        frames = sys._current_frames()
        threads = frozenset(threading.enumerate())
        busy = frozenset(t for t in threads if _worker_state(t, frames) == "busy")
        processes = frozenset(_process_key(p) for p in _children())
        return cls(threads=threads, busy_workers=busy, processes=processes)


def find_leaks(before: Snapshot, *, grace: float = 1.0) -> Leaks:
    """Find the threads and child processes that appeared since ``before``.

    Something that ends within ``grace`` seconds (real time) is not a leak:
    the check polls until nothing is left or the grace period is over, so a
    clean run returns at once. The grace absorbs races such as a worker thread
    that has delivered its result but not yet gone back to waiting, or a
    killed child the OS has not finished tearing down.

    Args:
        before: what was alive before the code under test ran.
        grace: seconds to wait for stragglers to finish; 0 checks once.

    Returns:
        The leaks; falsy when there are none.

    Raises:
        ValueError: if ``grace`` is negative or NaN.
    """
    check_duration("grace", grace, allow_zero=True)
    deadline = time.monotonic() + grace
    while True:
        leaks = Leaks(threads=_leaked_threads(before), processes=_leaked_processes(before))
        remaining = deadline - time.monotonic()
        if not leaks or remaining <= 0:
            return leaks
        _wait_for_any(leaks, min(_POLL_INTERVAL, remaining))


def _wait_for_any(leaks: Leaks, timeout: float) -> None:
    """Wait on what leaked itself: returns as soon as a process exits or a thread ends.

    A trio worker thread that goes back to idle does not end, so the wait is
    bounded by ``timeout`` and the caller looks again.
    """
    if leaks.processes:
        _wait_for_exit([leaked.pid for leaked in leaks.processes], timeout)
        return
    idents = {leaked.ident for leaked in leaks.threads}
    for thread in threading.enumerate():
        if thread.ident in idents:
            thread.join(timeout)
            return


def _wait_for_exit(pids: list[int], timeout: float) -> None:
    """Until one of ``pids`` exits, at most ``timeout``; never reaps (its owner must)."""
    descriptors = []
    try:
        for pid in pids:
            with contextlib.suppress(OSError, AttributeError):  # gone, or no pidfd here
                descriptors.append(os.pidfd_open(pid))
        if descriptors:
            select.select(descriptors, [], [], timeout)
        else:
            threading.Event().wait(timeout)  # nothing to wait on: just bound the pace
    finally:
        for descriptor in descriptors:
            os.close(descriptor)


def _leaked_threads(before: Snapshot) -> tuple[LeakedThread, ...]:
    frames = sys._current_frames()
    current = threading.current_thread()
    leaked = []
    for thread in threading.enumerate():
        ident = thread.ident
        frame = frames.get(ident) if ident is not None else None
        # No frame: the thread is not running Python code any more (it is
        # finishing, or a foreign thread seen once as a _DummyThread).
        if thread is current or ident is None or frame is None:
            continue
        if _is_leak(thread, before, _worker_state(thread, frames)):
            leaked.append(_describe_thread(thread, ident, frame))
    return tuple(leaked)


def _is_leak(thread: threading.Thread, before: Snapshot, state: str) -> bool:
    if state == "idle":
        return False
    if state == "busy" and thread not in before.busy_workers:
        # A cached worker that was idle before (or new) and runs a job now:
        # the job belongs to the code under test.
        return True
    return thread not in before.threads


def _describe_thread(thread: threading.Thread, ident: int, frame: FrameType) -> LeakedThread:
    stack = "".join(traceback.format_stack(frame))
    return LeakedThread(name=thread.name, ident=ident, daemon=thread.daemon, stack=stack)


def _worker_state(thread: threading.Thread, frames: dict[int, FrameType]) -> str:
    """``"idle"`` or ``"busy"`` for a trio cached worker, ``"other"`` otherwise.

    An idle worker sits in ``WorkerThread._work`` blocked on its lock (a C
    call, so ``_work`` is the innermost Python frame); a busy one has the job's
    frames above ``_work``.
    """
    work_code = _trio_worker_code()
    frame = frames.get(thread.ident) if thread.ident is not None else None
    if work_code is None or frame is None:
        return "other"
    if frame.f_code is work_code:
        return "idle"
    outer: FrameType | None = frame.f_back
    while outer is not None:
        if outer.f_code is work_code:
            return "busy"
        outer = outer.f_back
    return "other"


def _trio_worker_code() -> CodeType | None:
    # Only look if trio's thread cache was imported: if it was not, no worker
    # exists, and importing trio here would slow down every pytest session.
    module = sys.modules.get("trio._core._thread_cache")
    worker = getattr(module, "WorkerThread", None)
    work: Callable[..., object] | None = getattr(worker, "_work", None)
    return getattr(work, "__code__", None)


def _leaked_processes(before: Snapshot) -> tuple[LeakedProcess, ...]:
    leaked = []
    for process in _children():
        try:
            if _process_key(process) in before.processes:
                continue
            with process.oneshot():
                status = process.status()
                cmdline = tuple(_cmdline(process))
        except psutil.NoSuchProcess:
            continue
        if status == psutil.STATUS_ZOMBIE or _is_session_helper(cmdline):
            continue
        leaked.append(LeakedProcess(pid=process.pid, cmdline=cmdline, status=status))
    return tuple(sorted(leaked, key=lambda p: p.pid))


def _is_session_helper(cmdline: Iterable[str]) -> bool:
    """Whether a command line is one of multiprocessing's session-wide helpers."""
    return any(arg.startswith(_SESSION_HELPERS) for arg in cmdline)


def _children() -> list[psutil.Process]:
    try:
        return psutil.Process().children(recursive=True)
    except psutil.NoSuchProcess:  # pragma: no cover - a child vanished mid-walk
        return []


def _process_key(process: psutil.Process) -> _ProcessKey:
    try:
        return (process.pid, process.create_time())
    except psutil.NoSuchProcess:
        return (process.pid, 0.0)


def _cmdline(process: psutil.Process) -> list[str]:
    try:
        return process.cmdline()
    except (psutil.AccessDenied, psutil.ZombieProcess):
        return []
