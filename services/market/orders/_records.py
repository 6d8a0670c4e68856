"""Order-status lines as typed records, and the chunk parser that runs in or out of process.

A Hyperliquid node writes one JSON object per line; only the fields an
:class:`Order` needs are declared, the rest are skipped by the decoder.
Decimal strings (``"limitPx": "65000.0"``) decode straight to floats inside
msgspec (``strict=False``), with a range check, so a price that is not a
positive finite number makes its line malformed, as a missing or mistyped
field does.

:func:`parse_chunk` is the unit of work: a block of complete lines in, the
bus messages out (topic, de-duplication id and payload, encoded once), plus
the count and a few samples of malformed lines. It is a plain module-level
function so it can run in a worker process as well as in the event loop.
"""

from __future__ import annotations

import array
import collections
import enum
import re
from typing import Annotated, Any, Literal

import attrs
import msgspec
import numpy as np

MAX_SAMPLE_CHARS = 200
"""Characters of a malformed line kept in a sample."""

# Prices and sizes: finite and non-negative (a filled order's ``sz`` is 0).
_Price = Annotated[float, msgspec.Meta(gt=0.0, lt=1e18)]
_Size = Annotated[float, msgspec.Meta(ge=0.0, lt=1e18)]
_Oid = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]  # msgspec bounds are 64-bit
_Millis = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]  # a JSON client's int64 at most
_Status = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]


class OrderState(enum.StrEnum):
    """What an order-status line means for the order, whatever the exact status word.

    Hyperliquid has a few dozen statuses (``canceled``, ``marginCanceled``,
    ``perpMarginRejected``, ...) and adds more; they fall into these states,
    and an unknown word is kept as it is, with the state ``other``.
    """

    OPEN = "open"
    """Resting on the book."""
    FILLED = "filled"
    """Filled in full."""
    CANCELED = "canceled"
    """Canceled, by the user or by the exchange (``*Canceled``, ``scheduledCancel``)."""
    TRIGGERED = "triggered"
    """A trigger order fired."""
    REJECTED = "rejected"
    """Refused when placed (``*Rejected``)."""
    OTHER = "other"
    """A status word this version does not know."""


_STATES: dict[str, OrderState] = {}


def state_of(status: str) -> OrderState:
    """The :class:`OrderState` of a status word: ``"marginCanceled"`` -> ``canceled``."""
    state = _STATES.get(status)
    if state is None:
        if status in ("open", "filled", "canceled", "triggered", "rejected"):
            state = OrderState(status)
        elif status.endswith("Canceled") or status == "scheduledCancel":
            state = OrderState.CANCELED
        elif status.endswith("Rejected"):
            state = OrderState.REJECTED
        else:
            state = OrderState.OTHER
        if len(_STATES) < 1024:  # a stream of made-up words cannot grow it for ever
            _STATES[status] = state
    return state


class _Details(msgspec.Struct, gc=False):
    """The ``order`` object of a node line: the fields used, in the node's names."""

    coin: str  # checked once per distinct coin, in _check_coins, not per line by a pattern
    side: Literal["B", "A"]
    limitPx: _Price
    sz: _Size
    oid: _Oid
    timestamp: _Millis
    origSz: _Size | None = None
    orderType: str = "Limit"
    tif: str | None = None
    reduceOnly: bool = False
    isTrigger: bool = False
    triggerPx: _Size = 0.0
    cloid: str | None = None


class _Line(msgspec.Struct, gc=False):
    """One line of the node's ``order_statuses`` log."""

    time: str
    user: str
    status: _Status
    order: _Details


class Order(msgspec.Struct, frozen=True, gc=False, omit_defaults=True, tag="order"):
    """One order-status change, as published on the bus (``orders.<coin>``) and kept in history.

    Encoded as compact JSON with ``"type": "order"`` first; fields at their
    default are left out.

    Attributes:
        coin: the coin (``"BTC"``; spot pairs as the node names them, ``"@107"``).
        oid: the exchange's order id.
        status: the node's status word (``"open"``, ``"filled"``, ``"marginCanceled"``...).
        state: what the status means (:class:`OrderState`).
        side: ``"buy"`` or ``"sell"``.
        px: the limit price.
        sz: the size left (0 once filled).
        orig_sz: the size placed.
        user: the account address.
        time: when the status changed, as the node wrote it (UTC, ISO 8601, ns).
        timestamp: when the order was placed, in ms since the epoch.
        order_type: ``"Limit"``, ``"Stop Market"``...
        tif: time in force (``"Gtc"``, ``"Alo"``, ``"Ioc"``), if any.
        reduce_only: whether it can only reduce a position.
        trigger_px: the trigger price of a trigger order.
        cloid: the client order id, if any.
    """

    coin: str
    oid: int
    status: str
    state: OrderState
    side: Literal["buy", "sell"]
    px: float
    sz: float
    orig_sz: float
    user: str
    time: str
    timestamp: int
    order_type: str
    tif: str | None = None
    reduce_only: bool = False
    trigger_px: float | None = None
    cloid: str | None = None

    @property
    def topic(self) -> str:
        """Its bus topic: ``orders.<coin>``."""
        return f"orders.{self.coin}"

    @property
    def msg_id(self) -> str:
        """Its de-duplication id on the bus: ``"<oid>:<status>:<time>"``."""
        return f"{self.oid}:{self.status}:{self.time}"


