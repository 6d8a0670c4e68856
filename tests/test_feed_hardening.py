"""The feed against what an exchange may send: bad symbols, odd numbers, endless symbol sets.

A frame the service cannot use is counted as malformed, with a sample, and
every other event of its read and batch is published. Per-symbol state (the
feed's latest trade ids, the whale detector's latest trade times and flow
windows) stays within its ``max_symbols`` bound, whatever symbols arrive.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import attrs
import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st
from wsproto.events import BytesMessage, TextMessage

from engine.bus import BusMessage, MemoryBus
from services.market._events import MAX_SYMBOL_LENGTH, MalformedMessage, Trade, decode, normalise
from services.market.cycles import WhaleFlowConfig, WhaleFlows
from services.market.cycles._whales import MAX_SYMBOLS as WHALE_MAX_SYMBOLS
from services.market.feed import PROCESS_BATCH, Feed, FeedConfig, FeedStatistics
from services.market.simulator._orderlog import MAX_OPEN, generate_order_lines
from tests.test_wsclient import Peer, websocket_server


def trade(symbol: str, trade_id: int, *, price: str = "100.5", stream: str = "x@trade") -> str:
    """A combined-stream trade frame; the stream name is fixed, so only the symbol varies."""
    data = {"e": "trade", "E": 1, "s": symbol, "t": trade_id, "p": price, "q": "0.2", "T": 2}
    return json.dumps({"stream": stream, "data": data | {"m": False, "M": True}})


def is_symbol(symbol: str) -> bool:
    return symbol.isascii() and symbol.isalnum() and len(symbol) <= MAX_SYMBOL_LENGTH


@attrs.frozen
class Outcome:
    """What a feed made of a script of frames."""

    stats: FeedStatistics
    published: list[BusMessage]
    dropped: int

    def published_ids(self) -> list[int]:
        return [json.loads(m.data)["id"] for m in self.published]


async def feed_frames(frames: Sequence[str | bytes], **options: Any) -> Outcome:
    """Serve ``frames`` in one write to a feed and its processors; what came of them.

    Returns once the feed has read every frame and every task is blocked:
    with the memory bus a processor publishes a batch without a checkpoint,
    so by then everything read has been published or counted.
    """

    async def script(peer: Peer) -> None:
        messages = [TextMessage(f) if isinstance(f, str) else BytesMessage(f) for f in frames]
        await peer.send(*messages)
        await peer.events_until_eof()

    bus = MemoryBus()
    published: list[BusMessage] = []

    async def collect(subscription: Any) -> None:
        async for message in subscription:
            published.append(message)

    with trio.fail_after(20):
        async with websocket_server(script) as url, trio.open_nursery() as nursery:
            feed = Feed(FeedConfig(url, ["BTCUSDT"], **options), bus)
            async with bus.subscribe(">", maxsize=len(frames) + 1) as everything:
                nursery.start_soon(collect, everything)
                await nursery.start(feed.process)
                await nursery.start(feed.connect)
                while feed.statistics().received < len(frames):
                    await trio.testing.wait_all_tasks_blocked()
                await trio.testing.wait_all_tasks_blocked()
                stats = feed.statistics()
            nursery.cancel_scope.cancel()
    assert (stats.connections, stats.disconnects) == (1, 0)  # the connection survived
    return Outcome(stats, published, feed.queue.statistics().dropped)


# -- item 6: a bad symbol is one malformed frame, not a lost batch ------------------------


BAD_SYMBOLS = ["", "A*B", "*", "BTC>", ">", "BTC USDT", " ", "X" * 200, "BTC.USDT", "BTC\n"]
BAD_SYMBOLS += ["\uff22\uff34\uff23", "X" * (MAX_SYMBOL_LENGTH + 1)]  # not ASCII; one too long


async def test_a_bad_symbol_is_counted_malformed_and_the_rest_of_its_batch_is_published() -> None:
    # One read of a full batch, the bad symbols spread through it.
    frames = [trade("BTCUSDT", i) for i in range(1, PROCESS_BATCH + 1)]
    bad_at = {index * 83: symbol for index, symbol in enumerate(BAD_SYMBOLS)}
    for index, symbol in bad_at.items():
        frames[index] = trade(symbol, index + 1)
    outcome = await feed_frames(frames)
    expected = [i + 1 for i in range(PROCESS_BATCH) if i not in bad_at]
    assert outcome.published_ids() == expected
    assert {m.topic for m in outcome.published} == {"trades.BTCUSDT"}
    stats = outcome.stats
    assert (stats.received, stats.malformed) == (PROCESS_BATCH, len(BAD_SYMBOLS))
    assert stats.published == PROCESS_BATCH - len(BAD_SYMBOLS)
    # Samples as for any malformed frame: the latest five, shortened.
    assert stats.malformed_samples == tuple(frames[i][:200] for i in sorted(bad_at)[-5:])
    # The bad frames' ids are gaps of BTCUSDT's sequence, as any lost trade would be.
    assert stats.missing_trades == len(BAD_SYMBOLS) - (0 in bad_at)


@pytest.mark.parametrize("symbol", BAD_SYMBOLS)
def test_decode_refuses_a_symbol_that_is_not_one_topic_token(symbol: str) -> None:
    with pytest.raises(MalformedMessage, match="symbol must be 1 to 32 ASCII letters or digits"):
        decode(trade(symbol, 1))


@given(
    st.lists(
        st.one_of(
            st.text(max_size=40),
            st.sampled_from(BAD_SYMBOLS),
            st.sampled_from(["BTCUSDT", "ETHUSDT", "1000SATSUSDT", "X" * MAX_SYMBOL_LENGTH]),
        ),
        min_size=1,
        max_size=40,
    )
)
@settings(max_examples=60, deadline=None)
async def test_every_event_with_a_good_symbol_is_published_whatever_the_others(
    symbols: list[str],
) -> None:
    frames = [trade(symbol, i) for i, symbol in enumerate(symbols)]
    outcome = await feed_frames(frames)
    good = [(i, s) for i, s in enumerate(symbols) if is_symbol(s)]
    assert [(m.topic, json.loads(m.data)["id"]) for m in outcome.published] == [
        (f"trades.{s}", i) for i, s in good
    ]
    stats = outcome.stats
    assert stats.malformed == len(symbols) - len(good)
    assert stats.published == len(good)
    assert len(stats.malformed_samples) == min(5, stats.malformed)


# -- numbers outside what Binance sends --------------------------------------------------


async def test_numbers_out_of_range_are_malformed_and_count_no_gap() -> None:
    frames = [
        trade("BTCUSDT", 1),
        trade("BTCUSDT", 10**30),  # wider than Binance's 64-bit ids
        trade("BTCUSDT", -5),  # a trade id is never negative
        trade("BTCUSDT", 2, price="1e999"),  # a price that overflows to inf
        trade("BTCUSDT", 3, price="nan"),
        trade("BTCUSDT", 4),
    ]
    outcome = await feed_frames(frames)
    assert outcome.published_ids() == [1, 4]
    stats = outcome.stats
    assert (stats.received, stats.malformed, stats.published) == (6, 4, 2)
    # 2 and 3 were decoded, so the sequence 1, 2, 3, 4 has no gap; the
    # 10**30 that was once taken as the latest id would have made one of 10**30.
    assert stats.missing_trades == 0
    assert "1e999" in stats.malformed_samples[-2]


@pytest.mark.parametrize(
    ("price", "message"),
    [
        ("1e999", "not a finite number: '1e999'"),
        ("-inf", "not a finite number"),
        ("nan", "not a finite number: .nan."),
    ],
)
def test_normalise_refuses_a_price_that_is_not_finite(price: str, message: str) -> None:
    _, event = decode(trade("BTCUSDT", 1, price=price))
    with pytest.raises(ValueError, match=message):
        normalise(event)


async def test_a_frame_nested_too_deep_is_malformed_and_the_connection_goes_on() -> None:
    deep = '{"stream": "x@trade", "data": ' + "[" * 100_000 + "]" * 100_000 + "}"
    extra = trade("BTCUSDT", 2)[:-2] + ', "z": ' + "[" * 50_000 + "]" * 50_000 + "}}"
    with pytest.raises(MalformedMessage, match="nested too deeply"):
        decode(deep)
    outcome = await feed_frames([trade("BTCUSDT", 1), deep, extra, trade("BTCUSDT", 3)])
    assert outcome.published_ids() == [1, 3]
    assert (outcome.stats.malformed, outcome.stats.published) == (2, 2)


async def test_a_huge_binary_frame_is_sampled_short() -> None:
    outcome = await feed_frames([b"\xff" * 500_000, trade("BTCUSDT", 1)])
    [sample] = outcome.stats.malformed_samples
    assert sample == repr(b"\xff" * 200)[:200]
    assert outcome.published_ids() == [1]


# -- item 11: bounded per-symbol state ---------------------------------------------------


async def test_the_feed_keeps_the_latest_trade_id_of_at_most_max_symbols() -> None:
    # Default bound: more distinct symbols than it, once each.
    count = 10_000
    outcome = await feed_frames([trade(f"S{i}", 1) for i in range(count)])
    stats = outcome.stats
    assert FeedConfig("ws://x", ["BTCUSDT"]).max_symbols == 4096
    assert (stats.symbols, stats.symbols_evicted) == (4096, count - 4096)
    assert (stats.published, stats.missing_trades) == (count, 0)


async def test_the_least_recently_traded_symbol_is_forgotten_first() -> None:
    frames = [
        trade("A", 1),
        trade("B", 1),
        trade("C", 1),
        trade("A", 2),  # A is now more recent than B and C
        trade("D", 1),  # over max_symbols=3: B, the least recent, is forgotten
        trade("A", 5),  # A is kept: 3 and 4 are missing
        trade("B", 9),  # B starts afresh: no gap counted
        trade("C", 4),  # C was forgotten for B, and D is now for C: no gap counted
    ]
    outcome = await feed_frames(frames, max_symbols=3)
    stats = outcome.stats
    assert (stats.symbols, stats.symbols_evicted) == (3, 3)
    assert stats.missing_trades == 2


@pytest.mark.parametrize(
    ("value", "error", "message"),
    [
        (0, ValueError, "max_symbols must be >= 1, got 0"),
        (True, TypeError, "max_symbols must be an int, got True"),
        (2.5, TypeError, "max_symbols must be an int"),
    ],
)
def test_feed_config_checks_max_symbols(
    value: object, error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        FeedConfig("ws://127.0.0.1:1", ["BTCUSDT"], max_symbols=value)  # type: ignore[arg-type]  # on purpose


def whale(symbol: str, *, buyer_maker: bool = False) -> tuple[str, bytes]:
    """A trade worth 1,000,000 in quote currency, as the feed publishes it."""
    return normalise(Trade(E=1, s=symbol, t=1, p="100000", q="10", T=1, m=buyer_maker))


def small(symbol: str) -> tuple[str, bytes]:
    return normalise(Trade(E=1, s=symbol, t=1, p="1", q="1", T=1, m=False))


async def publish(bus: MemoryBus, *messages: tuple[str, bytes]) -> None:
    for topic, data in messages:
        bus.publish_nowait(topic, data)
    await trio.testing.wait_all_tasks_blocked()


async def test_whale_state_stays_within_max_symbols(autojump_clock: trio.abc.Clock) -> None:
    bus = MemoryBus()
    count, bound = 20_000, 100
    whales = WhaleFlows(WhaleFlowConfig(queue_size=count), bus, max_symbols=bound)
    async with trio.open_nursery() as nursery:
        await nursery.start(whales.run)
        await publish(bus, *(whale(f"S{i}") for i in range(count)))
        stats = whales.statistics()
        assert (stats.trades, stats.whales) == (count, count)
        assert (stats.symbols, stats.windows) == (bound, bound)
        assert stats.symbols_evicted == count - bound
        assert stats.window_evictions == count - bound  # one whale in each window forgotten
        latest = {f"S{i}" for i in range(count - bound, count)}
        assert set(whales.last_update()["whale_flows"].symbols) == latest
        assert set(whales.flows()) == latest
        nursery.cancel_scope.cancel()
    assert WHALE_MAX_SYMBOLS == 4096
    assert WhaleFlows(WhaleFlowConfig(), bus).max_symbols == 4096


async def test_the_symbol_traded_last_is_kept_and_the_least_recent_forgotten(
    autojump_clock: trio.abc.Clock,
) -> None:
    bus = MemoryBus()
    whales = WhaleFlows(WhaleFlowConfig(), bus, max_symbols=2)
    async with trio.open_nursery() as nursery:
        await nursery.start(whales.run)
        await publish(bus, whale("A"), whale("B"))
        await trio.sleep(1)
        await publish(bus, whale("A"))  # A's latest whale is now newer than B's
        await trio.sleep(1)
        await publish(bus, whale("C"))  # a third window: B's is the one forgotten
        assert set(whales.flows()) == {"A", "C"}
        assert whales.flows()["A"].buys == 2
        assert set(whales.last_update()["whale_flows"].symbols) == {"A", "C"}
        stats = whales.statistics()
        assert (stats.window_evictions, stats.symbols_evicted) == (1, 1)
        nursery.cancel_scope.cancel()


async def test_expired_windows_are_pruned_as_trades_arrive_not_only_when_read(
    autojump_clock: trio.abc.Clock,
) -> None:
    bus = MemoryBus()
    whales = WhaleFlows(WhaleFlowConfig(window=60), bus)
    async with trio.open_nursery() as nursery:
        await nursery.start(whales.run)
        await publish(bus, whale("A"))  # t=0
        await trio.sleep_until(30)
        await publish(bus, whale("B"))  # t=30
        await trio.sleep_until(59.999)
        await publish(bus, small("C"))
        assert whales.statistics().windows == 2  # A's whale counts until t=60
        await trio.sleep_until(60)
        await publish(bus, small("C"))  # a trade, not a whale, is enough
        assert whales.statistics().windows == 1
        await trio.sleep_until(90)
        await publish(bus, small("C"))
        assert whales.statistics().windows == 0
        assert whales.flows() == {}
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize(
    ("value", "error", "message"),
    [
        (0, ValueError, "max_symbols must be >= 1"),
        ("many", TypeError, "max_symbols must be an int"),
    ],
)
def test_whale_flows_check_max_symbols(value: object, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        WhaleFlows(WhaleFlowConfig(), MemoryBus(), max_symbols=value)  # type: ignore[arg-type]  # on purpose


async def test_a_batch_of_whales_is_published_in_one_turn_of_the_scheduler() -> None:
    # A detector that yields once per whale falls further behind the more
    # whales a batch holds; its subscription's backlog then raises memory.
    bus = MemoryBus()
    whales = WhaleFlows(WhaleFlowConfig(queue_size=1000), bus)
    count = 200
    async with bus.subscribe("whales.>", maxsize=count) as published, trio.open_nursery() as n:
        await n.start(whales.run)
        await trio.testing.wait_all_tasks_blocked()
        for i in range(count):
            bus.publish_nowait(*whale(f"S{i}"))
        turns = 0
        while whales.statistics().published < count:
            await trio.lowlevel.checkpoint()
            turns += 1
        assert turns <= 5  # the first trade woke it alone; then the rest at once
        topics = [(await published.__anext__()).topic for _ in range(count)]
        assert topics == [f"whales.S{i}" for i in range(count)]
        n.cancel_scope.cancel()


# -- what the soak found -----------------------------------------------------------------


def test_the_simulated_order_book_stops_growing_within_seconds_of_log() -> None:
    # At the simulator's default 100 lines/s, 6,000 lines are a minute: the
    # book of resting orders (kept in memory to close them later) must have
    # reached its bound by then, not keep growing for ten minutes.
    resting: set[int] = set()
    sizes = []
    for line in generate_order_lines(6_000, seed=1).splitlines():
        status = json.loads(line)
        oid = status["order"]["oid"]
        if status["status"] == "open":
            resting.add(oid)
        else:
            resting.discard(oid)
        sizes.append(len(resting))
    assert max(sizes) == MAX_OPEN
    assert min(sizes[3_000:]) >= MAX_OPEN * 3 // 4  # from half a minute on, near its bound
