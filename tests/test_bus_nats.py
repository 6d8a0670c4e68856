"""The NATS bus against a real nats-server (core and JetStream), including a server crash."""

from __future__ import annotations

import logging
import ssl
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

import pytest
import trio
import trio_asyncio
import trustme

from engine import SubscriberDisconnected
from engine.bus._nats import NatsBus, NatsState, NatsSubscription, open_nats_bus
from engine.bus._nats_jetstream import pattern_within
from engine.bus._nats_url import NatsURL
from tests.fixtures_nats import NATS_PASSWORD, NATS_USER, NatsServer
from tests.fixtures_nats import nats_auth_server as nats_auth_server
from tests.fixtures_nats import nats_ca as nats_ca
from tests.fixtures_nats import nats_server as nats_server
from tests.fixtures_nats import nats_tls_server as nats_tls_server


def open_fast_bus(url: str, **options: Any) -> AbstractAsyncContextManager[NatsBus]:
    """A bus whose retries are short enough for a test to see a reconnection within a second."""
    return open_nats_bus(
        url, reconnect_wait=0.1, publish_retry_after=0.5, fetch_wait=0.5, **options
    )


async def wait_until(condition: Callable[[], bool]) -> None:
    """Poll a condition the bus cannot signal (the server's deliveries); bounded by the caller."""
    while not condition():  # noqa: ASYNC110  # nothing to wait on: the server delivers
        await trio.sleep(0.005)


async def receive_n(sub: NatsSubscription, n: int) -> list[bytes]:
    received: list[bytes] = []
    while len(received) < n:
        received.extend(m.data for m in await sub.receive_batch(n - len(received)))
    return received


async def test_star_matches_one_token_and_gt_the_rest(nats_server: NatsServer) -> None:
    with trio.fail_after(10):
        async with (
            open_nats_bus(nats_server.url) as bus,
            bus.subscribe("t.*", maxsize=10) as star,
            bus.subscribe("t.>", maxsize=10) as rest,
        ):
            for topic in ("t.a", "t.a.b", "u.a", "t"):
                await bus.publish(topic, topic.encode())
            await bus.publish("t.end", b"t.end")
            assert await receive_n(star, 2) == [b"t.a", b"t.end"]
            assert await receive_n(rest, 3) == [b"t.a", b"t.a.b", b"t.end"]


async def test_order_per_subject_is_kept(nats_server: NatsServer) -> None:
    with trio.fail_after(10):
        async with (
            open_nats_bus(nats_server.url) as bus,
            bus.subscribe("seq.*", maxsize=2000, overflow="block") as sub,
        ):
            for i in range(1000):
                await bus.publish(f"seq.{i % 2}", str(i).encode())
            got = [int(x) for x in await receive_n(sub, 1000)]
        assert [x for x in got if x % 2 == 0] == list(range(0, 1000, 2))
        assert [x for x in got if x % 2 == 1] == list(range(1, 1000, 2))


@pytest.mark.parametrize(
    ("overflow", "expected"),
    [("drop_oldest", [b"7", b"8", b"9"]), ("drop_newest", [b"0", b"1", b"2"])],
)
async def test_drop_policies_keep_a_bounded_queue_and_count(
    nats_server: NatsServer, overflow: str, expected: list[bytes]
) -> None:
    with trio.fail_after(10):
        async with (
            open_nats_bus(nats_server.url) as bus,
            bus.subscribe("d.x", maxsize=3, overflow=overflow) as sub,  # type: ignore[arg-type]
        ):
            for i in range(10):
                await bus.publish("d.x", str(i).encode())
            await wait_until(lambda: sub.statistics().offered == 10)
            assert await receive_n(sub, 3) == expected
            assert sub.statistics().dropped == 7
        stats = bus.statistics()
        assert (stats.received, stats.dropped, stats.state) == (10, 7, "closed")


async def test_disconnect_policy_ends_the_subscription(nats_server: NatsServer) -> None:
    with trio.fail_after(10):
        async with open_nats_bus(nats_server.url) as bus:
            async with bus.subscribe("d.x", maxsize=2, overflow="disconnect") as sub:
                for i in range(5):
                    await bus.publish("d.x", str(i).encode())
                await wait_until(lambda: sub.statistics().offered == 5)
                assert await receive_n(sub, 2) == [b"0", b"1"]
                with pytest.raises(SubscriberDisconnected):
                    await sub.receive_batch(1)
            assert bus.statistics().dropped == 3


