"""The candle seam's values: timeframes, date ranges, candles, and the repository protocol."""

from __future__ import annotations

import datetime
from typing import Any, Protocol, TypeAlias, runtime_checkable

import attrs
import numpy as np
import numpy.typing as npt

TIMEFRAMES: tuple[str, ...] = ("1m", "5m", "15m", "1h", "4h", "1d")
"""The timeframes a store keeps and the fetcher fills, shortest first."""

TIMEFRAME_MS: dict[str, int] = {
    "1m": 60_000,
    "5m": 300_000,
    "15m": 900_000,
    "1h": 3_600_000,
    "4h": 14_400_000,
    "1d": 86_400_000,
}
"""Each timeframe's length in milliseconds."""

MsRange: TypeAlias = tuple[int, int]
"""``(start_ms, end_ms)``: the half-open span ``[start_ms, end_ms)`` in epoch milliseconds."""

_DAY_MS = 86_400_000
_EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)


def check_timeframe(timeframe: str) -> int:
    """``timeframe``'s length in milliseconds.

    Raises:
        ValueError: it is not one of :data:`TIMEFRAMES`.
    """
    length = TIMEFRAME_MS.get(timeframe) if isinstance(timeframe, str) else None
    if length is None:
        raise ValueError(f"timeframe must be one of {', '.join(TIMEFRAMES)}; got {timeframe!r}")
    return length


def check_symbol(symbol: str) -> str:
    """``symbol`` itself, if it is a non-empty string.

    Raises:
        TypeError: it is not a string.
        ValueError: it is empty.
    """
    if not isinstance(symbol, str):
        raise TypeError(f"symbol must be a string, got {symbol!r}")
    if not symbol:
        raise ValueError("symbol must not be empty")
    return symbol


class UnknownSymbol(KeyError):
    """A repository has no candles for this symbol and timeframe.

    A :class:`KeyError` (so a :class:`LookupError`) whose message names both.

    Attributes:
        symbol: the symbol asked for.
        timeframe: the timeframe asked for.
    """

    def __init__(self, symbol: str, timeframe: str) -> None:
        super().__init__(symbol, timeframe)
        self.symbol = symbol
        self.timeframe = timeframe

    def __str__(self) -> str:
        return f"no {self.timeframe} candles for symbol {self.symbol!r}"


def _to_ms(moment: datetime.date | datetime.datetime, name: str, *, end: bool) -> int:
    if isinstance(moment, datetime.datetime):
        if moment.tzinfo is None or moment.utcoffset() is None:
            raise ValueError(
                f"DateRange {name} must be a timezone-aware datetime (UTC) or a date, "
                f"got the naive {moment!r}"
            )
        delta = moment - _EPOCH
        return delta // datetime.timedelta(milliseconds=1)
    if isinstance(moment, datetime.date):
        days = (moment - _EPOCH.date()).days + (1 if end else 0)
        return days * _DAY_MS
    raise TypeError(
        f"DateRange {name} must be a datetime.date or datetime.datetime, got {moment!r}"
    )


def _check_range(instance: DateRange, attribute: attrs.Attribute[Any], value: object) -> None:
    start = _to_ms(instance.start, "start", end=False)
    end = _to_ms(instance.end, "end", end=True)
    # An end date is inclusive: a range ending on a day wholly before its start is backwards.
    inclusive = not isinstance(instance.end, datetime.datetime)
    if end < start or (inclusive and end <= start):
        raise ValueError(f"DateRange end ({instance.end}) is before its start ({instance.start})")


