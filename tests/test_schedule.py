"""How a batch sizes its calls: plain numbers in, plain decisions out, no trio."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from engine import _schedule as schedule
from engine._schedule import InFlight, Limits, Plan, Share

TICK = 2**-10  # sums of ticks are exact, so times can be asserted exactly
NO_DEADLINE = Limits(items=1_000, workers=2, deadline=math.inf, chunk_size=None)


def plan(
    limits: Limits = NO_DEADLINE,
    *,
    waiting: int,
    per_item: float | None,
    speed: float | None = None,
    now: float = 0.0,
    running: tuple[InFlight, ...] = (),
    chunked: bool = True,
) -> Plan:
    return schedule.plan_call(
        limits,
        chunked=chunked,
        waiting=waiting,
        speed=speed,
        per_item=per_item,
        now=now,
        running=running,
    )


# -- counting items in seconds ---------------------------------------------------------------


def test_a_decimal_quotient_that_is_whole_counts_as_whole() -> None:
    assert 0.7 / 0.1 < 7  # what floating point gives
    assert schedule.items_within(0.7, 0.1) == 7
    assert schedule.items_to_fill(0.7, 0.1) == 7
    assert 0.05 / 0.001 == 50
    assert schedule.items_within(0.05, 0.001) == 50
    # Past the tolerance, a part of an item is a part.
    assert schedule.items_within(0.0505, 0.001) == 50
    assert schedule.items_to_fill(0.0505, 0.001) == 51


@given(
    count=st.integers(0, 100_000),
    per_item=st.sampled_from([1e-6, 0.001, 0.003, 0.01, 0.1, TICK, 3 * TICK, 1 / 3]),
)
def test_whole_numbers_of_items_count_exactly(count: int, per_item: float) -> None:
    seconds = count * per_item
    assert schedule.items_within(seconds, per_item) == count
    assert schedule.items_to_fill(seconds, per_item) == count


def test_a_call_carries_at_most_8_mib_of_items_but_always_one() -> None:
    mib = 1 << 20
    assert schedule.items_within_bytes(20, 8 * mib) == 20
    assert schedule.items_within_bytes(20, 20 * mib) == 8
    assert schedule.items_within_bytes(20, 1000 * mib) == 1
    assert schedule.items_within_bytes(1, 1000 * mib) == 1


# -- a call's own clock ----------------------------------------------------------------------


def test_a_call_past_its_time_starts_no_item_but_to_finish_a_small_rest() -> None:
    may_start = schedule.may_start
    assert may_start(0.0, 0, 10, stop_after=0.0)  # the first item always runs
    assert may_start(0.19, 19, 81, stop_after=0.2)
    assert not may_start(0.2, 20, 80, stop_after=0.2)
    # Past the time, a rest that ends within a quarter more still runs.
    assert may_start(0.2, 20, 5, stop_after=0.2)
    assert not may_start(0.2, 20, 6, stop_after=0.2)
    assert not may_start(0.26, 26, 1, stop_after=0.2)


def test_a_clock_limited_call_gets_all_but_its_latest_start_of_the_deadline() -> None:
    chunk_deadline = schedule.chunk_deadline
    assert chunk_deadline(60, 1, 0.2) == 60  # alone: the whole deadline
    assert chunk_deadline(60, 10, 0.2) == 60 - 0.25  # every item starts by 0.25 s
    assert chunk_deadline(60, 10) == 30  # no clock: half
    assert chunk_deadline(1, 10, 0.5) == 0.5  # a clock too long for the deadline: half


# -- sizing the next call --------------------------------------------------------------------


def test_a_runner_of_single_items_and_a_fixed_chunk_size_are_taken_as_they_are() -> None:
    assert plan(waiting=900, per_item=0.001, chunked=False) == Plan(1, math.inf)
    fixed = Limits(items=1_000, workers=2, deadline=60.0, chunk_size=7)
    assert plan(fixed, waiting=3, per_item=None) == Plan(7, math.inf)


def test_first_calls_take_an_even_share_and_stop_by_their_clock() -> None:
    assert plan(waiting=1_000, per_item=None) == Plan(500, 0.2)
    assert plan(waiting=300, per_item=None) == Plan(300, 0.2)
    many = Limits(items=100_000, workers=2, deadline=math.inf, chunk_size=None)
    assert plan(many, waiting=100_000, per_item=None) == Plan(schedule.MAX_CHUNK, 0.2)
    # A short deadline shortens the call: an eighth of it, and the clock twice that.
    short = Limits(items=1_000, workers=2, deadline=0.4, chunk_size=None)
    assert plan(short, waiting=1_000, per_item=None) == Plan(500, 0.1)


def test_measured_calls_carry_100_ms_of_work_at_their_workers_speed() -> None:
    assert plan(waiting=10_000, per_item=0.001) == Plan(100, 0.2)
    assert plan(waiting=10_000, per_item=0.001, speed=0.002) == Plan(50, 0.2)
    # An eighth of a 0.36 s deadline is 450 items of 0.1 ms, not 449.
    assert 0.36 / 8 / 0.0001 < 450
    short = Limits(items=10_000, workers=2, deadline=0.36, chunk_size=None)
    assert plan(short, waiting=10_000, per_item=0.0001) == Plan(450, 0.09)
    # Items quicker than the clock can measure: as many as a call may carry.
    assert plan(waiting=10_000, per_item=0.0) == Plan(schedule.MAX_CHUNK, 0.2)


def test_the_last_calls_are_shared_so_that_the_workers_end_together() -> None:
    # Two free workers, 30 items of 1 ms: 15 each.
    assert plan(waiting=30, per_item=0.001) == Plan(15, 0.2)
    # The other worker is halfway through 100 items of 1 ms, due at 0.1 s:
    # this one takes 75 of the 100 waiting, and both end at 0.125 s.
    other = InFlight(sent=0.0, size=100, begun=50, speed=0.001, stop_after=0.2, shareable=True)
    assert plan(waiting=100, per_item=0.001, now=0.05, running=(other,)) == Plan(75, 0.2)


def test_the_last_calls_leave_no_crumb_for_one_more_call() -> None:
    # Split evenly, 6 items of 1 ms would be 3 each, under 4 ms of work:
    # this worker takes all 6.
    assert plan(waiting=6, per_item=0.001) == Plan(6, 0.2)
    # 10 left: 5 each is worth two calls.
    assert plan(waiting=10, per_item=0.001) == Plan(5, 0.2)


@given(
    waiting=st.integers(1, 50_000),
    per_item=st.one_of(st.none(), st.floats(0.0, 1.0)),
    speed=st.one_of(st.none(), st.floats(0.0, 1.0)),
    workers=st.integers(1, 8),
    deadline=st.sampled_from([math.inf, 60.0, 1.0, 0.01]),
    now=st.floats(0.0, 1e4),
)
def test_every_call_takes_at_least_one_item_and_at_most_a_chunk(
    waiting: int,
    per_item: float | None,
    speed: float | None,
    workers: int,
    deadline: float,
    now: float,
) -> None:
    limits = Limits(items=50_000, workers=workers, deadline=deadline, chunk_size=None)
    running = tuple(
        InFlight(sent=now, size=100, begun=position, speed=speed, stop_after=0.2, shareable=True)
        for position in range(workers - 1)
    )
    planned = plan(
        limits, waiting=waiting, per_item=per_item, speed=speed, now=now, running=running
    )
    # (More than a chunk only to take every item left, rather than leave a
    # crumb for one more call.)
    assert 1 <= planned.size <= schedule.MAX_CHUNK or planned.size == waiting
    assert planned.stop_after == 2 * min(schedule.TARGET_CALL_SECONDS, deadline / 8)
    if per_item is None:
        assert planned.size <= waiting


# -- where the running calls end -------------------------------------------------------------


def test_a_running_call_ends_at_its_pace_but_by_its_clock() -> None:
    call = InFlight(sent=0.0, size=100, begun=10, speed=0.001, stop_after=0.2, shareable=True)
    assert schedule.expected_end(0.005, call, per_item=0.5) == pytest.approx((0.1, 0.001))
    # Its first call: the pace so far (9 items done in 0.09 s), once it has one.
    first = InFlight(sent=0.0, size=20, begun=10, speed=None, stop_after=0.2, shareable=True)
    assert schedule.expected_end(0.09, first, per_item=0.5) == pytest.approx((0.2, 0.01))
    unseen = InFlight(sent=0.0, size=20, begun=0, speed=None, stop_after=math.inf, shareable=False)
    assert schedule.expected_end(0.0, unseen, per_item=0.001) == pytest.approx((0.02, 0.001))
    # Slow items: its worker starts none after 0.25 s, and ends that one.
    slow = InFlight(sent=0.0, size=100, begun=10, speed=0.1, stop_after=0.2, shareable=True)
    assert schedule.expected_end(1.0, slow, per_item=0.1) == pytest.approx((0.25 + 0.1, 0.1))


def test_the_balanced_end_counts_each_workers_own_speed() -> None:
    balanced_end = schedule.balanced_end
    # Alone until 10 s at 1 item/s (10 items); then joined by a worker doing
    # 2 items/s: the other 20 take 20/3 s more.
    assert balanced_end(0.0, 30, 1.0, 2, [(10.0, 0.5)]) == pytest.approx(10 + 20 / 3)
    # The running worker never frees up in time: the asker does them all.
    assert balanced_end(0.0, 5, 1.0, 2, [(100.0, 0.5)]) == 5
    # Two free workers of equal speed split evenly.
    assert balanced_end(0.0, 10, 1.0, 2, []) == 5


@given(
    waiting=st.integers(1, 10_000),
    per_item=st.floats(1e-4, 1.0),
    running=st.lists(st.tuples(st.floats(0.0, 100.0), st.floats(1e-4, 1.0)), max_size=6),
    idle=st.integers(1, 4),
)
def test_the_balanced_end_does_the_waiting_items_on_the_workers_free_by_then(
    waiting: int, per_item: float, running: list[tuple[float, float]], idle: int
) -> None:
    now = 1.0
    end = schedule.balanced_end(now, waiting, per_item, len(running) + idle, running)
    workers = [(now, per_item)] * idle + [(max(now, ends), speed) for ends, speed in running]
    done = sum((end - free_at) / speed for free_at, speed in workers if free_at < end)
    assert done == pytest.approx(waiting, rel=1e-6)
    assert end >= now


# -- sharing a slow call ---------------------------------------------------------------------


def test_a_worker_out_of_work_takes_the_later_part_of_the_call_that_ends_last() -> None:
    # Its first call of 200 items, 67 begun by 200 ticks: a pace of 3 ticks
    # an item so far. It keeps 66 more, and the asking worker takes 133-199:
    # both end at 400 ticks and a bit.
    slow = InFlight(sent=0.0, size=200, begun=67, speed=None, stop_after=0.2, shareable=True)
    quick = InFlight(sent=0.0, size=200, begun=150, speed=TICK, stop_after=0.2, shareable=True)
    now = 200 * TICK
    assert schedule.share_slowest(now, [quick, slow], per_item=TICK) == Share(1, 133, 200)


def test_a_call_is_shared_only_when_it_can_be_cut_and_has_enough_left() -> None:
    now = 200 * TICK
    slow = InFlight(sent=0.0, size=200, begun=67, speed=None, stop_after=0.2, shareable=False)
    assert schedule.share_slowest(now, [slow], per_item=TICK) is None
    assert schedule.share_slowest(now, [], per_item=TICK) is None
    assert schedule.share_slowest(now, [slow], per_item=None) is None  # nothing measured
    # 6 ms ahead: under the 8 ms that makes sharing worth a call.
    near = InFlight(sent=0.0, size=16, begun=10, speed=0.001, stop_after=0.2, shareable=True)
    assert schedule.share_slowest(0.01, [near], per_item=0.001) is None
    # 20 ms ahead: this worker would take 10 ms of it.
    far = InFlight(sent=0.0, size=30, begun=10, speed=0.001, stop_after=0.2, shareable=True)
    assert schedule.share_slowest(0.01, [far], per_item=0.001) == Share(0, 20, 30)
