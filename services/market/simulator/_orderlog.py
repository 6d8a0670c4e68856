"""A Hyperliquid-style order-status log, deterministic from a seed.

A Hyperliquid node writes one JSON line per order status change
(``node_order_statuses``)::

    {"time":"2025-01-01T00:00:00.000010000","user":"0x...","hash":null,"builder":null,
     "status":"open","order":{"coin":"BTC","side":"B","limitPx":"65012.5","sz":"0.0123",
     "oid":100000001,"timestamp":1735689600000,"triggerCondition":"N/A","isTrigger":false,
     "triggerPx":"0.0","children":[],"isPositionTpsl":false,"reduceOnly":false,
     "orderType":"Limit","origSz":"0.0123","tif":"Gtc","cloid":null}}

(one line each). The simulator writes the same shape: orders open and later
fill, cancel (for one of several reasons) or trigger, some are rejected
outright, prices follow each coin's seeded random walk, so a consumer sees a
plausible life cycle. Line ``i`` depends only on the seed, the symbols and
``i``, never on pacing (timestamps aside, when they come from the wall clock).

Two ways to get lines: :func:`generate_order_lines` builds a whole log at
once (tests, benchmarks), :func:`write_order_log` appends to a file at a
steady rate until cancelled (the service's default order log). Either can
mix in malformed lines on request.
"""

from __future__ import annotations

import itertools
import math
import os
import random
import time
from collections.abc import Iterable
from typing import BinaryIO

import msgspec
import trio

import engine
from engine.lowlevel import check_count

from ._config import DEFAULT_SYMBOLS
from ._instruments import Instrument
from ._pacing import Pacer

DEFAULT_EPOCH_MS = 1_735_689_600_000  # 2025-01-01T00:00:00Z
"""Where :func:`generate_order_lines` starts its simulated clock."""

# Simulated time between two lines when no rate says otherwise.
_BULK_STEP_NS = 10_000
# Orders resting at once, at most; at it, every line closes one. More
# orders open than close, so the book grows until it gets here: kept small
# enough that it does within seconds at the default rate, and the memory of
# a process that writes the log is flat from then on.
MAX_OPEN = 200
_QUOTES = ("USDT", "USDC", "USD")
# Terminal statuses of a resting order, with their weights.
_CLOSE_STATUSES = (
    ("filled", 50),
    ("canceled", 38),
    ("marginCanceled", 3),
    ("reduceOnlyCanceled", 2),
    ("selfTradeCanceled", 1),
    ("siblingFilledCanceled", 1),
    ("triggered", 5),
)
_REJECT_STATUSES = ("rejected", "perpMarginRejected", "minTradeNtlRejected", "badAloPxRejected")
_TIFS = ("Gtc", "Gtc", "Gtc", "Alo", "Ioc")


class _NodeOrder(msgspec.Struct, gc=False):
    """The ``order`` object of a node line, in the node's field order."""

    coin: str
    side: str
    limitPx: str
    sz: str
    oid: int
    timestamp: int
    triggerCondition: str
    isTrigger: bool
    triggerPx: str
    children: tuple[()]
    isPositionTpsl: bool
    reduceOnly: bool
    orderType: str
    origSz: str
    tif: str | None
    cloid: str | None


class _NodeLine(msgspec.Struct, gc=False):
    """One line of ``node_order_statuses``."""

    time: str
    user: str
    hash: str | None
    builder: None
    status: str
    order: _NodeOrder


_ENCODER = msgspec.json.Encoder()


def coin_of(symbol: str) -> str:
    """The Hyperliquid coin of a Binance-style symbol: ``"BTCUSDT"`` -> ``"BTC"``."""
    for quote in _QUOTES:
        if symbol.endswith(quote) and len(symbol) > len(quote):
            return symbol[: -len(quote)]
    return symbol


class _Coin:
    """One coin's price walk (private)."""

    __slots__ = ("base", "coin", "decimals", "lot", "price", "qty_decimals", "unit")

    def __init__(self, instrument: Instrument) -> None:
        self.coin = coin_of(instrument.symbol)
        self.base = self.price = instrument.base_price
        self.decimals = instrument.price_decimals
        self.qty_decimals = instrument.qty_decimals
        self.lot = 10.0**-self.qty_decimals
        self.unit = 400.0 / instrument.base_price  # a typical order's size


