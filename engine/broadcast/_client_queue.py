"""A client's bounded frame queue: what is offered, written, dropped, and how late.

How far behind a client is comes from marks, not from a time per frame
(which would cost a clock read per frame per client): frames leave the queue
oldest first, whether written or dropped, so each has a place in the order
frames were queued, and a mark ``(place, time)`` says that the frames from
that place on arrived no earlier than that time. A mark is made when a frame
wakes the idle writer, and when a write begins with frames queued since the
last mark. The oldest frame not written yet has waited at most ``now`` minus
the time of the last mark at or before its place: never less than its real
age, and more by at most the length of the write under way when it arrived.

Every frame offered is accounted for at every moment:
``offered == sent + dropped + queued``, where ``dropped`` is by reason:
``overflow`` (the full queue discarded its oldest) or ``closed`` (still
queued, or in a write that never finished, when the connection ended).

The queue is a ``collections.deque`` bounded by ``maxlen``, not an
``engine`` channel, because offering a frame is the broadcast's hot path
(once per frame per client) and the deque makes it cheaper:

- the deque pushes out its oldest item in C as it appends, where the
  channel's ``send_nowait`` runs Python for every frame (parked
  receivers, its counters, its peak);
- a loss must be seen as it happens (``max_lost``), and the channel only
  says so in a statistics snapshot, too dear per frame: the client would
  keep a mirror of the channel's depth, which a frame handed straight to
  the parked writer (never in the buffer) puts out of step. Here the depth
  is ``len(queue)`` itself and the write under way is ``_in_hand``;
- the writer waits on an event that a frame, a reply or a close sets,
  where a writer parked in the channel's ``receive_batch`` can only be
  woken for a reply or a close by cancelling the wait.

``docs/broadcast.md`` ("Measured") compares the two.
"""

from __future__ import annotations

import collections

import trio

from ._config import CLOSE_TOO_SLOW, BroadcastConfig

WRITE_BATCH = 1024
"""Frames joined into one socket write at most (a backlog goes out in a few writes)."""


class FrameQueue:
    """The queue side of a client: offering, lag, accounting, and the writer's wake-ups.

    Extended by ``ClientRequests`` (subscribe and unsubscribe requests) and
    then by ``Client`` (the connection: the writer, the reader, the close
    handshake), which implements :meth:`request_close`.

    Args:
        config: the server's settings (``queue_size``, ``max_lag``, ``max_lost``).
    """

    def __init__(self, config: BroadcastConfig) -> None:
        self.config = config
        self._queue: collections.deque[bytes] = collections.deque(maxlen=config.queue_size)
        self._maxsize = config.queue_size
        self._accepting = True  # until a close starts: then nothing more is offered
        self._offered = 0
        self._peak = 0
        self._in_hand = 0  # frames taken by the writer, not written yet
        # How far behind it is (see the module's docstring): marks, the place
        # of the oldest frame in hand, frames taken by the writer in total.
        self._marks: collections.deque[tuple[int, float]] = collections.deque()
        self._first_in_hand = 0
        self._taken = 0
        self._sent = 0
        self._overflow = 0
        self._discarded = 0  # frames that never went out because the connection ended
        self._waiting = False  # the writer waits for work
        self._work = trio.Event()

    def request_close(self, code: int, reason: str, cause: str, *, flush: bool = False) -> None:
        """Start closing the connection (the client's part)."""
        raise NotImplementedError

    def offer(self, frame: bytes) -> None:
        """Queue one frame; never waits. A full queue drops its oldest frame.

        Once a close has started nothing more is offered (or counted).
        """
        if not self._accepting:
            return
        queue = self._queue
        self._offered += 1
        if len(queue) == self._maxsize:
            self._overflow += 1
            queue.append(frame)  # the deque's bound pushes out the oldest
            max_lost = self.config.max_lost
            if max_lost is not None and self._overflow > max_lost:
                reason = f"too slow: lost {self._overflow} messages"
                self.request_close(CLOSE_TOO_SLOW, reason, "too_slow")
            return
        queue.append(frame)
        if len(queue) > self._peak:
            self._peak = len(queue)
        if self._waiting:
            self._mark(trio.current_time())
            self._wake_writer()

    def _mark(self, now: float) -> None:
        """Note that the frames queued from now on arrive no earlier than ``now``."""
        place = self._offered - 1 if self._waiting else self._offered
        marks = self._marks
        if marks and marks[-1][0] == place:  # no frame since: the later time is the closer
            marks[-1] = (place, now)
        else:
            marks.append((place, now))

    def lag(self, now: float) -> float:
        """How long the oldest frame not written yet has waited, at most; 0 if none.

        Never less than the real age; more by at most the length of the
        write under way when that frame arrived.
        """
        if not (self._in_hand or self._queue):
            return 0.0
        self._forget_marks()
        return now - self._marks[0][1] if self._marks else 0.0

    def _forget_marks(self) -> None:
        """Drop the marks that no frame still waiting needs: all of them if none waits."""
        marks = self._marks
        if not (self._in_hand or self._queue):
            marks.clear()
            return
        oldest = self._first_in_hand if self._in_hand else self._taken + self._overflow
        while len(marks) > 1 and marks[1][0] <= oldest:
            marks.popleft()

    def check_lag(self, now: float) -> None:
        """Close the client with ``CLOSE_TOO_SLOW`` if it is more than ``max_lag`` behind."""
        max_lag = self.config.max_lag
        if self.lag(now) > max_lag:
            reason = f"too slow: more than {max_lag:g} s behind"
            self.request_close(CLOSE_TOO_SLOW, reason, "too_slow")

    def discard(self) -> None:
        """Count every frame not written as dropped (``closed``) and let them go.

        The server calls it once the connection has ended, the writer with it.
        """
        self._accepting = False
        self._discarded += len(self._queue) + self._in_hand
        self._queue.clear()
        self._in_hand = 0

    # -- the writer's side -------------------------------------------------------

    def _wake_writer(self) -> None:
        if self._waiting:
            self._waiting = False
            self._work.set()

    async def _wait_for_work(self) -> None:
        # A frame, a reply or a close request sets the event. The frames
        # offered before the writer runs again are all queued by then.
        self._work = trio.Event()
        self._waiting = True
        try:
            await self._work.wait()
        finally:
            self._waiting = False

    def _take_batch(self) -> list[bytes]:
        """Take everything queued, up to ``WRITE_BATCH`` frames, for one write."""
        queue = self._queue
        self._mark(trio.current_time())  # what is queued from now on arrives later
        self._first_in_hand = self._taken + self._overflow
        if len(queue) <= WRITE_BATCH:
            batch = list(queue)
            queue.clear()
        else:
            batch = [queue.popleft() for _ in range(WRITE_BATCH)]
        self._taken += len(batch)
        self._in_hand = len(batch)
        return batch

    def _written(self) -> None:
        """The batch taken last is written."""
        self._sent += self._in_hand
        self._in_hand = 0
        self._forget_marks()
