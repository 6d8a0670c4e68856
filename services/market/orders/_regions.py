"""Regions of a file, cut without reading it, and the whole lines each one owns.

The classic split at newlines: a region ``[start, stop)`` owns every line
that *starts* inside it. It skips the line it begins in the middle of
(unless ``start`` is 0 or byte ``start - 1`` is a newline) and finishes its
last line past ``stop``. Regions cut at any offsets therefore hand out every
line exactly once between them, so whoever cuts them (the event loop) never
reads the bytes, and whoever parses a region (a worker process) reads it
itself: only the parsed result crosses back.

A region is cut against a ``limit``, the file's size when it was looked at:
nothing past it is read, so a line the writer has not finished yet stays
unread (``pending``) until a later look finds its newline.

The same rule, a region that begins in the middle of a line skips to the
next newline, is how a line longer than ``max_line_bytes`` is dropped: its
region counts it once and ends in the middle of it, and whatever continues
from there skips the rest.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import stat

import attrs

from ._buffers import write_result
from ._records import ParsedChunk, parse_chunk

# Read this much at a time past a region's end to finish its last line.
_EXTEND_BYTES = 64 << 10
# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# Read-only, never blocking in open() (a FIFO), not inherited by children.
_OPEN_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC
_KINDS = (
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def describe_kind(mode: int) -> str:
    """What a file that is not a regular one is, in words (``"a FIFO"``)."""
    for test, kind in _KINDS:
        if test(mode):
            return kind
    return "not a regular file"


class NotRegularFile(Exception):
    """The path names something other than a regular file; it was not opened (private).

    Attributes:
        kind: what it names, in words (``"a FIFO"``).
    """

    def __init__(self, path: str, mode: int) -> None:
        self.kind = describe_kind(mode)
        super().__init__(f"{path} is {self.kind}, not a regular file")


def open_regular_file(path: str) -> tuple[int, os.stat_result]:
    """A blocking descriptor of the regular file ``path`` names, and its status (blocking).

    The path is looked at (``stat``) first, and opened only if it names a
    regular file: opening a FIFO would wake a writer waiting for a reader,
    and leave it writing into a pipe nobody reads. The open itself does not
    block, so a FIFO swapped in between the ``stat`` and the ``open`` cannot
    block it either; it is then closed again, unread.

    Raises:
        NotRegularFile: the path names a FIFO, a directory, a device or a socket.
        OSError: the path names nothing (``FileNotFoundError``), or another error.
    """
    before = os.stat(path)
    if not stat.S_ISREG(before.st_mode):
        raise NotRegularFile(path, before.st_mode)
    fd = os.open(path, _OPEN_FLAGS)
    try:
        status = os.fstat(fd)
        if not stat.S_ISREG(status.st_mode):  # swapped between the stat and the open
            raise NotRegularFile(path, status.st_mode)
        os.set_blocking(fd, True)
    except BaseException:
        with contextlib.suppress(OSError):  # the error raised matters, not this one
            os.close(fd)
        raise
    return fd, status


@attrs.frozen
class FileRef:
    """One file, as identified when it was opened: reopened by a worker, never confused.

    Attributes:
        path: the path it was opened by (it may name another file since).
        device: its ``st_dev``.
        inode: its ``st_ino``.
        fd_path: where this process's open descriptor of it can be reopened
            (``/proc/<pid>/fd/<n>`` on Linux): still this file after a
            rotation renamed it.
    """

    path: str
    device: int
    inode: int
    fd_path: str | None = None

    def open(self) -> int | None:
        """A new descriptor of this very file, or ``None`` if neither name leads to it now.

        A name that leads to something other than a regular file (a FIFO put
        at the path) is never opened: see :func:`open_regular_file`.
        """
        for candidate in (self.fd_path, self.path):
            if candidate is None:
                continue
            try:
                fd, status = open_regular_file(candidate)
            except (OSError, NotRegularFile):
                continue
            if (status.st_dev, status.st_ino) == (self.device, self.inode):
                return fd
            os.close(fd)
        return None


@attrs.frozen
class Region:
    """Bytes ``[start, stop)`` of a file, no more than ``limit`` of it to be read.

    Attributes:
        file: the file it was cut from.
        start: where it begins (any offset).
        stop: where the next region begins.
        limit: the file's size when the region was cut.
    """

    file: FileRef
    start: int
    stop: int
    limit: int


@attrs.frozen
class Lines:
    """What a region owns: its whole lines, and where the next unaccounted byte is.

    Attributes:
        data: the region's whole lines, each with its newline (``b""`` once
            parsed in a worker: only the counts travel back).
        owned: whether a line starts in the region at all (``False``: it
            lies inside a line begun before it).
        end: where the bytes this region accounted for end: the start of
            the next line, of an unfinished last line, or (past an
            over-long line) a point in the middle of a line, which the next
            region skips from.
        pending: bytes of an unfinished last line at the limit (not read).
        overlong: 1 if the region's last line ran past ``max_line_bytes``
            without a newline, and was dropped.
        sample: the dropped line's description, if any.
        cut_short: the file was found shorter than ``limit`` once read: it
            was truncated after the region was cut, so what was read may
            belong to the file's new contents and is dropped (``data`` is
            empty, nothing is owned).
    """

    data: bytes
    owned: bool
    end: int
    pending: int = 0
    overlong: int = 0
    sample: str = ""
    cut_short: bool = False


def read_lines(fd: int, region: Region, max_line_bytes: int) -> Lines:
    """The lines ``region`` owns in the file open as ``fd`` (blocking: a thread or a worker).

    If the file is shorter than the region's limit once read (truncated
    since the region was cut), nothing is kept: see ``Lines.cut_short``.
    Bytes read while the file was still whole are the old file's, so the
    check comes after the reads.
    """
    lines = _read_lines(fd, region, max_line_bytes)
    if os.fstat(fd).st_size < region.limit:
        return Lines(b"", owned=False, end=region.start, cut_short=True)
    return lines


def _read_lines(fd: int, region: Region, max_line_bytes: int) -> Lines:
    start, limit = region.start, region.limit
    stop = min(region.stop, limit)
    if start >= stop:
        return Lines(b"", owned=False, end=start)
    lead = 1 if start > 0 else 0  # the byte before: a newline, or mid-line
    base = start - lead
    wanted = stop - base
    buffer = os.pread(fd, wanted, base)
    if len(buffer) < wanted:  # truncated meanwhile: read_lines drops it all
        return Lines(b"", owned=False, end=start)
    first = buffer.find(b"\n") + 1 if lead else 0
    if (lead and first == 0) or first >= len(buffer):
        # Inside a line begun before this region, or the next line starts
        # at ``stop``: it belongs to the next region.
        return Lines(b"", owned=False, end=stop)
    if buffer[-1] == 0x0A:
        return Lines(buffer[first:], owned=True, end=stop)
    last = buffer.rfind(b"\n", first) + 1 or first  # the unfinished last line
    return _finish_last_line(fd, buffer, base, first, last, stop, limit, max_line_bytes)


def _finish_last_line(
    fd: int,
    buffer: bytes,
    base: int,
    first: int,
    last: int,
    stop: int,
    limit: int,
    max_line_bytes: int,
) -> Lines:
    """Read past ``stop`` up to the last line's newline, the limit, or ``max_line_bytes``."""
    pieces = []
    position = stop
    unfinished = len(buffer) - last
    while unfinished <= max_line_bytes and position < limit:
        # Never more than the longest line allowed needs: memory stays bounded.
        wanted = min(_EXTEND_BYTES, limit - position, max_line_bytes + 1 - unfinished)
        chunk = os.pread(fd, wanted, position)
        if not chunk:  # truncated meanwhile: read_lines drops it all
            break
        newline = chunk.find(b"\n")
        if newline >= 0:
            pieces.append(chunk[: newline + 1])
            data = buffer[first:] + b"".join(pieces)
            return Lines(data, owned=True, end=position + newline + 1)
        pieces.append(chunk)
        position += len(chunk)
        unfinished += len(chunk)
    if unfinished > max_line_bytes:
        # Dropped, and counted here once; ending mid-line makes the next
        # region (or the next look) skip the rest of it.
        head = (buffer[last:] + b"".join(pieces))[:80]
        sample = f"longer than {max_line_bytes} bytes: {head!r}"
        return Lines(buffer[first:last], owned=True, end=position, overlong=1, sample=sample)
    # Unfinished at the limit: left for a later look to finish.
    return Lines(buffer[first:last], owned=True, end=base + last, pending=limit - base - last)