async def test_block_policy_loses_nothing_for_a_slow_reader(nats_server: NatsServer) -> None:
    with trio.fail_after(10):
        async with open_nats_bus(nats_server.url) as bus:
            async with bus.subscribe("b.x", maxsize=2, overflow="block") as sub:
                for i in range(300):
                    await bus.publish("b.x", str(i).encode())
                got = []
                async for message in sub:
                    got.append(int(message.data))
                    await trio.lowlevel.checkpoint()  # slower than the publisher was
                    if len(got) == 300:
                        break
                assert got == list(range(300))
                assert sub.statistics().peak_depth == 2
            assert bus.statistics().dropped == 0


async def test_queue_group_splits_messages(nats_server: NatsServer) -> None:
    with trio.fail_after(10):
        async with (
            open_nats_bus(nats_server.url) as bus,
            bus.subscribe("work.*", maxsize=200, queue="workers") as one,
            bus.subscribe("work.*", maxsize=200, queue="workers") as two,
        ):
            for i in range(100):
                await bus.publish("work.job", str(i).encode())
            await wait_until(lambda: one.statistics().offered + two.statistics().offered == 100)
            split = (one.statistics().offered, two.statistics().offered)
            got = set(await receive_n(one, split[0])) | set(await receive_n(two, split[1]))
        assert min(split) > 0
        assert got == {str(i).encode() for i in range(100)}


async def test_jetstream_redelivers_until_acked(nats_server: NatsServer) -> None:
    with trio.fail_after(10):
        async with open_fast_bus(
            nats_server.url, stream="ACKS", subjects=["job.>"], ack_wait=0.5
        ) as bus:
            async with bus.subscribe("job.>", maxsize=10) as sub:
                await bus.publish("job.1", b"one", msg_id="j1")
                first = await sub.__anext__()
                second = await sub.__anext__()  # not acked: back after ack_wait
                assert (first.topic, first.data) == (second.topic, second.data)
                assert second.msg_id == "j1"
                await second.ack()
                await bus.publish("job.2", b"two", msg_id="j2")
                third = await sub.__anext__()
                await third.ack()
                assert third.data == b"two"
                with trio.move_on_after(1.0) as waited:  # two ack_waits: nothing comes back
                    await sub.__anext__()
                assert waited.cancelled_caught
            stats = bus.statistics()
        assert (stats.received, stats.redelivered, stats.acked) == (3, 1, 2)


async def test_jetstream_drops_a_replayed_publish_by_msg_id(nats_server: NatsServer) -> None:
    with trio.fail_after(10):
        async with open_nats_bus(nats_server.url, stream="DEDUP", subjects=["px.>"]) as bus:
            await bus.publish("px.a", b"first", msg_id="same")
            await bus.publish("px.a", b"replayed", msg_id="same")
            await bus.publish("px.a", b"next", msg_id="other")
            async with bus.subscribe("px.>", maxsize=10) as sub:
                got = []
                for _ in range(2):
                    message = await sub.__anext__()
                    await message.ack()
                    got.append((message.data, message.msg_id))
            assert got == [(b"first", "same"), (b"next", "other")]
            assert bus.statistics().duplicates == 1


async def test_jetstream_fetches_only_what_fits(nats_server: NatsServer) -> None:
    with trio.fail_after(10):
        async with open_fast_bus(nats_server.url, stream="FIT", subjects=["f.>"]) as bus:
            for i in range(20):
                await bus.publish("f.x", str(i).encode())
            async with bus.subscribe("f.>", maxsize=4, overflow="drop_oldest") as sub:
                got = []
                async for message in sub:
                    await message.ack()
                    got.append(int(message.data))
                    assert sub.statistics().depth <= 4
                    if len(got) == 20:
                        break
        assert got == list(range(20))
        assert bus.statistics().dropped == 0