@attrs.frozen
class ParsedChunk:
    """What :func:`parse_chunk` made of a block of lines (private to the package).

    Built to cross a process boundary cheaply: the messages' ids and payloads
    travel as one string and one bytes object each, split where they arrive.

    Attributes:
        lines: non-blank lines read.
        orders: valid order-status lines among them.
        malformed: lines that were not a valid order-status line.
        samples: up to ``max_samples`` of them, as ``"<error>: <line start>"``.
        topics: each bus message's topic, in publishing order.
        ids: each message's de-duplication id, joined by newlines.
        payloads: each message's payload, each followed by a newline.
        order_coins: with ``batch=True``, for each of the last ``keep``
            orders in log order, the index of its message (its coin's array
            holds it), as native unsigned 32-bit ints: enough to list the
            latest orders later from the arrays, without encoding them twice.
    """

    lines: int
    orders: int
    malformed: int
    samples: list[str]
    topics: list[str]
    ids: str
    payloads: bytes
    order_coins: bytes = b""


_NEWLINE = np.uint8(0x0A)
_OPEN = np.uint8(0x7B)  # "{"
_CLOSE = np.uint8(0x7D)  # "}"
# What decoding a bad line raises: a RecursionError too, from msgspec, for a
# value nested deeper than it goes (an unknown field's, skipped or not).
_BAD_LINE = (msgspec.DecodeError, msgspec.ValidationError, RecursionError)
_DECODER = msgspec.json.Decoder(_Line, strict=False)  # strict=False: "65000.0" -> 65000.0
_ENCODER = msgspec.json.Encoder()
_ORDER_DECODER = msgspec.json.Decoder(Order)


def decode_order(payload: bytes) -> Order:
    """A published payload back into an :class:`Order`."""
    return _ORDER_DECODER.decode(payload)


def _orders(lines: list[_Line]) -> list[Order]:
    # One comprehension, no call per line: this runs for every line parsed.
    states, sides = _STATES, _SIDES
    return [
        Order(
            d.coin,
            d.oid,
            line.status,
            states.get(line.status) or state_of(line.status),
            sides[d.side],
            d.limitPx,
            d.sz,
            d.sz if d.origSz is None else d.origSz,
            line.user,
            line.time,
            d.timestamp,
            d.orderType,
            d.tif,
            d.reduceOnly,
            d.triggerPx if d.isTrigger else None,
            d.cloid,
        )
        for line in lines
        for d in (line.order,)
    ]


_SIDES: dict[str, Literal["buy", "sell"]] = {"B": "buy", "A": "sell"}


def parse_chunk(
    data: bytes, *, batch: bool = False, keep: int = 0, max_samples: int = 5
) -> ParsedChunk:
    """Parse a block of complete order-status lines into bus messages.

    The whole block is decoded in one call; if any line is bad (or the
    block's values may not line up one per line), it is decoded line by
    line, so every good line still yields its order and every bad one
    (not JSON, two values, a field missing, mistyped or out of range, a
    value nested too deep) is counted. Blank lines are skipped and not
    counted. Nothing else is raised, whatever ``data`` holds.

    Args:
        data: whole lines, each ending in a newline (a last line without
            one counts as a line too).
        batch: ``False``: one message per order, on ``orders.<coin>``, with
            the id ``<oid>:<status>:<time>``. ``True``: one message per coin,
            a JSON array of that coin's orders in log order, with the id of
            its first order and the count (``<oid>:<status>:<time>+<n>``).
        keep: with ``batch``, how many of the last orders to index in
            ``order_coins`` (for the recent-orders history).
        max_samples: how many malformed lines to describe, at most.
    """
    lines, expected, malformed, samples = _decode(data, max_samples)
    if not all(_coin_ok(coin) for coin in {line.order.coin for line in lines}):
        lines, dropped = _drop_bad_coins(lines, samples, max_samples)
        malformed += dropped
    orders = _orders(lines)
    if not batch:
        return ParsedChunk(
            lines=expected,
            orders=len(orders),
            malformed=malformed,
            samples=samples,
            topics=[_topic(order.coin) for order in orders],
            ids="\n".join([f"{o.oid}:{o.status}:{o.time}" for o in orders]),
            payloads=_ENCODER.encode_lines(orders),
        )
    by_coin: collections.defaultdict[str, list[Order]] = collections.defaultdict(list)
    for order in orders:
        by_coin[order.coin].append(order)
    ids = []
    for group in by_coin.values():
        first = group[0]
        ids.append(f"{first.oid}:{first.status}:{first.time}+{len(group)}")
    order_coins = b""
    if keep > 0:
        index = {coin: position for position, coin in enumerate(by_coin)}
        order_coins = array.array("I", [index[o.coin] for o in orders[-keep:]]).tobytes()
    return ParsedChunk(
        lines=expected,
        orders=len(orders),
        malformed=malformed,
        samples=samples,
        topics=[_topic(coin) for coin in by_coin],
        ids="\n".join(ids),
        payloads=_ENCODER.encode_lines(list(by_coin.values())),
        order_coins=order_coins,
    )