@attrs.frozen
class DateRange:
    """A span of time in UTC: ``[start_ms(), end_ms())`` in milliseconds since the epoch.

    A :class:`datetime.date` means that whole UTC day: ``DateRange(date(2024, 1, 1),
    date(2024, 12, 31))`` is the year 2024, both days included. A
    :class:`datetime.datetime` must carry a time zone; as ``end`` it is exclusive.

    Args:
        start: the first day, or the first moment.
        end: the last day (inclusive), or the moment after the last (exclusive).

    Raises:
        TypeError: ``start`` or ``end`` is neither a date nor a datetime.
        ValueError: a datetime is naive, or ``end`` is before ``start``.
    """

    start: datetime.date | datetime.datetime
    end: datetime.date | datetime.datetime = attrs.field(validator=_check_range)

    def start_ms(self) -> int:
        """The first millisecond of the range, since the epoch (UTC)."""
        return _to_ms(self.start, "start", end=False)

    def end_ms(self) -> int:
        """The millisecond after the range's last one, since the epoch (UTC)."""
        return _to_ms(self.end, "end", end=True)

    @classmethod
    def from_ms(cls, start_ms: int, end_ms: int) -> DateRange:
        """The range ``[start_ms, end_ms)`` as UTC datetimes.

        Raises:
            ValueError: ``end_ms`` is before ``start_ms``.
        """
        return cls(
            _EPOCH + datetime.timedelta(milliseconds=start_ms),
            _EPOCH + datetime.timedelta(milliseconds=end_ms),
        )


Int64s = npt.NDArray[np.int64]
Floats = npt.NDArray[np.float64]


def _int64s(value: object) -> Int64s:
    array = np.ascontiguousarray(value, dtype=np.int64)
    if array.ndim != 1:
        raise ValueError(f"open_time must be one-dimensional, got shape {array.shape}")
    return array


def _floats(value: object) -> Floats:
    array = np.ascontiguousarray(value, dtype=np.float64)
    if array.ndim != 1:
        raise ValueError(f"candle prices must be one-dimensional, got shape {array.shape}")
    return array


def _same_length(instance: Candles, attribute: attrs.Attribute[Any], value: Floats) -> None:
    if len(value) != len(instance.open_time):
        raise ValueError(
            f"Candles.{attribute.name} has {len(value)} values but open_time has "
            f"{len(instance.open_time)}"
        )


@attrs.frozen(eq=False)
class Candles:
    """One symbol's bars in a timeframe, oldest first, as parallel numpy arrays.

    Satisfies :class:`services.market.scans.KlinesLike`, so indicators and
    scans take it as it is.

    Args:
        open_time: each bar's opening time, milliseconds since the epoch (int64).
        open, high, low, close: prices (float64).
        volume: base-asset volume (float64).

    Raises:
        ValueError: an array is not one-dimensional, or the lengths differ.
    """

    open_time: Int64s = attrs.field(converter=_int64s)
    open: Floats = attrs.field(converter=_floats, validator=_same_length)
    high: Floats = attrs.field(converter=_floats, validator=_same_length)
    low: Floats = attrs.field(converter=_floats, validator=_same_length)
    close: Floats = attrs.field(converter=_floats, validator=_same_length)
    volume: Floats = attrs.field(converter=_floats, validator=_same_length)

    def __len__(self) -> int:
        return len(self.open_time)

    @classmethod
    def empty(cls) -> Candles:
        """No bars."""
        nothing: list[float] = []
        return cls(nothing, nothing, nothing, nothing, nothing, nothing)

    @classmethod
    def from_rows(cls, rows: object) -> Candles:
        """Bars from rows of ``(open_time, open, high, low, close, volume)``.

        Raises:
            ValueError: a row is not six numbers.
        """
        table = np.asarray(rows, dtype=np.float64)
        if table.size == 0:
            return cls.empty()
        if table.ndim != 2 or table.shape[1] != 6:
            raise ValueError(f"candle rows must have 6 columns, got shape {table.shape}")
        # Exact for any millisecond time before the year 287,000: float64
        # holds integers to 2**53.
        return cls(table[:, 0].astype(np.int64), *(table[:, i] for i in range(1, 6)))

    def rows(self) -> list[tuple[int, float, float, float, float, float]]:
        """The bars as ``(open_time, open, high, low, close, volume)`` tuples of Python numbers."""
        return list(
            zip(
                self.open_time.tolist(),
                self.open.tolist(),
                self.high.tolist(),
                self.low.tolist(),
                self.close.tolist(),
                self.volume.tolist(),
                strict=True,
            )
        )

    def between(self, start_ms: int, end_ms: int) -> Candles:
        """The bars that open in ``[start_ms, end_ms)``."""
        first, last = np.searchsorted(self.open_time, [start_ms, end_ms])
        return Candles(*(column[first:last] for column in self._columns()))

    def _columns(self) -> tuple[npt.NDArray[Any], ...]:
        return (self.open_time, self.open, self.high, self.low, self.close, self.volume)