async def test_closing_waits_for_pipelined_publishes(nats_server: NatsServer) -> None:
    with trio.fail_after(10):
        async with open_nats_bus(nats_server.url, stream="PIPE", max_unconfirmed=64) as bus:
            for i in range(500):
                await bus.publish("PIPE.x", str(i).encode(), msg_id=f"p{i}")
            assert bus.statistics().unconfirmed <= 64
        assert bus.statistics().published == 500
        async with (
            open_nats_bus(nats_server.url, stream="PIPE") as again,
            again.subscribe("PIPE.>", maxsize=1000) as sub,
        ):
            assert sorted(int(x) for x in await receive_n(sub, 500)) == list(range(500))


async def test_close_ends_subscriptions_and_refuses_publish(nats_server: NatsServer) -> None:
    with trio.fail_after(10):
        async with open_nats_bus(nats_server.url) as bus:
            async with bus.subscribe("c.x", maxsize=10) as sub:
                await bus.publish("c.x", b"last")
                await wait_until(lambda: sub.statistics().offered == 1)
                await bus.aclose()
                assert [m.data async for m in sub] == [b"last"]  # drained, then ended
            with pytest.raises(trio.ClosedResourceError):
                await bus.publish("c.x", b"late")
            with pytest.raises(trio.ClosedResourceError):
                async with bus.subscribe("c.x", maxsize=1):
                    pass  # pragma: no cover
            assert bus.state is NatsState.CLOSED
            with pytest.raises(trio.ClosedResourceError):
                await bus.wait_state("connected")


@pytest.mark.parametrize("max_unconfirmed", [0, 32])
async def test_jetstream_loses_nothing_across_a_server_kill(
    nats_server: NatsServer, max_unconfirmed: int
) -> None:
    total = 200
    with trio.fail_after(15):
        async with open_fast_bus(
            nats_server.url,
            stream="CRASH",
            subjects=["cr.>"],
            ack_wait=1.0,
            max_unconfirmed=max_unconfirmed,
        ) as bus:
            seen: set[str] = set()
            async with bus.subscribe("cr.>", maxsize=50) as sub, trio.open_nursery() as nursery:

                async def consume() -> None:
                    async for message in sub:
                        await message.ack()
                        assert message.msg_id is not None
                        seen.add(message.msg_id)
                        if len(seen) == total:
                            return

                nursery.start_soon(consume)
                for i in range(total):
                    if i == total // 2:
                        await nats_server.kill()
                        await bus.wait_state("reconnecting")
                        nursery.start_soon(nats_server.start)
                    await bus.publish("cr.x", str(i).encode(), msg_id=f"m{i}")
            assert seen == {f"m{i}" for i in range(total)}
            assert bus.state is NatsState.CONNECTED
            assert bus.statistics().reconnects == 1
            # A fresh consumer reads the stream from the start: one copy of each.
            async with bus.subscribe("cr.>", maxsize=total + 10, queue="audit") as audit:
                stored = await receive_n(audit, total)
                with trio.move_on_after(0.3):
                    stored.extend(await receive_n(audit, 1))
            assert sorted(int(x) for x in stored) == list(range(total))
        stats = bus.statistics()
        assert (stats.published, stats.unconfirmed, stats.unsent) == (total, 0, 0)


async def test_core_publishes_during_an_outage_are_buffered_then_sent(
    nats_server: NatsServer, caplog: pytest.LogCaptureFixture
) -> None:
    with trio.fail_after(10):
        async with open_fast_bus(nats_server.url) as bus:
            async with bus.subscribe("o.x", maxsize=1000, overflow="block") as sub:
                for i in range(50):
                    await bus.publish("o.x", str(i).encode())
                assert len(await receive_n(sub, 50)) == 50
                await nats_server.kill()
                await bus.wait_state("reconnecting")
                for i in range(50, 100):  # into nats-py's reconnect buffer
                    await bus.publish("o.x", str(i).encode())
                await nats_server.start()
                await bus.wait_state("connected")
                # nats-py subscribes again before it flushes its buffer: none lost here.
                got = [int(x) for x in await receive_n(sub, 50)]
            stats = bus.statistics()
        assert got == list(range(50, 100))
        assert (stats.reconnects, stats.unsent, stats.published) == (1, 0, 100)
        assert "reconnecting" in caplog.text


