"""Whale flows (seed 001 rebuilt): large trades picked out of the trade stream, as they happen.

Seed 001 scanned for whale flows in a thread-pool cycle with the same
never-firing futures timeouts as its watchlist, and froze with it. Here
detection is a consumer of the bus: each trade published on ``trades.<SYMBOL>``
is looked at once, as it arrives; there is no request that can hang. What
can go wrong is counted instead: payloads that are not trades, and trades the
subscription's bounded queue dropped (on the bus's statistics).

Definitions (also in ``docs/whale-flows.md``):

- a trade is a *whale* when ``price * qty >= threshold`` for its symbol;
- its *side* is the aggressor's: the taker. ``buyer_maker`` true means the
  buyer's order was resting in the book and the seller crossed the spread,
  so the whale is a ``"sell"``; false makes it a ``"buy"``;
- the *flow* of a symbol sums the notional of its whales over the last
  ``window`` seconds of the trio clock, by side: ``buy_notional``,
  ``sell_notional`` and ``net_notional = buy - sell``. A whale detected at
  ``t`` counts while ``now < t + window``.
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
from engine._validation import check_count
from engine.bus import Bus, BusMessage

from .._events import Normalised
from ._config import WhaleFlowConfig
from ._quotes import DatasetUpdate

logger = logging.getLogger("market.cycles.whales")

_TRADE_TYPES = frozenset({"trade", "aggTrade"})
# Messages taken from the subscription at once at most, when it can batch.
_BATCH = 1024


class WhaleTrade(msgspec.Struct, frozen=True, omit_defaults=True):
    """One whale trade, as kept in the history and published on ``whales.<SYMBOL>``.

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


@attrs.frozen
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
            it held ``max_window_trades`` already.
        last_update: wall-clock seconds since the epoch of the latest trade
            examined.
        last_whale_at: the same, of the latest whale.
    """

    name: str
    running: bool
    trades: int
    whales: int
    published: int
    malformed: int
    ignored: int
    window_evictions: int
    last_update: float | None
    last_whale_at: float | None


@attrs.define
class _Counters:
    trades: int = 0
    whales: int = 0
    published: int = 0
    malformed: int = 0
    ignored: int = 0
    window_evictions: int = 0
    last_whale_at: float | None = None


@runtime_checkable
class _Batching(Protocol):
    """A subscription that hands over everything queued at once (``MemorySubscription``)."""

    async def receive_batch(self, max_items: int) -> list[BusMessage]: ...


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
    """

    name = "whale_flows"

    def __init__(
        self,
        config: WhaleFlowConfig,
        bus: Bus,
        *,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        if not isinstance(config, WhaleFlowConfig):
            raise TypeError(f"config must be a WhaleFlowConfig, got {config!r}")
        self.config = config
        self._bus = bus
        self._wall_clock = wall_clock
        self._running = False
        self._counters = _Counters()
        self._history: collections.deque[WhaleTrade] = collections.deque(maxlen=config.history)
        # Per symbol: (trio time detected, whale), oldest first.
        self._windows: dict[str, collections.deque[tuple[float, WhaleTrade]]] = {}
        self._seen: dict[str, float] = {}

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
        c = self._counters
        return WhaleFlowStatistics(
            name=self.name,
            running=self._running,
            trades=c.trades,
            whales=c.whales,
            published=c.published,
            malformed=c.malformed,
            ignored=c.ignored,
            window_evictions=c.window_evictions,
            last_update=max(self._seen.values(), default=None),
            last_whale_at=c.last_whale_at,
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
        prefix = self.config.publish_prefix
        for whale in whales:
            await self._bus.publish(f"{prefix}.{whale.symbol}", _ENCODER.encode(whale))
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
        self._seen[event.symbol] = seen_at
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

    def _record(self, whale: WhaleTrade, now: float) -> None:
        self._counters.whales += 1
        self._history.append(whale)
        entries = self._windows.get(whale.symbol)
        if entries is None:
            entries = self._windows[whale.symbol] = collections.deque()
        self._expire(entries, now)
        if len(entries) >= self.config.max_window_trades:
            entries.popleft()
            self._counters.window_evictions += 1
        entries.append((now, whale))

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
