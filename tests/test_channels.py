"""Bounded channels: policies, backpressure, closing, batches, and the conservation law."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

import engine
from engine._channels import OverflowName


def drain(receive: engine.ReceiveChannel[Any]) -> list[Any]:
    taken = []
    while True:
        try:
            taken.append(receive.receive_nowait())
        except (trio.WouldBlock, trio.EndOfChannel):
            return taken


async def test_messages_arrive_in_order_and_iteration_ends_at_close() -> None:
    send, receive = engine.open_channel[int](10)
    async with send:
        for i in range(5):
            await send.send(i)
    assert [m async for m in receive] == [0, 1, 2, 3, 4]
    stats = receive.statistics()
    assert (stats.sent, stats.delivered, stats.dropped, stats.depth) == (5, 5, 0, 0)
    assert stats.peak_depth == 5


@pytest.mark.parametrize(
    ("overflow", "kept", "dropped"),
    [
        ("drop_newest", [0, 1, 2], 7),
        ("drop_oldest", [7, 8, 9], 7),
    ],
)
async def test_drop_policies_drop_exactly_the_right_messages(
    overflow: OverflowName, kept: list[int], dropped: int
) -> None:
    send, receive = engine.open_channel[int](3, overflow=overflow)
    for i in range(10):
        await send.send(i)  # never waits
    stats = send.statistics()
    assert (stats.sent, stats.dropped, stats.depth, stats.peak_depth) == (10, dropped, 3, 3)
    assert drain(receive) == kept


async def test_block_applies_backpressure_in_virtual_time(autojump_clock: trio.abc.Clock) -> None:
    send, receive = engine.open_channel[int](2)
    sent_at: list[float] = []

    async def producer() -> None:
        for i in range(5):
            await send.send(i)
            sent_at.append(trio.current_time())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(producer)
        await trio.testing.wait_all_tasks_blocked()
        assert send.statistics().senders_waiting == 1
        with pytest.raises(trio.WouldBlock):
            send.send_nowait(99)
        received = []
        for _ in range(5):
            await trio.sleep(1)
            received.append(await receive.receive())
    # Two fit at once; each later send completes when the consumer makes room.
    assert sent_at == [0, 0, 1, 2, 3]
    assert received == [0, 1, 2, 3, 4]
    assert send.statistics().dropped == 0


async def test_cancelled_send_is_not_sent_and_cancelled_receive_takes_nothing(
    autojump_clock: trio.abc.Clock,
) -> None:
    send, receive = engine.open_channel[str](1)
    await send.send("a")
    with trio.move_on_after(5) as scope:
        await send.send("b")  # blocks: the buffer is full
    assert scope.cancelled_caught
    assert send.statistics().sent == 1
    assert send.statistics().senders_waiting == 0
    assert await receive.receive() == "a"
    with trio.move_on_after(5) as scope:
        await receive.receive()
    assert scope.cancelled_caught
    assert receive.statistics().receivers_waiting == 0
    await send.send("c")
    assert receive.receive_nowait() == "c"


async def test_a_blocked_sender_admitted_later_can_close_its_handle() -> None:
    send, receive = engine.open_channel[int](1)
    async with trio.open_nursery() as nursery:

        async def producer() -> None:
            async with send:
                await send.send(1)
                await send.send(2)  # parks until the consumer takes 1

        nursery.start_soon(producer)
        await trio.testing.wait_all_tasks_blocked()
        assert [m async for m in receive] == [1, 2]


async def test_receive_batch_takes_what_is_buffered_up_to_the_maximum() -> None:
    send, receive = engine.open_channel[int](100)
    for i in range(10):
        send.send_nowait(i)
    assert await receive.receive_batch(4) == [0, 1, 2, 3]
    assert receive.receive_batch_nowait(100) == [4, 5, 6, 7, 8, 9]
    with pytest.raises(trio.WouldBlock):
        receive.receive_batch_nowait(5)
    with pytest.raises(ValueError, match="max_items must be >= 1, got 0"):
        await receive.receive_batch(0)
    send.close()
    with pytest.raises(trio.EndOfChannel):
        await receive.receive_batch(5)


async def test_receive_batch_waits_then_gets_the_message_handed_over() -> None:
    send, receive = engine.open_channel[int](4)
    batches: list[list[int]] = []

    async def consumer() -> None:
        batches.append(await receive.receive_batch(10))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(consumer)
        await trio.testing.wait_all_tasks_blocked()
        assert receive.statistics().receivers_waiting == 1
        send.send_nowait(7)
    assert batches == [[7]]
    assert receive.statistics().delivered == 1


async def test_receive_batch_admits_blocked_senders() -> None:
    send, receive = engine.open_channel[int](2)
    async with trio.open_nursery() as nursery:
        for i in range(5):
            nursery.start_soon(send.send, i)
            await trio.testing.wait_all_tasks_blocked()
        assert send.statistics().senders_waiting == 3
        assert receive.receive_batch_nowait(10) == [0, 1]
        assert send.statistics().senders_waiting == 1  # two moved into the buffer
        assert receive.receive_batch_nowait(10) == [2, 3]
        assert receive.receive_batch_nowait(10) == [4]


async def test_send_batch_nowait_hands_to_parked_receivers_in_order_then_buffers() -> None:
    send, receive = engine.open_channel[int](10)
    got: dict[str, object] = {}

    async def one() -> None:
        got["receive"] = await receive.receive()

    async def batch() -> None:
        got["receive_batch"] = await receive.receive_batch(3)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(one)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(batch)
        await trio.testing.wait_all_tasks_blocked()
        send.send_batch_nowait([1, 2, 3, 4, 5, 6])
    # Parked first, served first (the two then wake in either order).
    assert got == {"receive": 1, "receive_batch": [2, 3, 4]}
    assert drain(receive) == [5, 6]
    stats = send.statistics()
    assert (stats.sent, stats.delivered, stats.dropped, stats.depth) == (6, 6, 0, 0)
    assert stats.peak_depth == 2


async def test_send_batch_nowait_under_block_sends_all_or_nothing() -> None:
    send, receive = engine.open_channel[int](3)
    send.send_nowait(0)
    with pytest.raises(trio.WouldBlock):
        send.send_batch_nowait([1, 2, 3])
    stats = send.statistics()
    assert (stats.sent, stats.depth, stats.peak_depth) == (1, 1, 1)
    send.send_batch_nowait([1, 2])
    send.send_batch_nowait([])
    assert drain(receive) == [0, 1, 2]


async def test_send_batch_nowait_on_closed_or_broken_channels() -> None:
    send, receive = engine.open_channel[int](3)
    other = send.clone()
    other.close()
    with pytest.raises(trio.ClosedResourceError):
        other.send_batch_nowait([1])
    receive.close()
    with pytest.raises(trio.BrokenResourceError):
        send.send_batch_nowait([1])
    assert send.statistics().sent == 0


@settings(max_examples=300, deadline=None)
@given(
    overflow=st.sampled_from(["block", "drop_newest", "drop_oldest"]),
    maxsize=st.integers(1, 5),
    before=st.integers(0, 5),
    batch=st.lists(st.integers(), max_size=12),
)
def test_send_batch_nowait_equals_send_nowait_for_each(
    overflow: OverflowName, maxsize: int, before: int, batch: list[int]
) -> None:
    one, one_receive = engine.open_channel[int](maxsize, overflow=overflow)
    many, many_receive = engine.open_channel[int](maxsize, overflow=overflow)
    for i in range(min(before, maxsize)):
        one.send_nowait(-i)
        many.send_nowait(-i)
    fits = len(batch) <= maxsize - min(before, maxsize)
    if overflow == "block" and not fits:
        with pytest.raises(trio.WouldBlock):
            many.send_batch_nowait(batch)
        batch = []  # nothing was sent: compare with sending nothing
    else:
        many.send_batch_nowait(batch)
    for value in batch:
        one.send_nowait(value)
    assert many.statistics() == one.statistics()
    assert drain(many_receive) == drain(one_receive)


async def test_end_of_channel_only_when_every_send_clone_is_closed() -> None:
    send, receive = engine.open_channel[int](5)
    other = send.clone()
    await send.aclose()
    other.send_nowait(1)
    assert receive.receive_nowait() == 1
    with pytest.raises(trio.WouldBlock):
        receive.receive_nowait()
    other.close()
    with pytest.raises(trio.EndOfChannel):
        receive.receive_nowait()
    assert receive.statistics().open_send_channels == 0


async def test_closing_wakes_parked_tasks_with_the_right_errors() -> None:
    send, receive = engine.open_channel[int](1)
    results: dict[str, type[BaseException]] = {}

    async def record(label: str, fn: Any, *args: Any) -> None:
        try:
            await fn(*args)
        except (trio.ClosedResourceError, trio.BrokenResourceError, trio.EndOfChannel) as exc:
            results[label] = type(exc)

    send.send_nowait(0)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(record, "parked sender", send.send, 1)
        await trio.testing.wait_all_tasks_blocked()
        receive.close()
    assert results == {"parked sender": trio.BrokenResourceError}
    with pytest.raises(trio.BrokenResourceError):
        send.send_nowait(2)
    assert send.statistics().depth == 1  # undelivered, and still counted

    send, receive = engine.open_channel[int](1)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(record, "parked receiver", receive.receive)
        nursery.start_soon(record, "closed own handle", receive.clone().receive)
        await trio.testing.wait_all_tasks_blocked()
        send.close()
    assert results["parked receiver"] is trio.EndOfChannel
    assert results["closed own handle"] is trio.EndOfChannel

    send, receive = engine.open_channel[int](1)
    await send.aclose()
    with pytest.raises(trio.ClosedResourceError):
        send.send_nowait(1)
    with pytest.raises(trio.ClosedResourceError):
        send.clone()
    await receive.aclose()
    with pytest.raises(trio.ClosedResourceError):
        await receive.receive()


async def test_many_receivers_each_message_once() -> None:
    send, receive = engine.open_channel[int](8)
    got: list[int] = []

    async def consumer(channel: engine.ReceiveChannel[int]) -> None:
        async with channel:
            async for message in channel:
                got.append(message)
                await trio.lowlevel.checkpoint()

    async with trio.open_nursery() as nursery:
        for _ in range(3):
            nursery.start_soon(consumer, receive.clone())
        receive.close()
        async with send:
            for i in range(500):
                await send.send(i)
    assert sorted(got) == list(range(500))


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"maxsize": 0}, ValueError, "maxsize must be >= 1, got 0"),
        ({"maxsize": -3}, ValueError, "maxsize must be >= 1"),
        ({"maxsize": 1.5}, TypeError, "maxsize must be an int"),
        ({"maxsize": 5, "overflow": "drop_some"}, ValueError, "overflow must be one of"),
    ],
)
def test_open_channel_rejects_bad_arguments(
    kwargs: dict[str, Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        engine.open_channel(**kwargs)


# -- the conservation law, over random interleavings ----------------------------

OPERATIONS = st.lists(
    st.one_of(
        st.tuples(st.just("send"), st.integers(1, 3)),  # a task sends n messages, may park
        st.tuples(st.just("send_nowait"), st.integers(1, 3)),
        st.tuples(st.just("send_batch_nowait"), st.integers(1, 3)),
        st.tuples(st.just("receive"), st.integers(1, 3)),  # a task receives, may park
        st.tuples(st.just("receive_nowait"), st.integers(1, 3)),
        st.tuples(st.just("receive_batch"), st.integers(1, 4)),
        st.tuples(st.just("cancel_senders"), st.just(0)),
        st.tuples(st.just("cancel_receivers"), st.just(0)),
        st.tuples(st.just("close_a_sender"), st.integers(0, 1)),  # which handle
        st.tuples(st.just("close_a_receiver"), st.integers(0, 1)),
    ),
    max_size=40,
)


@settings(max_examples=1000, deadline=None)
@given(
    overflow=st.sampled_from(["block", "drop_newest", "drop_oldest"]),
    maxsize=st.integers(1, 4),
    operations=OPERATIONS,
)
def test_conservation_law_holds_under_any_interleaving(
    overflow: OverflowName, maxsize: int, operations: list[tuple[str, int]]
) -> None:
    trio.run(_conservation_scenario, overflow, maxsize, operations)


async def _conservation_scenario(
    overflow: OverflowName, maxsize: int, operations: list[tuple[str, int]]
) -> None:
    send, receive = engine.open_channel[int](maxsize, overflow=overflow)
    senders = [send, send.clone()]
    receivers = [receive, receive.clone()]
    delivered: list[int] = []
    accepted: set[int] = set()  # messages whose send returned normally
    next_id = iter(range(10**6))
    sender_scopes: list[trio.CancelScope] = []
    receiver_scopes: list[trio.CancelScope] = []
    expected_errors = (trio.ClosedResourceError, trio.BrokenResourceError, trio.EndOfChannel)

    def check() -> None:
        stats = send.statistics()
        assert stats.sent == stats.delivered + stats.dropped + stats.depth
        assert stats.delivered == len(delivered)
        counts = Counter(delivered)
        assert not [m for m, n in counts.items() if n > 1], "delivered twice"
        assert stats.depth <= maxsize
        # Nobody can still be waiting on a side that can never be served.
        if stats.open_receive_channels == 0 or overflow != "block":
            assert stats.senders_waiting == 0
        if stats.open_send_channels == 0 or stats.depth:
            assert stats.receivers_waiting == 0
        if stats.senders_waiting:
            assert stats.depth == maxsize

    async def sending_task(channel: engine.SendChannel[int], count: int) -> None:
        with trio.CancelScope() as scope:
            sender_scopes.append(scope)
            for _ in range(count):
                message = next(next_id)
                try:
                    await channel.send(message)
                except expected_errors:
                    return
                accepted.add(message)

    async def receiving_task(channel: engine.ReceiveChannel[int], count: int) -> None:
        with trio.CancelScope() as scope:
            receiver_scopes.append(scope)
            for _ in range(count):
                try:
                    delivered.append(await channel.receive())
                except expected_errors:
                    return

    async with trio.open_nursery() as nursery:
        for index, (operation, n) in enumerate(operations):
            sender = senders[index % 2]
            receiver = receivers[index % 2]
            if operation == "send":
                nursery.start_soon(sending_task, sender, n)
            elif operation == "send_nowait":
                for _ in range(n):
                    message = next(next_id)
                    try:
                        sender.send_nowait(message)
                    except (trio.WouldBlock, *expected_errors):
                        continue
                    accepted.add(message)
            elif operation == "send_batch_nowait":
                messages = [next(next_id) for _ in range(n)]
                try:
                    sender.send_batch_nowait(messages)
                except (trio.WouldBlock, *expected_errors):
                    continue
                accepted.update(messages)
            elif operation == "receive":
                nursery.start_soon(receiving_task, receiver, n)
            elif operation == "receive_nowait":
                for _ in range(n):
                    try:
                        delivered.append(receiver.receive_nowait())
                    except (trio.WouldBlock, *expected_errors):
                        break
            elif operation == "receive_batch":
                try:
                    delivered.extend(receiver.receive_batch_nowait(n))
                except (trio.WouldBlock, *expected_errors):
                    pass
            elif operation == "cancel_senders":
                for scope in sender_scopes:
                    scope.cancel()
            elif operation == "cancel_receivers":
                for scope in receiver_scopes:
                    scope.cancel()
            elif operation == "close_a_sender":
                senders[n].close()
            elif operation == "close_a_receiver":
                receivers[n].close()
            await trio.testing.wait_all_tasks_blocked()
            check()
        nursery.cancel_scope.cancel()
    check()
    stats = send.statistics()
    # Every send that returned was counted once, and only those were.
    assert stats.sent == len(accepted)
    # Whatever was delivered had been accepted by a send; nothing came from nowhere.
    assert set(delivered) <= accepted
    if overflow == "block":
        assert stats.dropped == 0