class OrderTape:
    """The order-status lines of one log, line after line (private to the simulator).

    Args:
        seed: every user, price, size and status derives from it.
        symbols: the coins traded, as Binance-style symbols (``"BTCUSDT"``)
            or bare coins (``"BTC"``).
        malformed_every: make every this-many-th line malformed (``None``: never).
    """

    def __init__(
        self,
        seed: int,
        symbols: Iterable[str] = DEFAULT_SYMBOLS,
        *,
        malformed_every: int | None = None,
    ) -> None:
        check_count("seed", seed)
        names = tuple(symbols)
        if not names or isinstance(symbols, str):
            raise ValueError(f"symbols must name at least one symbol, got {symbols!r}")
        if malformed_every is not None:
            check_count("malformed_every", malformed_every, minimum=1)
        self._random = random.Random(seed)
        self._coins = [_Coin(Instrument.create(name, seed)) for name in names]
        self._users = [f"0x{self._random.getrandbits(160):040x}" for _ in range(256)]
        self._open: list[_NodeOrder] = []
        self._next_oid = 100_000_000 + seed % 1_000_000 * 1_000
        self._malformed_every = malformed_every
        self._close_names = [name for name, _ in _CLOSE_STATUSES]
        self._close_weights = list(itertools.accumulate(w for _, w in _CLOSE_STATUSES))
        self.lines = 0
        self.malformed = 0

    def take(self, count: int, stamps_ns: Iterable[int]) -> bytes:
        """The next ``count`` lines, newline-terminated, stamped with ``stamps_ns``."""
        out: list[_NodeLine] = []
        broken: list[tuple[int, int]] = []  # (position in out, kind)
        every = self._malformed_every
        clock = _IsoClock()
        for position, stamp in zip(range(count), stamps_ns, strict=False):
            self.lines += 1
            line = self._next(clock.format(stamp), stamp // 1_000_000)
            out.append(line)
            if every is not None and self.lines % every == 0:
                broken.append((position, self.malformed % 4))
                self.malformed += 1
        if not broken:
            return _ENCODER.encode_lines(out)
        chunks = [_ENCODER.encode(line) for line in out]
        for position, kind in broken:
            chunks[position] = _break(chunks[position], kind)
        return b"\n".join(chunks) + b"\n"

    def _next(self, stamp: str, ms: int) -> _NodeLine:
        draw = self._random.random
        choice = draw()
        if self._open and (choice < 0.45 or len(self._open) >= MAX_OPEN):
            index = int(draw() * len(self._open))
            order = self._open[index]
            self._open[index] = self._open[-1]
            self._open.pop()
            status = self._random.choices(self._close_names, cum_weights=self._close_weights)[0]
            if status == "filled":
                order = msgspec.structs.replace(order, sz="0.0")
            return _NodeLine(stamp, self._user_of(order), None, None, status, order)
        coin = self._coins[int(draw() * len(self._coins))]
        coin.price *= 1.0 + 4e-4 * (draw() - 0.5) - 1e-6 * (coin.price / coin.base - 1.0)
        side = "B" if draw() < 0.5 else "A"
        offset = 1.0 - 5e-4 * draw() if side == "B" else 1.0 + 5e-4 * draw()
        size = max(round(coin.unit * (0.05 + 4.0 * draw() ** 3), coin.qty_decimals), coin.lot)
        size_text = _decimal(size, coin.qty_decimals)
        self._next_oid += 1
        tif = _TIFS[int(draw() * len(_TIFS))]
        order = _NodeOrder(
            coin=coin.coin,
            side=side,
            limitPx=_decimal(coin.price * offset, coin.decimals),
            sz=size_text,
            oid=self._next_oid,
            timestamp=ms,
            triggerCondition="N/A",
            isTrigger=False,
            triggerPx="0.0",
            children=(),
            isPositionTpsl=False,
            reduceOnly=draw() < 0.1,
            orderType="Limit",
            origSz=size_text,
            tif=tif,
            cloid=None,
        )
        if draw() < 0.03:
            status = _REJECT_STATUSES[int(draw() * len(_REJECT_STATUSES))]
        else:
            status = "open"
            self._open.append(order)
        return _NodeLine(stamp, self._user_of(order), None, None, status, order)

    def _user_of(self, order: _NodeOrder) -> str:
        # From the oid, so an order's closing line names the user who opened it.
        return self._users[order.oid * 2654435761 % len(self._users)]


def _decimal(value: float, decimals: int) -> str:
    text = f"{value:.{decimals}f}".rstrip("0")
    return text + "0" if text.endswith(".") else text


def _break(line: bytes, kind: int) -> bytes:
    """A malformed variant of an encoded line: four kinds, in turn."""
    if kind == 0:  # cut short: not JSON
        return line[: len(line) // 2]
    if kind == 1:  # a field of the wrong type
        return line.replace(b'"oid":', b'"oid":"x', 1).replace(b',"timestamp"', b'","timestamp"', 1)
    if kind == 2:  # a required field missing
        return line.replace(b'"coin":', b'"coin_":', 1)
    return b"not json at all"


class _IsoClock:
    """Nanoseconds since the epoch as the node writes them: ``2025-01-01T00:00:00.000000123``."""

    __slots__ = ("_prefix", "_second")

    def __init__(self) -> None:
        self._second = -1
        self._prefix = ""

    def format(self, stamp_ns: int) -> str:
        second, nanos = divmod(stamp_ns, 1_000_000_000)
        if second != self._second:
            self._second = second
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self._prefix}.{nanos:09d}"


def generate_order_lines(
    count: int,
    seed: int = 0,
    *,
    symbols: Iterable[str] = DEFAULT_SYMBOLS,
    epoch_ms: int = DEFAULT_EPOCH_MS,
    malformed_every: int | None = None,
) -> bytes:
    """``count`` order-status lines at once, each ending in a newline.

    Line ``i`` is stamped ``epoch_ms`` plus ``i * 10 µs``. The same arguments
    give the same bytes.

    Args:
        count: how many lines (>= 0).
        seed: every user, price, size and status derives from it (>= 0).
        symbols: the coins traded, as ``"BTCUSDT"`` or ``"BTC"``.
        epoch_ms: the first line's time, in ms since the epoch.
        malformed_every: make every this-many-th line malformed, cycling
            through four kinds: cut short, a mistyped ``oid``, no ``coin``,
            and not JSON at all; ``None`` (default) for none.

    Raises:
        ValueError: a bad count, seed, symbol list or ``malformed_every`` (named).
    """
    check_count("count", count)
    check_count("epoch_ms", epoch_ms)
    tape = OrderTape(seed, symbols, malformed_every=malformed_every)
    start = epoch_ms * 1_000_000
    return tape.take(count, range(start, start + count * _BULK_STEP_NS, _BULK_STEP_NS))


async def write_order_log(
    path: str | os.PathLike[str],
    *,
    rate: float = 100.0,
    seed: int = 0,
    symbols: Iterable[str] = DEFAULT_SYMBOLS,
    epoch_ms: int | None = None,
    malformed_every: int | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Append order-status lines to ``path`` at ``rate`` lines per second, until cancelled.

    The file is created if missing and appended to otherwise. Lines are
    written in bursts (at least a millisecond's worth) and flushed after
    each, so a reader never sees a burst half written except at its very
    end. ``task_status.started()`` is called once the file is open.

    Args:
        path: the log file.
        rate: lines per second (> 0; ``math.inf``: as fast as the disk takes them).
        seed: every user, price, size and status derives from it.
        symbols: the coins traded, as ``"BTCUSDT"`` or ``"BTC"``.
        epoch_ms: ``None`` stamps lines with the wall clock; a number starts
            a simulated clock there, line ``i`` at ``epoch_ms + i / rate``.
        malformed_every: make every this-many-th line malformed (see
            :func:`generate_order_lines`).

    Raises:
        ValueError: a bad argument (named).
        OSError: the file could not be opened or written.
    """
    if isinstance(rate, bool) or not isinstance(rate, int | float) or not rate > 0:
        raise ValueError(f"rate must be > 0 lines per second (math.inf: no limit), got {rate!r}")
    if epoch_ms is not None:
        check_count("epoch_ms", epoch_ms)
    tape = OrderTape(seed, symbols, malformed_every=malformed_every)
    step_ns = int(1e9 / (rate if math.isfinite(rate) else 100_000.0))
    burst = 10_000 if math.isinf(rate) else max(1, min(10_000, math.ceil(rate / 10)))
    pacer = Pacer(rate, max_burst=burst)
    written = 0
    # Plain file calls through the engine's thread bridge (which also keeps a
    # test's virtual clock still while the disk works).
    file = await engine.to_thread(open, os.fspath(path), "ab", abandon_on_cancel=False)
    try:
        task_status.started()
        pacer.restart()
        while True:
            count = await pacer.next_burst()
            if epoch_ms is None:
                now = time.time_ns()
                stamps = range(now - (count - 1) * step_ns, now + 1, step_ns)
            else:
                start = epoch_ms * 1_000_000 + written * step_ns
                stamps = range(start, start + count * step_ns, step_ns)
            await engine.to_thread(_append, file, tape.take(count, stamps), abandon_on_cancel=False)
            pacer.sent(count)
            written += count
    finally:
        file.close()


def _append(file: BinaryIO, data: bytes) -> None:
    file.write(data)
    file.flush()