async def test_secrets_never_reach_logs_repr_or_statistics(
    nats_auth_server: NatsServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    host = f"127.0.0.1:{nats_auth_server.port}"
    url = f"nats://{NATS_USER}:{NATS_PASSWORD}@{host}"
    with trio.fail_after(10):
        async with open_fast_bus(url) as bus:
            async with bus.subscribe("s.x", maxsize=10) as sub:
                await bus.publish("s.x", b"ok")
                assert (await sub.__anext__()).data == b"ok"
            await nats_auth_server.kill()  # reconnect logs carry the URL
            await bus.wait_state("reconnecting")
            await nats_auth_server.start()
            await bus.wait_state("connected")
            shown = [repr(bus), str(bus.statistics())]
        with pytest.raises(trio.BrokenResourceError) as refused:
            async with open_nats_bus(f"nats://{NATS_USER}:wrong-{NATS_PASSWORD}@{host}"):
                pass  # pragma: no cover
        with pytest.raises(ValueError, match=r"\*\*\*@") as bad:
            open_nats_bus(f"nats://{NATS_USER}:{NATS_PASSWORD}@{host}:99999")
    shown += [str(refused.value), str(bad.value), caplog.text]
    assert f"nats://***@{host}" in shown[0]
    for text in shown:
        assert NATS_PASSWORD not in text


async def test_a_stream_that_cannot_be_created_is_refused(nats_server: NatsServer) -> None:
    with trio.fail_after(10):
        async with open_nats_bus(nats_server.url, stream="FIRST", subjects=["ov.>"]) as bus:
            await bus.publish("ov.x", b"kept")
            with pytest.raises(trio.BrokenResourceError, match="SECOND"):
                async with open_nats_bus(nats_server.url, stream="SECOND", subjects=["ov.>"]):
                    pass  # pragma: no cover
            with pytest.raises(ValueError, match="not in stream"):
                await bus.publish("elsewhere.x", b"lost")
            with pytest.raises(ValueError, match="not in stream"):
                bus.subscribe("elsewhere.>", maxsize=1)
            with pytest.raises(ValueError, match="not in stream"):
                bus.subscribe("ov", maxsize=1)
            async with bus.subscribe("ov.a", maxsize=1, queue="mine"):
                with pytest.raises(trio.BrokenResourceError, match=r"takes 'ov\.a'"):
                    async with bus.subscribe("ov.b", maxsize=1, queue="mine"):
                        pass  # pragma: no cover
            with pytest.raises(ValueError, match="max_payload"):
                await bus.publish("ov.x", bytes(2 * 1024 * 1024))


async def test_a_stream_captures_its_own_name_by_default(nats_server: NatsServer) -> None:
    with trio.fail_after(10):
        async with (
            open_nats_bus(nats_server.url, stream="MARKET") as bus,
            bus.subscribe("MARKET.trades.*", maxsize=10) as sub,
        ):
            await bus.publish("MARKET.trades.BTC", b"1", msg_id="t1")
            message = await sub.__anext__()
            await message.ack()
        assert (message.topic, message.msg_id) == ("MARKET.trades.BTC", "t1")


async def test_tls_url_connects_over_tls(nats_tls_server: NatsServer, nats_ca: trustme.CA) -> None:
    context = ssl.create_default_context()
    nats_ca.configure_trust(context)
    url = f"tls://127.0.0.1:{nats_tls_server.port}"
    with trio.fail_after(10):
        async with (
            open_nats_bus(url, tls=context) as bus,
            bus.subscribe("tls.x", maxsize=1) as sub,
        ):
            await bus.publish("tls.x", b"private")
            assert (await sub.__anext__()).data == b"private"
        with pytest.raises(trio.BrokenResourceError, match="SSL"):
            async with open_nats_bus(url):  # the system's CAs do not trust this one
                pass  # pragma: no cover


async def test_tls_url_to_a_plaintext_server_is_refused(nats_auth_server: NatsServer) -> None:
    url = f"tls://{NATS_USER}:{NATS_PASSWORD}@127.0.0.1:{nats_auth_server.port}"
    with trio.fail_after(10), pytest.raises(trio.BrokenResourceError, match="TLS") as refused:
        async with open_nats_bus(url):
            pass  # pragma: no cover
    assert NATS_PASSWORD not in str(refused.value)


@pytest.mark.parametrize(
    "url",
    ["", "localhost:9", "http://localhost:9", "nats://", "nats://host:0", "nats://h/x"],
)
def test_bad_urls_are_refused(url: str) -> None:
    with pytest.raises(ValueError, match="url"):
        open_nats_bus(url)


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("nats://u:pw-secret@h:4222", "nats://***@h:4222"),
        ("nats://tok-secret@h", "nats://***@h"),
        ("tls://u:pw-secret@h:1", "tls://***@h:1"),
        ("nats://h:4222", "nats://h:4222"),
    ],
)
def test_urls_are_shown_without_credentials(url: str, shown: str) -> None:
    parsed = NatsURL.parse(url)
    assert parsed.redacted == shown
    assert "secret" not in repr(parsed)


