"""Whale flows: large trades picked out of the trade stream, as they happen.

Detection is a consumer of the bus, not a periodic scan: each trade
published on ``trades.<SYMBOL>`` is looked at once, as it arrives; there is
no request that can hang. What can go wrong is counted instead: payloads
that are not trades, and trades the subscription's bounded queue dropped
(on the bus's statistics).

Definitions (also in ``docs/whale-flows.md``):

- a trade is a *whale* when ``price * qty >= threshold`` for its symbol;
- its *side* is the aggressor's: the taker. ``buyer_maker`` true means the
  buyer's order was resting in the book and the seller crossed the spread,
  so the whale is a ``"sell"``; false makes it a ``"buy"``;
- the *flow* of a symbol sums the notional of its whales over the last
  ``window`` seconds of the trio clock, by side: ``buy_notional``,
  ``sell_notional`` and ``net_notional = buy - sell``. A whale detected at
  ``t`` counts while ``now < t + window``.

Per-symbol state is bounded whatever symbols the trades carry: windows whose
whales have all expired are dropped as trades arrive, not only when the flows
are read, and both the windows and the latest-trade times keep at most
``max_symbols`` symbols, forgetting the least recently active first.
"""

from __future__ import annotations

import collections
import logging
import math
import time
from collections.abc import Callable
from typing import Protocol, runtime_checkable

import attrs
import msgspec
import trio

import engine
from engine.bus import Bus, BusMessage
from engine.lowlevel import check_count

from .._events import Normalised
from ._config import WhaleFlowConfig
from ._quotes import DatasetUpdate

logger = logging.getLogger("market.cycles.whales")

_TRADE_TYPES = frozenset({"trade", "aggTrade"})
# Messages taken from the subscription at once at most, when it can batch.
_BATCH = 1024
# The default bound of per-symbol state (see ``WhaleFlows``).
MAX_SYMBOLS = 4096


class WhaleTrade(msgspec.Struct, frozen=True, omit_defaults=True, tag="whale"):
    """One whale trade, as kept in the history and published on ``whales.<SYMBOL>``.

    Encoded as compact JSON with ``"type": "whale"`` first, as every message
    the broadcast sends names its type; fields at their default are left out.

    Attributes:
        symbol: ``"BTCUSDT"``.
        time: the exchange's trade time, ms since the epoch.
        price: the trade price.
        qty: the quantity, in the base asset.
        notional: ``price * qty``, in the quote currency.
        side: the aggressor's side, ``"buy"`` or ``"sell"``.
        id: the exchange's trade id, when it has one (left out of the JSON otherwise).
    """

    symbol: str
    time: int
    price: float
    qty: float
    notional: float
    side: str
    id: int | None = None


class SymbolFlow(msgspec.Struct, frozen=True):
    """One symbol's whale flow over the window.

    Attributes:
        symbol: ``"BTCUSDT"``.
        window: the window's length, seconds.
        buys: whale buys in the window.
        sells: whale sells in the window.
        buy_notional: their summed notional.
        sell_notional: the same for sells.
        net_notional: ``buy_notional - sell_notional``; > 0 when whales buy.
    """

    symbol: str
    window: float
    buys: int
    sells: int
    buy_notional: float
    sell_notional: float
    net_notional: float