@runtime_checkable
class CandleRepository(Protocol):
    """Where workers read candles from: one symbol, timeframe and date range at a time.

    Synchronous, because it runs inside worker processes. An implementation
    must pickle small (a path or a DSN, never an open connection: it opens
    one lazily in each process and keeps it).
    """

    def candles(self, symbol: str, timeframe: str, date_range: DateRange) -> Candles:
        """``symbol``'s bars of ``timeframe`` that open within ``date_range``, oldest first.

        Raises:
            UnknownSymbol: the repository has no candles of ``timeframe`` for ``symbol``.
            ValueError: ``timeframe`` is not one of :data:`TIMEFRAMES`.
        """
        ...


@runtime_checkable
class CandleStore(CandleRepository, Protocol):
    """A :class:`CandleRepository` that can also be written, what :class:`CandleFetcher` fills.

    ``covered`` ranges are those whose candles the store holds completely
    (every bar that exists there), recorded with the writes.
    """

    def write(
        self, symbol: str, timeframe: str, candles: Candles, *, covers: MsRange | None = None
    ) -> int:
        """Upsert ``candles``; record ``covers`` (default: their span) as covered.

        Returns:
            The number of bars written.
        """
        ...

    async def write_async(
        self, symbol: str, timeframe: str, candles: Candles, *, covers: MsRange | None = None
    ) -> int:
        """:meth:`write` in a worker thread."""
        ...

    def covered(self, symbol: str, timeframe: str) -> list[MsRange]:
        """The ``[start_ms, end_ms)`` ranges held completely, sorted and disjoint."""
        ...

    async def covered_async(self, symbol: str, timeframe: str) -> list[MsRange]:
        """:meth:`covered` in a worker thread."""
        ...


def default_covers(timeframe_ms: int, candles: Candles) -> MsRange | None:
    """The span ``candles`` cover: from the first open to the last close; ``None`` if empty."""
    if len(candles) == 0:
        return None
    return int(candles.open_time[0]), int(candles.open_time[-1]) + timeframe_ms


def check_covers(covers: MsRange | None) -> None:
    """Raises ValueError unless ``covers`` is ``None`` or ``(start, end)`` with start <= end."""
    if covers is None:
        return
    start, end = covers
    if end < start:
        raise ValueError(f"covers must be (start_ms, end_ms) with start <= end, got {covers!r}")


def merge_ranges(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted, disjoint ranges covering the same ground; touching ranges join."""
    merged: list[tuple[int, int]] = []
    for start, end in sorted(ranges):
        if end <= start:
            continue
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def missing_ranges(
    start: int, end: int, covered: list[tuple[int, int]]
) -> tuple[list[tuple[int, int]], int]:
    """The parts of ``[start, end)`` outside ``covered``, and how many covered parts it skips."""
    gaps: list[tuple[int, int]] = []
    skipped = 0
    cursor = start
    for lo, hi in merge_ranges(covered):
        if hi <= cursor or lo >= end:
            continue
        skipped += 1
        if lo > cursor:
            gaps.append((cursor, lo))
        cursor = max(cursor, hi)
    if cursor < end:
        gaps.append((cursor, end))
    return gaps, skipped
