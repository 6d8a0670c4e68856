"""Looking at a growing file: how big it is now, and whether it was truncated or replaced.

Each look runs in a worker thread: an ``fstat`` of the open file and a
``stat`` of the path. The file is not read here: the
caller cuts what is new into regions (``_regions.py``) that worker
processes, or a thread (:meth:`Tail.read`), read.

* Growth: the file is bigger than what was seen.
* Truncation (``copytruncate`` rotation, or a writer starting over): the
  file is now smaller than what was seen; it is followed again from 0.
* Rotation (the path now names another file, or none): the old file is
  followed to its end first, then the new one is opened and followed from 0.
  While the path names no file, the old one is still followed as it grows.

A truncation followed by growth past the old size between two looks cannot
be told apart from plain growth: looks must be frequent enough for the
file's turnover.

Only a regular file is followed. A path that names anything else (a FIFO,
a directory, a device, a socket) is never opened: opening a FIFO would
block until a writer came, or wake a writer waiting for a reader and then
leave it writing into a pipe nobody reads, and offsets, sizes and rotation
mean nothing on a pipe. Such a path is treated as naming no file, and
:attr:`Tail.refused` says what it names instead. Files are opened as
:func:`open_regular_file` opens them (a worker process reopens a region's
file the same way): the path is looked at first, and the open does not
block, so a path swapped for a FIFO between the two cannot block either.

Every call here may block for good on a hung file system (a dead NFS or
FUSE server), so the caller runs them in threads it can abandon. A thread
abandoned in the middle of a call may still return later: the descriptor it
uses is closed by whoever is last done with it (see :class:`_Descriptor`),
and a file it opens after :meth:`Tail.close` is closed at once, never kept.
"""

from __future__ import annotations

import contextlib
import enum
import os
import stat
import threading
from collections.abc import Iterator

import attrs
import trio

from ._regions import (
    FileRef,
    Lines,
    NotRegularFile,
    Region,
    describe_kind,
    open_regular_file,
    read_lines,
)


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


class _Descriptor:
    """An open descriptor shared by the calls using it; the last one done closes it (private).

    ``users`` counts the calls in progress with it (in threads, possibly
    abandoned); once it is ``retired`` (replaced by a rotation, or the tail
    closed), whoever brings ``users`` to 0, or finds it at 0 when retiring
    it, closes it. A call abandoned in the middle of a read therefore never
    reads a descriptor number the process has since reused for another file.
    """

    __slots__ = ("fd", "file", "retired", "users")

    def __init__(self, fd: int, file: FileRef) -> None:
        self.fd = fd
        self.file = file
        self.users = 0
        self.retired = False


def close_quietly(fd: int) -> None:
    """``os.close(fd)``, ignoring an error (blocking: a thread)."""
    # A failed close of a read-only descriptor (EIO from a network file
    # system) leaves nothing to do: the descriptor is released either way.
    with contextlib.suppress(OSError):
        os.close(fd)


