"""Fan-out consumers and the broadcast hub."""

from __future__ import annotations

from typing import Any

import pytest
import trio
import trio.testing

import engine

# -- consumers ------------------------------------------------------------------


async def test_consumers_share_the_work_and_count_time(autojump_clock: trio.abc.Clock) -> None:
    send, receive = engine.open_channel[int](100)
    handled: list[int] = []

    async def handle(message: int) -> None:
        await trio.sleep(1)
        handled.append(message)

    group = engine.Consumers(handle, workers=5, name="processors")
    async with trio.open_nursery() as nursery:
        await nursery.start(group.run, receive)
        async with send:
            for i in range(20):
                await send.send(i)
    # Five workers, twenty one-second messages: four rounds.
    assert trio.current_time() == 4
    assert sorted(handled) == list(range(20))
    stats = group.statistics()
    assert (stats.processed, stats.errors, stats.busy) == (20, 0, 0)
    assert stats.processing_seconds_total == 20
    assert stats.processing_seconds_max == 1


async def test_consumers_count_errors_and_continue(caplog: pytest.LogCaptureFixture) -> None:
    send, receive = engine.open_channel[int](10)

    async def handle(message: int) -> None:
        if message % 3 == 0:
            raise ValueError(f"bad message {message}")

    group = engine.Consumers(handle, workers=2)
    async with send:
        for i in range(9):
            send.send_nowait(i)
    await group.run(receive)
    stats = group.statistics()
    assert (stats.processed, stats.errors) == (6, 3)
    assert stats.last_error is not None
    assert stats.last_error.startswith("ValueError: bad message")
    logged = [r for r in caplog.records if r.name == "engine.consumers"]
    assert len(logged) == 3
    assert all(r.exc_info for r in logged)


async def test_consumers_on_error_raise_fails_the_group() -> None:
    send, receive = engine.open_channel[int](10)
    cancelled = trio.Event()

    async def handle(message: int) -> None:
        if message == 1:
            raise KeyError("poison")
        try:
            await trio.sleep_forever()
        finally:
            cancelled.set()

    send.send_nowait(0)
    send.send_nowait(1)
    with pytest.RaisesGroup(pytest.RaisesExc(KeyError, match="poison")):
        await engine.consume(receive, handle, workers=2, on_error="raise")
    assert cancelled.is_set()
    assert send.statistics().open_receive_channels == 0  # the group closed its channel


async def test_consumers_beat_per_message() -> None:
    from engine._watchdog import RunContext, current_run

    send, receive = engine.open_channel[int](10)
    context = RunContext(child="c", clock=trio.lowlevel.current_clock(), last_beat=-1.0)
    current_run.set(context)

    async def handle(message: int) -> None:
        pass

    send.send_nowait(1)
    send.close()
    group = engine.Consumers(handle)
    await group.run(receive)
    assert context.last_beat >= 0
    assert context.attached == []  # attached while running, detached after


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"workers": 0}, "workers must be >= 1"),
        ({"on_error": "ignore"}, "on_error must be one of"),
        ({"name": ""}, "name must be a non-empty string"),
    ],
)
def test_consumers_reject_bad_arguments(kwargs: dict[str, Any], message: str) -> None:
    async def handle(message: object) -> None:
        pass

    with pytest.raises(ValueError, match=message):
        engine.Consumers(handle, **kwargs)


# -- hub --------------------------------------------------------------------------


async def test_publish_reaches_matching_subscribers_once() -> None:
    hub = engine.Hub[str]()
    async with (
        hub.subscribe("trades.BTCUSDT", maxsize=10) as exact,
        hub.subscribe("trades.*", maxsize=10) as one_level,
        hub.subscribe("trades.>", "trades.BTCUSDT", maxsize=10) as tail,
        hub.subscribe("orders.>", maxsize=10) as orders,
    ):
        assert await hub.publish("trades.BTCUSDT", "t1") == 3
        assert await hub.publish("trades.ETHUSDT.agg", "t2") == 1
        assert await hub.publish("orders.filled", "o1") == 1
        assert await hub.publish("nobody.listens", "x") == 0
        hub.close()
        assert [m async for m in exact] == [("trades.BTCUSDT", "t1")]
        assert [m async for m in one_level] == [("trades.BTCUSDT", "t1")]
        assert [m async for m in tail] == [("trades.BTCUSDT", "t1"), ("trades.ETHUSDT.agg", "t2")]
        assert [m async for m in orders] == [("orders.filled", "o1")]
    assert hub.statistics().published == 4
    assert hub.statistics().subscriptions == ()