# Keyword-only, so that given fields (no default) may follow counted ones.
@attrs.frozen(kw_only=True)
class WhaleFlowStatistics:
    """Whale detection's counters, for /status and /metrics.

    Attributes:
        name: ``"whale_flows"``.
        running: whether :meth:`WhaleFlows.run` is subscribed now.
        trades: trades examined.
        whales: whale trades detected.
        published: whales published on the bus.
        malformed: payloads that were not valid ``Normalised`` JSON.
        ignored: valid payloads that were not trades with a price and a quantity.
        window_evictions: whales that left a symbol's window early because
            it held ``max_window_trades`` already, or because their symbol's
            window was forgotten to keep within ``max_symbols``.
        last_update: wall-clock seconds since the epoch of the latest trade
            examined.
        last_whale_at: the same, of the latest whale.
        symbols: symbols whose latest trade time is kept now (at most
            ``max_symbols``).
        windows: symbols with a whale in the window now (at most ``max_symbols``).
        symbols_evicted: symbols whose latest trade time was forgotten to
            keep within ``max_symbols``.
    """

    # Each field declared once with its metric, as in every statistics class
    # (the watchlist's too): the classes look alike field by field for that reason.
    name: str
    running: bool
    trades: int = attrs.field(default=0, metadata=engine.counter_metric("Trades examined"))
    whales: int = attrs.field(default=0, metadata=engine.counter_metric("Whale trades detected"))
    published: int = attrs.field(
        default=0, metadata=engine.counter_metric("Whales published on the bus")
    )
    malformed: int = attrs.field(
        default=0, metadata=engine.counter_metric("Payloads that were not valid Normalised JSON")
    )
    ignored: int = attrs.field(
        default=0,
        metadata=engine.counter_metric("Valid payloads that were not trades with a price and size"),
    )
    window_evictions: int = attrs.field(
        default=0, metadata=engine.counter_metric("Whales that left a flow window early")
    )
    last_update: float | None = attrs.field(
        metadata=engine.gauge_metric(
            "When the latest trade was examined, in seconds since the epoch",
            name="last_update_timestamp_seconds",
        )
    )
    last_whale_at: float | None = attrs.field(
        default=None,
        metadata=engine.gauge_metric(
            "When the latest whale was detected, in seconds since the epoch",
            name="last_whale_timestamp_seconds",
        ),
    )
    symbols: int = attrs.field(
        metadata=engine.gauge_metric("Symbols whose latest trade time is kept")
    )
    windows: int = attrs.field(metadata=engine.gauge_metric("Symbols with a whale in the window"))
    symbols_evicted: int = attrs.field(
        default=0, metadata=engine.counter_metric("Symbols forgotten to keep within max_symbols")
    )


class _Counters(engine.Tally[WhaleFlowStatistics]):
    """The counters behind :meth:`WhaleFlows.statistics`."""


@runtime_checkable
class _Batching(Protocol):
    """A subscription that hands over everything queued at once (``MemorySubscription``)."""

    async def receive_batch(self, max_items: int) -> list[BusMessage]: ...


@runtime_checkable
class _PublishesNowait(Protocol):
    """A bus that can publish without a checkpoint (``engine.bus.MemoryBus``)."""

    def publish_nowait(self, topic: str, data: bytes) -> object: ...


_DECODER = msgspec.json.Decoder(Normalised)
_ENCODER = msgspec.json.Encoder()