class Tail:
    """A file followed by path (private): its open descriptor and how much of it was seen.

    ``seen`` is the size up to which the caller has cut the file into
    regions; it tells growth, and truncation, from the rest. ``refused``
    is what the path named at the last open or look if that was not a
    regular file (``"a FIFO"``), else ``None``: every look looks at the
    path, so it is current while the file keeps growing too.

    :meth:`open`, :meth:`look`, :meth:`read`, :meth:`close` and
    :meth:`close_descriptor` block (run them in a thread); :meth:`detach`
    does not, and is safe while they run.
    """

    def __init__(self, path: str, *, from_end: bool) -> None:
        self.path = path
        self._from_end = from_end
        self._lock = threading.Lock()
        self._current: _Descriptor | None = None
        self._closed = False
        self.seen = 0
        self.refused: str | None = None

    @property
    def is_open(self) -> bool:
        """Whether a file is open."""
        return self._current is not None

    @property
    def file(self) -> FileRef:
        """The open file, as a worker process can reopen it."""
        current = self._current
        assert current is not None, "no file open"
        return current.file

    def open(self) -> bool:
        """Open the path if it names a regular file now; ``False`` if not (in a thread).

        Raises:
            trio.ClosedResourceError: the tail was closed (the file opened is closed again).
        """
        opened = self._open_path()
        if opened is None:
            return False
        fd, status = opened
        self._adopt(fd, status)
        self.seen = status.st_size if self._from_end else 0
        return True

    def look(self) -> Look:
        """The file's size now, and whether it was truncated or replaced (in a thread).

        After a truncation or rotation ``seen`` is 0: the caller reads from the start.

        Raises:
            trio.ClosedResourceError: the tail was closed.
        """
        with self._using() as descriptor:
            size = os.fstat(descriptor.fd).st_size
            current = self._stat_path()
            if size < self.seen:
                self.seen = 0
                return Look(size, Event.TRUNCATED)
            if size > self.seen:  # the file followed is read to its end first
                return Look(size, Event.NONE)
            if current is None:  # no regular file there: the old one is still followed
                return Look(size, Event.NONE)
            if (current.st_dev, current.st_ino) == (descriptor.file.device, descriptor.file.inode):
                return Look(size, Event.NONE)
            # Replaced. A writer may have appended to the old file since the
            # fstat above: that is followed before moving on.
            size = os.fstat(descriptor.fd).st_size
            if size > self.seen:
                return Look(size, Event.NONE)
            opened = self._open_path()
            if opened is None:  # replaced and gone again: next look
                return Look(size, Event.NONE)
        fd, status = opened
        self._adopt(fd, status)
        self.seen = 0
        return Look(status.st_size, Event.ROTATED)

    def read(self, region: Region, max_line_bytes: int) -> Lines:
        """The lines ``region`` owns, read from the open file (in a thread).

        Raises:
            trio.ClosedResourceError: the tail was closed.
        """
        with self._using() as descriptor:
            return read_lines(descriptor.fd, region, max_line_bytes)

    def detach(self) -> int | None:
        """Close the tail without blocking; the descriptor to close now, if nobody uses it.

        Whatever :meth:`open`, :meth:`look` or :meth:`read` is still running
        (an abandoned thread) closes the descriptor itself when it is done,
        and a file one of them opens from now on is closed at once. The
        caller closes the descriptor returned, if any, with
        :meth:`close_descriptor` (``os.close`` may block on a hung file
        system too).
        """
        with self._lock:
            self._closed = True
            current, self._current = self._current, None
            return None if current is None else self._retire(current)

    def close(self) -> None:
        """Close the tail, and the descriptor now unless a call still uses it (blocking)."""
        fd = self.detach()
        if fd is not None:
            self.close_descriptor(fd)

    def close_descriptor(self, fd: int) -> None:
        """Close a descriptor of the file followed, ignoring an error (blocking: a thread).

        Every descriptor the tail gives up is closed here: one :meth:`detach`
        handed out, one a rotation replaced, one its last user is done with.
        """
        close_quietly(fd)

    # -- private ---------------------------------------------------------------------

    def _stat_path(self) -> os.stat_result | None:
        """The status of the regular file the path names, if any; sets ``refused``."""
        try:
            current = os.stat(self.path)
        except FileNotFoundError:
            self.refused = None
            return None
        if not stat.S_ISREG(current.st_mode):
            self.refused = describe_kind(current.st_mode)
            return None
        self.refused = None
        return current

    def _open_path(self) -> tuple[int, os.stat_result] | None:
        """A descriptor of the regular file the path names, and its status; ``None`` if none."""
        try:
            opened = open_regular_file(self.path)
        except FileNotFoundError:
            self.refused = None
            return None
        except NotRegularFile as exc:
            self.refused = exc.kind
            return None
        self.refused = None
        return opened

    def _adopt(self, fd: int, status: os.stat_result) -> None:
        # Where a worker can reopen this descriptor (Linux): the very file,
        # even once a rotation has renamed it.
        directory = f"/proc/{os.getpid()}/fd"
        fd_path = f"{directory}/{fd}" if os.path.isdir(directory) else None
        adopted = _Descriptor(fd, FileRef(self.path, status.st_dev, status.st_ino, fd_path))
        with self._lock:
            closed = self._closed
            if closed:
                to_close: int | None = fd
            else:
                old, self._current = self._current, adopted
                to_close = None if old is None else self._retire(old)
        if to_close is not None:
            self.close_descriptor(to_close)
        if closed:
            raise trio.ClosedResourceError("the order log's file was closed meanwhile")

    def _retire(self, descriptor: _Descriptor) -> int | None:
        """Mark ``descriptor`` replaced; its fd if it is to be closed now (under the lock)."""
        descriptor.retired = True
        return descriptor.fd if descriptor.users == 0 else None

    @contextlib.contextmanager
    def _using(self) -> Iterator[_Descriptor]:
        with self._lock:
            descriptor = self._current
            if descriptor is None:
                raise trio.ClosedResourceError("the order log's file is not open")
            descriptor.users += 1
        try:
            yield descriptor
        finally:
            with self._lock:
                descriptor.users -= 1
                last = descriptor.retired and descriptor.users == 0
            if last:
                self.close_descriptor(descriptor.fd)