async def test_a_slow_subscriber_never_delays_the_others(autojump_clock: trio.abc.Clock) -> None:
    hub = engine.Hub[int]()
    fast_received: list[tuple[float, int]] = []

    async def fast(task_status: trio.TaskStatus[None]) -> None:
        async with hub.subscribe("ticks", maxsize=5) as sub:
            task_status.started()
            async for _, message in sub:
                fast_received.append((trio.current_time(), message))

    async with hub.subscribe("ticks", maxsize=5, overflow="drop_oldest") as slow:
        async with trio.open_nursery() as nursery:
            await nursery.start(fast)
            for i in range(100):
                await hub.publish("ticks", i)  # the slow one never reads
                await trio.sleep(0.01)
            hub.close()
        # Every message reached the fast subscriber the moment it was published.
        assert [m for _, m in fast_received] == list(range(100))
        assert all(abs(t - m * 0.01) < 1e-9 for t, m in fast_received)
        stats = slow.statistics()
        assert (stats.offered, stats.dropped, stats.depth) == (100, 95, 5)
        assert [m async for _, m in slow] == [95, 96, 97, 98, 99]


async def test_drop_newest_subscriber_keeps_the_first_messages() -> None:
    hub = engine.Hub[int]()
    async with hub.subscribe("x", maxsize=3, overflow="drop_newest") as sub:
        for i in range(10):
            hub.publish_nowait("x", i)
        hub.close()
        assert [m async for _, m in sub] == [0, 1, 2]
        assert sub.statistics().dropped == 7


async def test_disconnect_reports_exactly_how_many_were_lost() -> None:
    hub = engine.Hub[int]()
    async with hub.subscribe("book.*", maxsize=10, overflow="disconnect") as sub:
        for i in range(100):
            await hub.publish("book.BTCUSDT", i)
        received: list[int] = []

        async def read_all() -> None:
            async for _, message in sub:
                received.append(message)

        with pytest.raises(engine.SubscriberDisconnected) as info:
            await read_all()
        # The queued ten arrive; the ninety that did not fit are counted, exactly.
        assert received == list(range(10))
        assert info.value.lost == 90
        assert info.value.maxsize == 10
        assert "90 messages lost" in str(info.value)
        stats = sub.statistics()
        assert stats.disconnected
        assert stats.offered == stats.delivered + stats.dropped + stats.lost + stats.depth
        assert (stats.delivered, stats.lost) == (10, 90)
        # Once it has been told, it no longer receives or counts anything.
        assert await hub.publish("book.BTCUSDT", 100) == 0
        assert sub.statistics().lost == 90


async def test_block_subscriber_makes_the_publisher_wait(autojump_clock: trio.abc.Clock) -> None:
    hub = engine.Hub[int]()
    published_at: list[float] = []
    async with hub.subscribe("q", maxsize=2, overflow="block") as sub:

        async def publisher() -> None:
            for i in range(4):
                await hub.publish("q", i)
                published_at.append(trio.current_time())

        async with trio.open_nursery() as nursery:
            nursery.start_soon(publisher)
            await trio.testing.wait_all_tasks_blocked()
            with pytest.raises(trio.WouldBlock):
                hub.publish_nowait("q", 99)  # all or nothing: nobody got 99
            for _ in range(4):
                await trio.sleep(1)
                await sub.receive()
        assert published_at == [0, 0, 1, 2]
        assert sub.statistics().dropped == 0


async def test_receive_batch_from_a_subscription() -> None:
    hub = engine.Hub[int]()
    async with hub.subscribe("x", maxsize=100) as sub:
        for i in range(5):
            hub.publish_nowait("x", i)
        assert await sub.receive_batch(3) == [("x", 0), ("x", 1), ("x", 2)]
        assert await sub.receive_batch(10) == [("x", 3), ("x", 4)]


async def test_closed_hub_refuses_publish_and_subscribe() -> None:
    hub = engine.Hub[int]()
    hub.close()
    with pytest.raises(trio.ClosedResourceError):
        await hub.publish("x", 1)
    with pytest.raises(trio.ClosedResourceError):
        async with hub.subscribe("x", maxsize=1):
            pass


