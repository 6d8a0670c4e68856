"""The latest orders published, kept as the messages they went out in, listed on demand.

A backlog parsed at half a million lines a second must not pay, per line,
for a history that an HTTP client reads now and then. So the history keeps
references to the payloads already made for the bus (per order, or per coin
in batch mode, with each order's coin in log order) and builds the list of
single orders only when :meth:`History.latest` is called.
"""

from __future__ import annotations

import array
import collections
import itertools
from collections.abc import Iterator

import msgspec

_RAW_ARRAY = msgspec.json.Decoder(list[msgspec.Raw])


class _Orders:
    """One message per order: the payloads themselves."""

    def __init__(self, payloads: list[bytes]) -> None:
        self.count = len(payloads)
        self._payloads = payloads

    def newest_first(self) -> Iterator[bytes]:
        return reversed(self._payloads)


class _Batch:
    """One message per coin: the arrays, and which array each of the last orders is in."""

    def __init__(self, arrays: list[bytes], order_coins: bytes) -> None:
        self._arrays = arrays
        self._coins = array.array("I", order_coins)
        self.count = len(self._coins)

    def newest_first(self) -> Iterator[bytes]:
        # The last orders of each coin's array are its latest: walking the
        # coins backwards and taking from each array's end restores log order.
        opened: dict[int, list[msgspec.Raw]] = {}
        for coin in reversed(self._coins):
            orders = opened.get(coin)
            if orders is None:
                orders = opened[coin] = _RAW_ARRAY.decode(self._arrays[coin])
            yield bytes(orders.pop())


class History:
    """The newest ``size`` orders, in the form they were published in (private)."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._parts: collections.deque[_Orders | _Batch] = collections.deque()
        self._count = 0

    def add_orders(self, payloads: list[bytes]) -> None:
        """Orders published one message each, in log order."""
        if self._size:
            self._add(_Orders(payloads[-self._size :]))

    def add_batch(self, arrays: list[bytes], order_coins: bytes) -> None:
        """Orders published as per-coin arrays; ``order_coins`` as :class:`ParsedChunk` has it."""
        if self._size and order_coins:
            self._add(_Batch(arrays, order_coins))

    def _add(self, part: _Orders | _Batch) -> None:
        self._parts.append(part)
        self._count += part.count
        # Drop whole parts that the newer ones make unnecessary.
        while self._count - self._parts[0].count >= self._size:
            self._count -= self._parts.popleft().count

    def latest(self, limit: int) -> list[bytes]:
        """The newest ``limit`` orders' payloads (no more than ``size``), newest first."""
        newest = itertools.chain.from_iterable(
            part.newest_first() for part in reversed(self._parts)
        )
        return list(itertools.islice(newest, min(limit, self._size)))
