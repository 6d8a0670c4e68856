"""How many worker processes this system can hold: the checks behind ``max_workers``.

A pool of ``n`` workers costs ``n`` processes (each with its threads), a few
file descriptors per worker in this process (the pipe to the worker and its
exit sentinel), and a fresh interpreter's memory per worker (``spawn``
imports numpy and the formula code anew). The arithmetic is a plain function
of a :class:`SystemLimits` snapshot, so tests give it any system they like.
"""

from __future__ import annotations

import logging
import os
import resource
from pathlib import Path

import attrs

from engine.lowlevel import check_count

logger = logging.getLogger("market.processing")

#: Threads of one worker process (its main thread and trio-parallel's reader).
TASKS_PER_WORKER = 2
#: Descriptors this process holds per worker, with a margin (see docs/processing.md).
FILES_PER_WORKER = 5
#: Descriptors left for everything else the process opens (sockets, the store).
FILES_RESERVED = 64
#: Memory one idle worker holds after importing the scans (see docs/processing.md).
WORKER_MEMORY = 64 * 2**20


@attrs.frozen
class SystemLimits:
    """What bounds a pool's size here, read once.

    Attributes:
        cpus: ``os.cpu_count()``; ``None`` if unknown.
        tasks: the ``RLIMIT_NPROC`` soft limit (processes and threads of
            this user); ``None`` when unlimited or not enforced (root).
        tasks_in_use: this user's processes and threads now.
        files: the ``RLIMIT_NOFILE`` soft limit; ``None`` when unlimited.
        files_in_use: descriptors this process has open now.
        memory_available: bytes the system can still give (``MemAvailable``);
            ``None`` if unknown.
    """

    cpus: int | None
    tasks: int | None
    tasks_in_use: int
    files: int | None
    files_in_use: int
    memory_available: int | None

    @classmethod
    def current(cls) -> SystemLimits:
        """The limits of this process and system now (Linux reads ``/proc``; elsewhere less)."""
        tasks = _soft_limit(getattr(resource, "RLIMIT_NPROC", None))
        if os.geteuid() == 0:
            tasks = None  # the kernel does not hold root to RLIMIT_NPROC
        return cls(
            cpus=os.cpu_count(),
            tasks=tasks,
            tasks_in_use=_tasks_of_this_user() if tasks is not None else 0,
            files=_soft_limit(resource.RLIMIT_NOFILE),
            files_in_use=_open_files(),
            memory_available=_memory_available(),
        )


def resolve_max_workers(value: int | None, limits: SystemLimits) -> int:
    """``max_workers`` checked against ``limits``; ``None`` means one per CPU (4 if unknown).

    Raises:
        TypeError: not an int (a bool is not one).
        ValueError: below 1, or more workers than a limit allows; the message
            names the limit and the most it allows.
    """
    if value is None:
        value = limits.cpus or 4
    count = check_count("max_workers", value, minimum=1)
    if limits.tasks is not None:
        room = (limits.tasks - limits.tasks_in_use) // TASKS_PER_WORKER
        if count > room:
            raise ValueError(
                f"max_workers={count} exceeds the process limit: RLIMIT_NPROC is {limits.tasks}"
                f" with {limits.tasks_in_use} in use, room for {max(room, 0)} workers of"
                f" {TASKS_PER_WORKER} threads"
            )
    if limits.files is not None:
        room = (limits.files - limits.files_in_use - FILES_RESERVED) // FILES_PER_WORKER
        if count > room:
            raise ValueError(
                f"max_workers={count} exceeds the file descriptor limit: RLIMIT_NOFILE is"
                f" {limits.files} with {limits.files_in_use} open, room for {max(room, 0)}"
                f" workers of {FILES_PER_WORKER} descriptors (raise it with ulimit -n)"
            )
    if limits.memory_available is not None:
        room = limits.memory_available // WORKER_MEMORY
        if count > room:
            raise ValueError(
                f"max_workers={count} exceeds available memory: {limits.memory_available // 2**20}"
                f" MiB holds {room} workers of {WORKER_MEMORY // 2**20} MiB"
            )
    if limits.cpus is not None and count > limits.cpus:
        logger.warning(
            "max_workers=%d is more than the %d CPUs: CPU-bound symbols gain nothing past them",
            count,
            limits.cpus,
        )
    return count


def _soft_limit(which: int | None) -> int | None:
    if which is None:
        return None
    soft, _ = resource.getrlimit(which)
    return None if soft == resource.RLIM_INFINITY else soft


def _open_files() -> int:
    for folder in ("/proc/self/fd", "/dev/fd"):
        try:
            return len(os.listdir(folder))
        except OSError:
            continue
    return 0


def _memory_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _tasks_of_this_user() -> int:
    """This user's processes and threads, as RLIMIT_NPROC counts them (0 without ``/proc``)."""
    uid = str(os.getuid())
    total = 0
    try:
        entries = os.listdir("/proc")
    except OSError:
        return 0
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            status = Path("/proc", entry, "status").read_text()
        except OSError:
            continue  # ended meanwhile
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        if fields.get("Uid", "").split()[:1] == [uid]:
            total += int(fields.get("Threads", "1"))
    return total