def _decode(data: bytes, max_samples: int) -> tuple[list[_Line], int, int, list[str]]:
    """The block's valid lines, its line count, and its malformed lines' count and samples."""
    # numpy finds the newlines, and reads the bytes around them, faster than bytes methods.
    buffer = np.frombuffer(data, np.uint8)
    ends = np.flatnonzero(buffer == _NEWLINE)
    expected = len(ends) + (1 if data and not data.endswith(b"\n") else 0)
    if _framed(buffer, ends, data):
        try:
            lines: list[_Line] = _DECODER.decode_lines(data)
        except _BAD_LINE:
            lines = []
        if len(lines) == expected:
            return lines, expected, 0, []
    # Some line is bad or blank, or the values may not line up one per line
    # (decode_lines would accept two objects on one line, or one on two).
    lines = []
    expected = malformed = 0
    samples: list[str] = []
    for raw in data.split(b"\n"):
        if not raw.strip():
            continue
        expected += 1
        try:
            lines.append(_DECODER.decode(raw))
        except _BAD_LINE as exc:
            malformed += 1
            if len(samples) < max_samples:
                why = "nested too deeply" if isinstance(exc, RecursionError) else exc
                samples.append(describe_malformed(raw, why))
    return lines, expected, malformed, samples


def _framed(buffer: np.ndarray[Any, Any], ends: np.ndarray[Any, Any], data: bytes) -> bool:
    """Whether every line of the block starts with ``{`` and ends with ``}``.

    Then no JSON value can run from one line into the next (inside a value,
    a ``}`` is followed by ``,``, ``}`` or ``]``, never ``{``, and a string
    cannot hold a newline), so if ``decode_lines`` finds as many values as
    there are lines, each line holds exactly one. Without this, two values
    on one line could make up for a blank line, or for a value over two.
    """
    if not data:
        return True
    if buffer[0] != _OPEN or (not data.endswith(b"\n") and buffer[-1] != _CLOSE):
        return False
    if (buffer[ends - 1] != _CLOSE).any():  # ends[0] >= 1: the block starts with "{"
        return False
    starts = ends[:-1] + 1 if data.endswith(b"\n") else ends + 1
    return bool((buffer[starts] == _OPEN).all())


_TOPICS: dict[str, str] = {}
_COINS: dict[str, bool] = {}
# One topic token: printable ASCII, no space, no "." (a separator) or wildcard.
_COIN = re.compile(r"[\x21-\x29\x2b-\x2d\x2f-\x3d\x3f-\x7e]{1,64}")


def _drop_bad_coins(
    lines: list[_Line], samples: list[str], max_samples: int
) -> tuple[list[_Line], int]:
    good = []
    for line in lines:
        if _coin_ok(line.order.coin):
            good.append(line)
        elif len(samples) < max_samples:
            coin = line.order.coin[:80]
            samples.append(f"coin {coin!r} cannot name a topic: oid {line.order.oid}")
    return good, len(lines) - len(good)


def _coin_ok(coin: str) -> bool:
    ok = _COINS.get(coin)
    if ok is None:
        ok = _COIN.fullmatch(coin) is not None
        if len(_COINS) < 4096:
            _COINS[coin] = ok
    return ok


ORDER_KIND = "orders"
"""The first token of the orders' bus topics: ``orders.<coin>``."""


def _topic(coin: str) -> str:
    # One string object per coin: pickled once per chunk, and no f-string per order.
    topic = _TOPICS.get(coin)
    if topic is None:
        topic = f"{ORDER_KIND}.{coin}"
        if len(_TOPICS) < 4096:
            _TOPICS[coin] = topic
    return topic


def describe_malformed(raw: bytes, error: Exception | str) -> str:
    """``"<error>: <the line's start>"``, for statistics and logs."""
    text = raw[:MAX_SAMPLE_CHARS].decode("utf-8", "replace")
    return f"{error}: {text}"