@attrs.frozen
class ParseOptions:
    """How a worker parses a region (pickled with each call).

    Attributes:
        batch: one message per coin (``True``) or per order.
        keep: orders of each chunk to index for the recent-orders history.
        max_samples: malformed lines described per chunk, at most.
        max_line_bytes: an unfinished line longer than this is dropped.
    """

    batch: bool
    keep: int
    max_samples: int
    max_line_bytes: int


@attrs.frozen
class ParsedRegion:
    """A region parsed in a worker: its lines' bookkeeping and the messages made of them.

    Attributes:
        lines: what the region owned, without the bytes.
        parsed: the messages, or ``None`` if it owned no whole line.
        payload_bytes: -1 if ``parsed.payloads`` holds the payloads; else
            they were left in the result buffer, this many bytes, and
            ``parsed.payloads`` is empty.
    """

    lines: Lines
    parsed: ParsedChunk | None
    payload_bytes: int = -1


def parse_region(
    region: Region, options: ParseOptions, buffer: str | None = None
) -> ParsedRegion | None:
    """Read and parse one region, in a worker process; ``None`` if its file is gone.

    Only the result crosses back to the parent: the encoded payloads (about
    two thirds of the bytes read) written into ``buffer`` if one is given
    (see ``_buffers.py``), and a few counts.
    """
    fd = region.file.open()
    if fd is None:
        return None
    try:
        lines = read_lines(fd, region, options.max_line_bytes)
    finally:
        os.close(fd)
    data = lines.data
    lines = attrs.evolve(lines, data=b"")
    if not data:
        return ParsedRegion(lines, None)
    parsed = parse_chunk(
        data, batch=options.batch, keep=options.keep, max_samples=options.max_samples
    )
    if buffer is not None and write_result(buffer, parsed.payloads):
        return ParsedRegion(lines, attrs.evolve(parsed, payloads=b""), len(parsed.payloads))
    return ParsedRegion(lines, parsed)


def parse_region_in_worker(
    region: Region, options: ParseOptions, buffer: str | None
) -> ParsedRegion | None:
    """:func:`parse_region` as a worker process runs it: with its allocator tuned first."""
    _keep_freed_memory()
    return parse_region(region, options, buffer)


@functools.cache
def _keep_freed_memory() -> None:
    """Once per worker process: let glibc's malloc keep what a region frees for the next one.

    A region allocates and frees a few MB (the bytes read, the decoded
    objects, the encoded messages). By default glibc hands the top of its
    heap back to the system each time, and the next region faults every
    page in again, a real share of its CPU time (``docs/orders.md``).
    Keeping up to 64 MiB free in the worker's heap (and serving blocks under
    32 MiB from it) removes those faults. Elsewhere than glibc this does
    nothing.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError, TypeError):  # not glibc: nothing to tune
        return
    mallopt(_M_MMAP_THRESHOLD, 32 << 20)
    mallopt(_M_TRIM_THRESHOLD, 64 << 20)