def test_a_url_that_does_not_parse_is_refused_without_its_secret() -> None:
    with pytest.raises(ValueError, match="valid URL") as refused:
        NatsURL.parse("nats://u:sec/ret@h:4222")
    assert "sec" not in str(refused.value)


@pytest.mark.parametrize(
    ("pattern", "subject", "within"),
    [
        ("a.b", "a.>", True),
        ("a.*", "a.>", True),
        ("a.>", "a.>", True),
        ("a", "a.>", False),
        ("a.>", "a.*", False),
        ("a.b", "a.*", True),
        ("a.b.c", "a.*", False),
        ("b.x", "a.>", False),
    ],
)
def test_a_pattern_within_a_stream_subject(pattern: str, subject: str, within: bool) -> None:
    assert pattern_within(tuple(pattern.split(".")), tuple(subject.split("."))) is within


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="ack_wait"):
        open_nats_bus("nats://localhost:9", ack_wait=0)
    with pytest.raises(ValueError, match="stream"):
        open_nats_bus("nats://localhost:9", stream="a.b")
    with pytest.raises(TypeError, match="url"):
        open_nats_bus(4222)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="tls"):
        open_nats_bus("tls://localhost:9", tls="cert.pem")  # type: ignore[arg-type]


async def test_runs_beside_a_callers_own_asyncio_loop(nats_server: NatsServer) -> None:
    with trio.fail_after(10):
        async with trio_asyncio.open_loop() as outer:
            async with open_nats_bus(nats_server.url) as bus:
                assert isinstance(bus, NatsBus)
                assert bus._loop is not outer  # its own loop, closed with it
                async with bus.subscribe("n.x", maxsize=1) as sub:
                    await bus.publish("n.x", b"x")
                    assert (await sub.__anext__()).data == b"x"
            assert not outer.is_closed()


async def test_a_jetstream_queue_emptied_without_waiting_is_refilled(
    nats_server: NatsServer,
) -> None:
    with trio.fail_after(10):
        async with (
            open_fast_bus(nats_server.url, stream="NOWAIT", subjects=["n.>"]) as bus,
            bus.subscribe("n.>", maxsize=2) as sub,
        ):
            for i in range(6):
                await bus.publish(f"n.{i}", b"%d" % i, msg_id=f"n{i}")
            got: list[bytes] = []
            while len(got) < 6:  # the puller fetches only what fits: 2 at a time
                try:
                    batch = sub.receive_batch_nowait(10)
                except trio.WouldBlock:
                    await trio.sleep(0.01)  # nothing to wait on without taking
                    continue
                for message in batch:
                    await message.ack()
                    got.append(message.data)
    assert got == [b"%d" % i for i in range(6)]


async def test_a_tls_server_that_says_nothing_is_given_up_on(
    autojump_clock: trio.testing.MockClock,
) -> None:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]

    async def silent(stream: trio.SocketStream) -> None:
        async with stream:
            await trio.sleep_forever()

    with trio.fail_after(100):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.serve_listeners, silent, listeners)
            started = trio.current_time()
            with pytest.raises(trio.BrokenResourceError, match="sent no INFO line within 2 s"):
                async with open_nats_bus(f"tls://127.0.0.1:{port}"):
                    pass
            assert trio.current_time() - started == pytest.approx(2.0)
            nursery.cancel_scope.cancel()
