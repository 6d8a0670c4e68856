"""A progress board shared with worker processes (private).

A call running in a worker process is otherwise opaque until it returns.
The board is a small file mapped into memory by the parent and by every
worker: one slot per call in flight, three 64-bit words each. The worker
writes how many items it has started; the parent reads that to see how far
a call has got, and may lower the slot's limit, after which the worker
starts no item at or past it: the parent has given those to another worker.
When asked to, the worker also writes when it started its latest item
(``time.monotonic_ns()``, a clock shared by every process of the machine),
so that the parent can end that item at its own deadline, and, once it
starts no more items, when it began to send the results back (negated).

Nothing here synchronises: each word has one writer. The worker claims an
item (reports it started) before it looks at the limit, and gives the
claim back if the item is past it; the parent lowers the limit, then reads
how far the worker has got, and takes only what lies past both. Without a
memory fence, both reads can, rarely, be stale at once: then one item runs
in both calls, and the batch keeps only the second call's result (see
``_batch_runners``). A call that must run each item at most once is never
cut. The worker writes an item's start time before it claims the item, and
the parent reads the claims before the time: where each core's stores are
seen in order (x86), a time read is never older than the claim read before
it; elsewhere the same rare staleness could show the previous item's time.
"""

from __future__ import annotations

import collections
import contextlib
import mmap
import os
import tempfile

import attrs

_WORDS_PER_SLOT = 3  # limit, items started, when the latest started
_LIMIT, _STARTED, _STARTED_AT = 0, 1, 2
_WORD = 8
# A slot's limit while nothing is cut: past any chunk.
NO_LIMIT = 1 << 62


class Board:
    """The parent's side: slots to lend to calls, read and cut."""

    def __init__(self, slots: int) -> None:
        # Memory-backed where the system has it; any file works, only its pages are used.
        directory = "/dev/shm" if os.path.isdir("/dev/shm") else None
        fd, self.path = tempfile.mkstemp(prefix="engine-board-", dir=directory)
        try:
            os.ftruncate(fd, max(1, slots) * _WORDS_PER_SLOT * _WORD)
            self._map = mmap.mmap(fd, 0)
        finally:
            os.close(fd)
        self._words = memoryview(self._map).cast("q")
        self._free = list(range(slots))

    def take(self) -> int:
        """A free slot, cleared for a new call."""
        slot = self._free.pop()
        self._words[slot * _WORDS_PER_SLOT + _LIMIT] = NO_LIMIT
        self._words[slot * _WORDS_PER_SLOT + _STARTED] = 0
        self._words[slot * _WORDS_PER_SLOT + _STARTED_AT] = 0
        return slot

    def give_back(self, slot: int) -> None:
        self._free.append(slot)

    def started(self, slot: int) -> int:
        """Items the call in ``slot`` has started so far."""
        return int(self._words[slot * _WORDS_PER_SLOT + _STARTED])

    def started_at(self, slot: int) -> int:
        """When the call in ``slot`` started its latest item, in ``time.monotonic_ns()``.

        0 if it has written no time (it started none, or was not asked to);
        below 0 once it starts no more items: minus when it began to send
        their results back (see :meth:`Slot.report_sending`).
        """
        return int(self._words[slot * _WORDS_PER_SLOT + _STARTED_AT])

    def cut(self, slot: int, limit: int) -> None:
        """Ask the call in ``slot`` to start no item at or past position ``limit``."""
        self._words[slot * _WORDS_PER_SLOT + _LIMIT] = limit

    def close(self) -> None:
        self._words.release()
        self._map.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


@attrs.frozen
class CallSlot:
    """One slot of a board, lent to one call: the parent's view of that call."""

    board: Board
    slot: int

    @property
    def address(self) -> tuple[str, int]:
        """What the worker opens its :class:`Slot` with."""
        return self.board.path, self.slot

    def started(self) -> int:
        """Items the call has started so far (see :meth:`Board.started`)."""
        return self.board.started(self.slot)

    def started_at(self) -> int:
        """When the call started its latest item (see :meth:`Board.started_at`)."""
        return self.board.started_at(self.slot)

    def cut(self, limit: int) -> None:
        """Ask the call to start no item at or past position ``limit``."""
        self.board.cut(self.slot, limit)


# -- the worker's side --------------------------------------------------------------

# Boards this worker has mapped, most recent last. A worker serves one pool,
# so it maps that pool's board once, at its first batch call, and keeps it.
_MAPPED: collections.OrderedDict[str, memoryview] = collections.OrderedDict()
_KEEP = 8


class Slot:
    """A worker's view of one slot: report progress, see a cut."""

    def __init__(self, path: str, slot: int) -> None:
        words = _MAPPED.get(path)
        if words is None:
            with open(path, "r+b") as file:
                words = memoryview(mmap.mmap(file.fileno(), 0)).cast("q")
            _MAPPED[path] = words
            while len(_MAPPED) > _KEEP:
                _MAPPED.popitem(last=False)[1].release()
        _MAPPED.move_to_end(path)
        self._words = words
        self._base = slot * _WORDS_PER_SLOT

    def limit(self) -> int:
        """The first position the call may not start (:data:`NO_LIMIT` until cut)."""
        return int(self._words[self._base + _LIMIT])

    def report(self, started: int) -> None:
        """Tell the parent ``started`` items have been started."""
        self._words[self._base + _STARTED] = started

    def report_time(self, started_at: int) -> None:
        """Tell the parent when the item about to be claimed starts (``time.monotonic_ns()``)."""
        self._words[self._base + _STARTED_AT] = started_at

    def report_sending(self, since: int) -> None:
        """Tell the parent the call starts no more items; their results go back from ``since``."""
        self._words[self._base + _STARTED_AT] = -since