class WhaleFlows:
    """Detects whale trades on the bus, keeps a bounded history and per-symbol flows.

    Run it as a supervised child: ``await supervisor.start(whales.run,
    name="whale_flows")``. It reports ready once subscribed, so a trade
    published after ``start`` returns is seen.

    Args:
        config: the settings.
        bus: where the trades come from and the whales go.
        wall_clock: seconds since the epoch, for ``last_update``;
            ``time.time`` unless a test pins it.
        max_symbols: symbols whose latest trade time, and whose flow
            window, are kept (:data:`MAX_SYMBOLS` by default). The feed, not
            a configuration, decides which symbols trade, so past it the
            least recently traded symbol is forgotten (``symbols_evicted``),
            and the window of the symbol with the oldest latest whale is
            dropped (its whales counted in ``window_evictions``).

    Raises:
        TypeError, ValueError: ``config`` is not a ``WhaleFlowConfig``, or
            ``max_symbols`` is not a whole number >= 1.
    """

    name = "whale_flows"

    def __init__(
        self,
        config: WhaleFlowConfig,
        bus: Bus,
        *,
        wall_clock: Callable[[], float] = time.time,
        max_symbols: int = MAX_SYMBOLS,
    ) -> None:
        if not isinstance(config, WhaleFlowConfig):
            raise TypeError(f"config must be a WhaleFlowConfig, got {config!r}")
        self.config = config
        self.max_symbols = check_count("max_symbols", max_symbols, minimum=1)
        self._bus = bus
        self._wall_clock = wall_clock
        self._running = False
        self._counters = _Counters()
        self._history: collections.deque[WhaleTrade] = collections.deque(maxlen=config.history)
        # Per symbol: (trio time detected, whale), oldest first; the symbols
        # in the order of their latest whale, oldest first, so the windows
        # that expire (or are forgotten) first are at the front.
        self._windows: collections.OrderedDict[str, collections.deque[tuple[float, WhaleTrade]]]
        self._windows = collections.OrderedDict()
        # Per symbol: wall-clock time of its latest trade, least recent first.
        self._seen: collections.OrderedDict[str, float] = collections.OrderedDict()
        # Publishing a batch's whales without a checkpoint each keeps the
        # batch one trip through the scheduler, however many whales it holds.
        self._publish_nowait = bus.publish_nowait if isinstance(bus, _PublishesNowait) else None

    def recent(self, limit: int | None = None) -> list[WhaleTrade]:
        """The latest whales, newest first: all that are kept, or ``limit`` of them.

        Raises:
            TypeError, ValueError: ``limit`` is not a whole number >= 0.
        """
        if limit is None:
            return list(reversed(self._history))
        check_count("limit", limit)
        newest = reversed(self._history)
        return [whale for _, whale in zip(range(limit), newest, strict=False)]

    def flows(self) -> dict[str, SymbolFlow]:
        """Each symbol's whale flow over the last ``window`` seconds, sorted by symbol.

        Symbols without a whale in the window are left out.
        """
        now = trio.current_time()
        flows = {}
        for symbol in sorted(self._windows):
            entries = self._windows[symbol]
            self._expire(entries, now)
            if entries:
                flows[symbol] = self._flow(symbol, entries)
            else:
                del self._windows[symbol]
        return flows

    def last_update(self) -> dict[str, DatasetUpdate]:
        """``{"whale_flows": DatasetUpdate}``: when the latest trade was examined.

        Whales are rare by design, so freshness is that of the trades
        examined: a quiet market still advances it, a stalled stream does not.
        """
        updated = max(self._seen.values(), default=None)
        return {"whale_flows": DatasetUpdate(updated, dict(self._seen))}

    def statistics(self) -> WhaleFlowStatistics:
        """A frozen snapshot of the counters."""
        return self._counters.snapshot(
            name=self.name,
            running=self._running,
            last_update=max(self._seen.values(), default=None),
            symbols=len(self._seen),
            windows=len(self._windows),
        )

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Examine trades from the bus until cancelled or the bus closes.

        Reports ready once subscribed. Calls :func:`engine.heartbeat` after
        each batch of messages: give it a ``stall_after`` only when trades
        arrive steadily (an exchange feed does; a quiet test bus does not).

        Raises:
            trio.BusyResourceError: if it is already running.
            engine.SubscriberDisconnected: the bus cut the subscription off
                (only with an ``overflow`` policy of ``"disconnect"``).
        """
        if self._running:
            raise trio.BusyResourceError("whale flows are already running")
        self._running = True
        try:
            config = self.config
            async with self._bus.subscribe(
                config.pattern, maxsize=config.queue_size, overflow=config.overflow
            ) as subscription:
                task_status.started()
                if isinstance(subscription, _Batching):
                    await self._batches(subscription)
                else:
                    async for message in subscription:
                        await self._examine([message])
        finally:
            self._running = False

    async def _batches(self, subscription: _Batching) -> None:
        while True:
            try:
                messages = await subscription.receive_batch(_BATCH)
            except trio.EndOfChannel:
                return  # the bus closed
            await self._examine(messages)

    async def _examine(self, messages: list[BusMessage]) -> None:
        seen_at = self._wall_clock()
        now = trio.current_time()
        whales = []
        for message in messages:
            whale = self._detect(message.data, seen_at)
            if whale is not None:
                self._record(whale, now)
                whales.append(whale)
        if whales:
            self._counters.last_whale_at = seen_at
        self._prune_windows(now)
        prefix, nowait = self.config.publish_prefix, self._publish_nowait
        for whale in whales:
            topic, data = f"{prefix}.{whale.symbol}", _ENCODER.encode(whale)
            if nowait is None:
                await self._bus.publish(topic, data)
            else:
                try:
                    nowait(topic, data)
                except trio.WouldBlock:  # a subscriber with the block policy is full
                    await self._bus.publish(topic, data)
            self._counters.published += 1
        engine.heartbeat()

    def _detect(self, data: bytes, seen_at: float) -> WhaleTrade | None:
        counters = self._counters
        try:
            event = _DECODER.decode(data)
        except (msgspec.DecodeError, msgspec.ValidationError):
            counters.malformed += 1
            return None
        price, qty = event.price, event.qty
        if event.type not in _TRADE_TYPES or price is None or qty is None:
            counters.ignored += 1
            return None
        counters.trades += 1
        self._note_seen(event.symbol, seen_at)
        notional = price * qty
        if not notional >= self.config.threshold(event.symbol):  # NaN is no whale
            return None
        return WhaleTrade(
            symbol=event.symbol,
            time=event.time,
            price=price,
            qty=qty,
            notional=notional,
            side="sell" if event.buyer_maker else "buy",
            id=event.id,
        )

    def _note_seen(self, symbol: str, seen_at: float) -> None:
        seen = self._seen
        if symbol in seen:
            seen.move_to_end(symbol)
        seen[symbol] = seen_at
        if len(seen) > self.max_symbols:
            seen.popitem(last=False)
            self._counters.symbols_evicted += 1

    def _record(self, whale: WhaleTrade, now: float) -> None:
        self._counters.whales += 1
        self._history.append(whale)
        entries = self._windows.get(whale.symbol)
        if entries is None:
            entries = self._windows[whale.symbol] = collections.deque()
        else:
            self._windows.move_to_end(whale.symbol)
        self._expire(entries, now)
        if len(entries) >= self.config.max_window_trades:
            entries.popleft()
            self._counters.window_evictions += 1
        entries.append((now, whale))

    def _prune_windows(self, now: float) -> None:
        """Drop the windows whose whales have all expired, then any past ``max_symbols``.

        The windows are in the order of their latest whale, so the expired
        ones are at the front, and each call looks past them at one window only.
        """
        windows, window = self._windows, self.config.window
        while windows:
            entries = windows[next(iter(windows))]
            if entries and entries[-1][0] + window > now:
                break  # its latest whale still counts, and so do the later windows'
            windows.popitem(last=False)
        while len(windows) > self.max_symbols:
            _, entries = windows.popitem(last=False)
            self._expire(entries, now)
            self._counters.window_evictions += len(entries)

    def _expire(self, entries: collections.deque[tuple[float, WhaleTrade]], now: float) -> None:
        # Compared as ``detected + window <= now``, the definition itself:
        # ``now - window`` can round past a detection time that is due.
        window = self.config.window
        while entries and entries[0][0] + window <= now:
            entries.popleft()

    def _flow(
        self, symbol: str, entries: collections.deque[tuple[float, WhaleTrade]]
    ) -> SymbolFlow:
        buys = [w.notional for _, w in entries if w.side == "buy"]
        sells = [w.notional for _, w in entries if w.side == "sell"]
        # fsum: exact sums, however many whales and in whatever order.
        bought, sold = math.fsum(buys), math.fsum(sells)
        return SymbolFlow(
            symbol=symbol,
            window=self.config.window,
            buys=len(buys),
            sells=len(sells),
            buy_notional=bought,
            sell_notional=sold,
            net_notional=bought - sold,
        )
