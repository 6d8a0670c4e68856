"""Looking at a growing file: how big it is now, and whether it was truncated or replaced.

Each look runs in a worker thread: an ``fstat`` of the open file and, when
it has not grown, a ``stat`` of the path. The file is not read here: the
caller cuts what is new into regions (``_regions.py``) that worker
processes, or a thread, read.

* Growth: the file is bigger than what was seen.
* Truncation (``copytruncate`` rotation, or a writer starting over): the
  file is now smaller than what was seen; it is followed again from 0.
* Rotation (the path now names another file, or none): the old file is
  followed to its end first, then the new one is opened and followed from 0.
  While the path names no file, the old one is still followed as it grows.

A truncation followed by growth past the old size between two looks cannot
be told apart from plain growth: looks must be frequent enough for the
file's turnover.
"""

from __future__ import annotations

import enum
import os

import attrs

from ._regions import FileRef


class Event(enum.Enum):
    """What a look noticed besides the size (private)."""

    NONE = enum.auto()
    TRUNCATED = enum.auto()
    ROTATED = enum.auto()


@attrs.frozen
class Look:
    """One look's result (private).

    Attributes:
        size: the size of the file followed now (the new one after a rotation).
        event: what happened since the last look.
    """

    size: int
    event: Event


class Tail:
    """A file followed by path (private): its open descriptor and how much of it was seen.

    ``seen`` is the size up to which the caller has cut the file into
    regions; it tells growth, and truncation, from the rest.
    """

    def __init__(self, path: str, *, from_end: bool) -> None:
        self.path = path
        self._from_end = from_end
        self._fd: int | None = None
        self._file: FileRef | None = None
        self.seen = 0

    @property
    def is_open(self) -> bool:
        """Whether a file is open."""
        return self._fd is not None

    @property
    def fd(self) -> int:
        """The open descriptor (for reads in a thread)."""
        assert self._fd is not None, "no file open"
        return self._fd

    @property
    def file(self) -> FileRef:
        """The open file, as a worker process can reopen it."""
        assert self._file is not None, "no file open"
        return self._file

    def open(self) -> bool:
        """Open the path if it names a file now; ``False`` if it does not (in a thread)."""
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return False
        self._adopt(fd)
        self.seen = os.fstat(fd).st_size if self._from_end else 0
        return True

    def look(self) -> Look:
        """The file's size now, and whether it was truncated or replaced (in a thread).

        After a truncation or rotation ``seen`` is 0: the caller reads from the start.
        """
        fd = self.fd
        size = os.fstat(fd).st_size
        if size < self.seen:
            self.seen = 0
            return Look(size, Event.TRUNCATED)
        if size > self.seen:
            return Look(size, Event.NONE)
        try:
            current = os.stat(self.path)
        except FileNotFoundError:
            return Look(size, Event.NONE)
        if (current.st_dev, current.st_ino) == (self.file.device, self.file.inode):
            return Look(size, Event.NONE)
        # Replaced. A writer may have appended to the old file since the
        # fstat above: that is followed before moving on.
        size = os.fstat(fd).st_size
        if size > self.seen:
            return Look(size, Event.NONE)
        try:
            new = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:  # replaced and gone again: next look
            return Look(size, Event.NONE)
        self._adopt(new)
        self.seen = 0
        return Look(os.fstat(new).st_size, Event.ROTATED)

    def _adopt(self, fd: int) -> None:
        self.close()
        stat = os.fstat(fd)
        self._fd = fd
        # Where a worker can reopen this descriptor (Linux): the very file,
        # even once a rotation has renamed it.
        directory = f"/proc/{os.getpid()}/fd"
        fd_path = f"{directory}/{fd}" if os.path.isdir(directory) else None
        self._file = FileRef(self.path, stat.st_dev, stat.st_ino, fd_path)

    def close(self) -> None:
        """Close the open file, if any."""
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)