@pytest.mark.parametrize(
    ("patterns", "kwargs", "message"),
    [
        ((), {"maxsize": 1}, "patterns must name at least one"),
        (("",), {"maxsize": 1}, "pattern must be a non-empty string"),
        (("a..b",), {"maxsize": 1}, "has an empty token"),
        (("a.>.b",), {"maxsize": 1}, "'>' may only be the last token"),
        (("a.b*",), {"maxsize": 1}, "wildcards must be whole tokens"),
        (("a",), {"maxsize": 0}, "maxsize must be >= 1"),
        (("a",), {"maxsize": 1, "overflow": "spill"}, "overflow must be one of"),
    ],
)
def test_subscribe_rejects_bad_arguments_at_call_time(
    patterns: tuple[str, ...], kwargs: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        engine.Hub[int]().subscribe(*patterns, **kwargs)


async def test_publish_rejects_bad_topics() -> None:
    hub = engine.Hub[int]()
    for topic in ("", "a.*", "a.>", "a..b"):
        with pytest.raises(ValueError, match="topic"):
            await hub.publish(topic, 1)
    with pytest.raises(ValueError, match="name must be a non-empty string"):
        engine.Hub[int](name="")


# -- the hub's batch path (what the bus readers use) ------------------------------


async def test_batch_publish_delivers_each_share_in_order_and_counts_offers() -> None:
    hub = engine.Hub[int]()
    async with (
        hub.subscribe("a.*", maxsize=10) as star,
        hub.subscribe("a.x", maxsize=10) as exact,
        hub.subscribe("b.>", maxsize=10) as other,
    ):
        offered = hub._publish_batch_nowait([("a.x", 1), ("a.y", 2), ("a.x", 3), ("c.z", 4)])
        hub.close()
        assert offered == 5  # a.x twice to two, a.y once, c.z to nobody
        assert [m async for _, m in star] == [1, 2, 3]
        assert [m async for _, m in exact] == [1, 3]
        assert [m async for _, m in other] == []
    assert hub.statistics().published == 4


async def test_batch_publish_is_all_or_nothing_when_a_block_subscription_lacks_room() -> None:
    hub = engine.Hub[int]()
    async with (
        hub.subscribe("t", maxsize=10) as dropping,
        hub.subscribe("t", maxsize=3, overflow="block") as blocking,
    ):
        hub.publish_nowait("t", 0)
        with pytest.raises(trio.WouldBlock):
            hub._publish_batch_nowait([("t", 1), ("t", 2), ("t", 3)])  # 3 > 2 left
        assert hub._publish_batch_nowait([("t", 1), ("t", 2)]) == 4
        hub.close()
        assert [m async for _, m in dropping] == [0, 1, 2]
        assert [m async for _, m in blocking] == [0, 1, 2]
    assert hub.statistics().published == 3


async def test_batch_publish_with_a_bad_topic_publishes_nothing() -> None:
    hub = engine.Hub[int]()
    async with hub.subscribe("t.*", maxsize=10) as sub:
        with pytest.raises(ValueError, match="empty token"):
            hub._publish_batch_nowait([("t.a", 1), ("t..b", 2)])
        hub.close()
        assert [m async for _, m in sub] == []
        assert sub.statistics().offered == 0
    assert hub.statistics().published == 0


async def test_batch_publish_hands_a_parked_receiver_the_whole_share() -> None:
    hub = engine.Hub[int]()
    got: list[list[tuple[str, int]]] = []
    async with hub.subscribe("t", maxsize=2, overflow="block") as sub:
        async with trio.open_nursery() as nursery:

            async def receive() -> None:
                got.append(await sub.receive_batch(5))

            nursery.start_soon(receive)
            await trio.testing.wait_all_tasks_blocked()
            # A parked receive_batch(5) takes up to 5 beyond the 2 of the buffer.
            assert hub._publish_batch_nowait([("t", i) for i in range(7)]) == 7
        assert got == [[("t", i) for i in range(5)]]
        assert [m for _, m in sub.receive_batch_nowait(5)] == [5, 6]


@pytest.mark.parametrize(
    ("overflow", "kept", "dropped"),
    [("drop_oldest", [3, 4], 3), ("drop_newest", [0, 1], 3)],
)
async def test_batch_publish_applies_the_drop_policies(
    overflow: Any, kept: list[int], dropped: int
) -> None:
    hub = engine.Hub[int]()
    async with hub.subscribe("t", maxsize=2, overflow=overflow) as sub:
        assert hub._publish_batch_nowait([("t", i) for i in range(5)]) == 5
        hub.close()
        assert [m async for _, m in sub] == kept
        assert sub.statistics().dropped == dropped


async def test_batch_publish_disconnects_as_publish_nowait_does() -> None:
    hub = engine.Hub[int]()
    async with hub.subscribe("t", maxsize=2, overflow="disconnect") as sub:
        hub._publish_batch_nowait([("t", i) for i in range(5)])
        hub._publish_batch_nowait([("t", 5)])
        assert sub.statistics().disconnected
        assert [m for _, m in sub.receive_batch_nowait(5)] == [0, 1]
        with pytest.raises(engine.SubscriberDisconnected, match="4 messages lost"):
            await sub.receive()
