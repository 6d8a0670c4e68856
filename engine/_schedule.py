"""How a batch sizes its calls: plain numbers in, plain decisions out (private).

No trio here, and no state: the batch gathers what it knows (items
waiting, seconds per item measured so far, the calls in flight and how far
each has got) and carries out what these functions decide. Times are in
seconds, on any one clock; counts are items.

The rules:

- a call aims at :data:`TARGET_CALL_SECONDS` of work (at most an eighth of
  the item deadline), and its worker starts no item after twice that
  (:func:`may_start`), so a call of slower items than measured ends anyway;
- before anything is measured, each worker is sent an even share;
- near the end, what is left is shared so that every worker ends at once
  (:func:`balanced_end`), never in calls under :data:`MIN_CALL_SECONDS` of
  work, and leaving no crumb behind for one more call;
- a worker with nothing left to take takes the later part of the running
  call that would end last (:func:`share_slowest`), split so that both end
  together.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import attrs

# Aim for calls of about this much work: each call costs a round trip during
# which its worker idles, and the last calls are sized to end together, so
# long calls cost nothing at the end. Progress and outcomes arrive a call at
# a time.
TARGET_CALL_SECONDS = 0.1
# The last calls are never smaller than this much work: smaller ones cost
# more in dispatch than they save in waiting.
MIN_CALL_SECONDS = 0.004
# The usual most items per call. The last call of a batch may take up to
# twice this, less one, rather than leave a crumb for one more call.
MAX_CHUNK = 4096
# A worker with nothing left to take shares a running call that still has
# more than this much work ahead (and takes at least MIN_CALL_SECONDS of it).
SHARE_AFTER_SECONDS = 2 * MIN_CALL_SECONDS
# A call carries at most this much pickled input (unless one item is more):
# items that it has no time left to start travel for nothing.
MAX_CALL_BYTES = 8 << 20
# A call past its ``stop_after`` still finishes a remainder that, at its pace
# so far, ends within this factor of ``stop_after``: a last few items cost
# less to run than to send back for one more call.
GRACE = 1.25
# Seconds per item below which a measurement counts as this: no call of a
# Python function is faster, and items quicker than the clock measure 0.
FASTEST_ITEM = 1e-7
# Counts of items are quotients of seconds that are sums of measured or
# declared floats: one that is whole in decimal can land a hair off the
# whole number (0.7 / 0.1 == 6.999999999999999). A quotient within this
# of a whole number counts as that number.
WHOLE = 1e-9


def items_within(seconds: float, per_item: float) -> int:
    """How many items of ``per_item`` seconds fit in ``seconds`` (rounded down)."""
    return math.floor(seconds / per_item + WHOLE)


def items_to_fill(seconds: float, per_item: float) -> int:
    """How many items of ``per_item`` seconds it takes to fill ``seconds`` (rounded up)."""
    return math.ceil(seconds / per_item - WHOLE)


# -- a call's own clock ------------------------------------------------------------


def may_start(elapsed: float, done: int, left: int, stop_after: float) -> bool:
    """Whether a call starts its next item.

    ``elapsed`` seconds into the call, with ``done`` items run and ``left``
    still to go (the next one included).

    Always before ``stop_after``; after it, only if the rest, at the call's
    pace so far, would end by ``stop_after * GRACE``. So every item starts
    within ``stop_after * GRACE`` of the call's start.
    """
    if not done or elapsed < stop_after:
        return True
    return elapsed + left * elapsed / done <= latest_start(stop_after)


def latest_start(stop_after: float) -> float:
    """The latest a call limited by ``stop_after`` starts an item (see :func:`may_start`)."""
    return stop_after * GRACE


def chunk_deadline(deadline: float, size: int, stop_after: float = math.inf) -> float:
    """How long a call of ``size`` items may run in a worker that cannot report progress.

    A lone item gets its full deadline. A call limited by ``stop_after`` (see
    :func:`may_start`) starts every item within ``latest = stop_after *
    GRACE``, and gets ``deadline - latest``, so no item is cut before it has
    had ``deadline - 2 * latest``. If the call runs out, its items run again
    alone, first in line, and a hung one is cut at most ``deadline - latest``
    + (its chunk-mates before it, all started within ``latest``) +
    ``deadline`` after its first dispatch: within twice its deadline. A chunk
    without such a limit gets half the deadline.
    """
    latest = latest_start(stop_after)
    if size == 1:
        return deadline
    if latest < deadline / 2:
        return deadline - latest
    return deadline / 2


def items_within_bytes(count: int, pickled: int) -> int:
    """How many of ``count`` items, ``pickled`` bytes together, one call carries (at least one)."""
    if pickled <= MAX_CALL_BYTES or count <= 1:
        return count
    return max(1, count * MAX_CALL_BYTES // pickled)


# -- sizing the next call -----------------------------------------------------------


@attrs.frozen
class Limits:
    """What a batch fixes once, as its calls are sized.

    Attributes:
        items: items in the batch.
        workers: calls in flight at most.
        deadline: seconds an item may run (``math.inf`` for none).
        chunk_size: items per call, when fixed by the caller; ``None`` to size by time.
    """

    items: int
    workers: int
    deadline: float
    chunk_size: int | None


@attrs.frozen
class InFlight:
    """A call in flight, as the next calls are sized around it.

    Attributes:
        sent: when it was sent.
        size: the items it has, not counting any given to another call.
        begun: how many of them it has started (0 where that cannot be seen).
        speed: its worker's seconds per item from an earlier call, if any.
        stop_after: its worker starts no item after this (see :func:`may_start`).
        shareable: whether part of it can be taken for another call.
    """

    sent: float
    size: int
    begun: int
    speed: float | None
    stop_after: float
    shareable: bool


@attrs.frozen
class Plan:
    """The next call: how many items it takes, and when its worker stops starting them."""

    size: int
    stop_after: float


def plan_call(
    limits: Limits,
    *,
    chunked: bool,
    waiting: int,
    speed: float | None,
    per_item: float | None,
    now: float,
    running: Sequence[InFlight],
) -> Plan:
    """Size the next call of a worker.

    Args:
        limits: the batch's fixed limits.
        chunked: whether the runner takes calls of more than one item.
        waiting: items in line (at least one).
        speed: this worker's seconds per item, from its last call of several.
        per_item: seconds per item over the whole batch so far; ``None``
            before anything is measured.
        now: the time.
        running: the calls in flight.
    """
    if not chunked:
        return Plan(1, math.inf)
    if limits.chunk_size is not None:
        return Plan(limits.chunk_size, math.inf)
    budget = TARGET_CALL_SECONDS
    if math.isfinite(limits.deadline):
        budget = min(budget, limits.deadline / 8)
    # The worker starts no item after twice the aim: a call whose items
    # prove slower than measured ends anyway, and the unmeasured first
    # calls end by the clock. (So the call can be given all but this of
    # the deadline; see chunk_deadline.)
    stop_after = 2 * budget
    if per_item is None:
        # Nothing measured yet: an even share, for the worker's clock to
        # cut short if the items are slow. A worker that turns out slower
        # than the others has its call shared when they run out of work.
        share = math.ceil(limits.items / limits.workers)
        return Plan(min(MAX_CHUNK, share, waiting), stop_after)
    pace = max(speed or per_item, FASTEST_ITEM)
    size = max(1, min(items_within(budget, pace), MAX_CHUNK))
    # Near the end, share what is left so that every worker ends at once,
    # counting what the running calls still have to do and how fast their
    # workers go. Not into calls too small to be worth their dispatch,
    # though, and leave no crumb behind for one more call.
    ends = [expected_end(now, call, per_item) for call in running]
    end = balanced_end(now, waiting, pace, limits.workers, ends)
    fair = items_to_fill(end - now, pace)
    floor = max(1, min(size, items_within(MIN_CALL_SECONDS, pace)))
    size = min(size, max(fair, floor))
    if waiting - size < floor and waiting * pace <= budget:
        size = waiting
    return Plan(size, stop_after)


def expected_end(now: float, call: InFlight, per_item: float) -> tuple[float, float]:
    """When a running call should end, and its worker's seconds per item.

    ``per_item`` stands in for the worker's speed until the call has shown
    its own pace.
    """
    speed = call.speed
    if speed is None:
        # Its worker's first call: the pace so far, once an item is done.
        speed = (now - call.sent) / (call.begun - 1) if call.begun > 1 else per_item
    # The item running now ends when the call's pace says, but not before now.
    end = max(now, call.sent + call.begun * speed) + (call.size - call.begun) * speed
    return min(end, call.sent + latest_start(call.stop_after) + speed), speed


def balanced_end(
    now: float,
    waiting: int,
    per_item: float,
    workers: int,
    running: Sequence[tuple[float, float]],
) -> float:
    """When ``waiting`` items would all be done, shared so that every worker ends at once.

    The asking worker is free now and does an item in ``per_item`` seconds;
    each running call ``(ends, per_item)`` frees its worker at ``ends``, which
    then goes at its own speed; other workers are free now, at ``per_item``.
    Solves ``sum((end - free_at) / speed) == waiting`` over the workers free
    by ``end``.
    """
    starts = [(now, per_item)] * (workers - len(running)) + [
        (max(now, ends), speed) for ends, speed in running
    ]
    starts.sort()
    rate = 0.0  # items per second of the workers free so far
    offset = 0.0  # sum of free_at * their rates
    for position, (free_at, speed) in enumerate(starts):
        rate += 1 / max(speed, FASTEST_ITEM)
        offset += free_at / max(speed, FASTEST_ITEM)
        end = (waiting + offset) / rate
        if position + 1 == len(starts) or end <= starts[position + 1][0]:
            return end
    return now  # no workers: unreachable, ``workers`` is at least 1


# -- sharing a slow call ---------------------------------------------------------------


@attrs.frozen
class Share:
    """Part of a running call for a worker out of work.

    Attributes:
        call: the call's position in the calls given to :func:`share_slowest`.
        cut: the first item (by position in that call) to take from it.
        end: where its items end (past ``end`` they were another call's already).
    """

    call: int
    cut: int
    end: int


def share_slowest(now: float, running: Sequence[InFlight], per_item: float | None) -> Share | None:
    """Which part of which running call a worker out of work takes, if any.

    The call that would end last, if it still has more than
    :data:`SHARE_AFTER_SECONDS` of work ahead: its items not started yet
    are split so that its worker and the asking one, free now, end
    together; the asking worker's part is the later one. Both parts are
    reckoned at the call's pace so far: whether it is slow for its items or
    for its CPU cannot be told apart, and if the two still end apart, the
    one done first takes part of the other's rest again. ``None`` when no
    call is worth sharing, or the part taken would be under
    :data:`MIN_CALL_SECONDS` of work.
    """
    if per_item is None:
        return None
    chosen, latest, pace = None, now + SHARE_AFTER_SECONDS, per_item
    for position, call in enumerate(running):
        if not call.shareable:
            continue
        end, its_pace = expected_end(now, call, per_item)
        if end > latest:
            chosen, latest, pace = position, end, its_pace
    if chosen is None:
        return None
    call = running[chosen]
    left = call.size - call.begun
    # It ends the item it runs now at ``busy_until`` and then ``keep`` more;
    # the asking worker, free now, does the other ``left - keep``.
    busy_until = max(now, call.sent + call.begun * pace)
    keep = max(1, items_to_fill(now - busy_until + left * pace, 2 * pace))
    if (left - keep) * pace < MIN_CALL_SECONDS:
        return None
    return Share(chosen, call.begun + keep, call.size)
