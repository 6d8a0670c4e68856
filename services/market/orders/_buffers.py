"""Shared-memory files that carry a worker's encoded messages back, instead of its pipe.

A region's encoded messages are most of what it read. Sent back through
the worker's pipe they are copied 64 KiB at a time with a context switch
each, and pickled on both sides, which costs a large share of the CPU a
parsed line takes. Written once into an anonymous memory file
(``memfd_create``) that the worker reopens through ``/proc/<pid>/fd/<n>``,
and read once by the parent, they cost a fraction of that (the figures are
in ``docs/orders.md``, "Where parsing runs").

Nothing has a name in the file system, so nothing is left behind if the
process dies. Where memory files or ``/proc`` are missing (not Linux) there
are no buffers, and results come back through the pipe instead.
"""

from __future__ import annotations

import os


class ResultBuffers:
    """Memory files for results in flight, one per region at most (private).

    Reading one back is a copy out of memory (no disk behind it), short
    enough to be done in the event loop.
    """

    def __init__(self) -> None:
        self._free: list[int] = []
        self._open: list[int] = []
        self._directory = f"/proc/{os.getpid()}/fd"
        self.available = hasattr(os, "memfd_create") and os.path.isdir(self._directory)

    def take(self) -> int | None:
        """A free buffer's descriptor (creating one if needed), or ``None`` if there are none."""
        if not self.available:
            return None
        if self._free:
            return self._free.pop()
        fd = os.memfd_create("order-log-results", os.MFD_CLOEXEC)
        self._open.append(fd)
        return fd

    def path(self, fd: int) -> str:
        """Where a worker opens the buffer ``fd``."""
        return f"{self._directory}/{fd}"

    def give_back(self, fd: int | None) -> None:
        """Return a buffer taken with :meth:`take`."""
        if fd is not None:
            self._free.append(fd)

    def read(self, fd: int, size: int) -> bytes:
        """The first ``size`` bytes a worker wrote into buffer ``fd``."""
        return os.pread(fd, size, 0)

    def close(self) -> None:
        """Close every buffer."""
        for fd in self._open:
            os.close(fd)
        self._open.clear()
        self._free.clear()


def write_result(path: str, data: bytes) -> bool:
    """Worker side: write ``data`` at the start of the buffer at ``path``; ``False`` on failure."""
    try:
        fd = os.open(path, os.O_WRONLY)
    except OSError:
        return False
    try:
        return os.pwrite(fd, data, 0) == len(data)
    except OSError:
        return False
    finally:
        os.close(fd)
