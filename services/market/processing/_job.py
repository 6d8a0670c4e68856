"""What a batch is asked to do (:class:`ProcessingJob`) and what each symbol gives back."""

from __future__ import annotations

import collections
import math
import re
import uuid
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import attrs

from ..candles import TIMEFRAMES, DateRange
from ..scans import Formula, parse_formula

# Upper-case letters and digits, plus ``_ - .`` inside: exchange symbols
# (``BTCUSDT``) and the spec's test names (``BAD_SYMBOL_1``) alike.
_SYMBOL = re.compile(r"[A-Z0-9](?:[A-Z0-9_.\-]{0,30}[A-Z0-9])?")


class Parameters(Mapping[str, int]):
    """A read-only, hashable, picklable mapping of a job's formula parameters.

    Built from any mapping; ``Parameters({"period": 14})["period"] == 14``.
    """

    __slots__ = ("_items",)

    def __init__(self, values: Mapping[str, int] | Iterable[tuple[str, int]] = ()) -> None:
        self._items: dict[str, int] = dict(values)

    def __getitem__(self, key: str) -> int:
        return self._items[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __hash__(self) -> int:
        return hash(frozenset(self._items.items()))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Mapping) and dict(self._items) == dict(other)

    def __repr__(self) -> str:
        return f"Parameters({self._items!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (Parameters, (self._items,))


def _to_symbols(value: Iterable[str]) -> tuple[str, ...]:
    if isinstance(value, str):
        raise TypeError(f"symbols must be a sequence of symbol names, got the string {value!r}")
    return tuple(value)


def _check_symbols(
    instance: object, attribute: attrs.Attribute[tuple[str, ...]], symbols: tuple[str, ...]
) -> None:
    if not symbols:
        raise ValueError("symbols must name at least one symbol, got none")
    for symbol in symbols:
        if not isinstance(symbol, str) or not _SYMBOL.fullmatch(symbol):
            raise ValueError(
                "symbols must be upper-case names of letters, digits and '_-.' (at most 32"
                f" characters) like 'BTCUSDT', got {symbol!r}"
            )
    if len(set(symbols)) != len(symbols):
        repeated = sorted(s for s, n in collections.Counter(symbols).items() if n > 1)
        raise ValueError(f"symbols must not repeat; repeated: {', '.join(repeated)}")


def _check_timeframe(instance: object, attribute: attrs.Attribute[str], value: str) -> None:
    if value not in TIMEFRAMES:
        raise ValueError(f"timeframe must be one of {', '.join(TIMEFRAMES)}, got {value!r}")


def _check_id(instance: object, attribute: attrs.Attribute[str], value: str) -> None:
    if not isinstance(value, str) or not value:
        raise ValueError(f"id must be a non-empty string, got {value!r}")


def _to_formula(value: str | Formula | None) -> Formula | None:
    if value is None or isinstance(value, Formula):
        return value
    if isinstance(value, str):
        return parse_formula(value)
    raise TypeError(f"formula must be a string, a Formula or None, got {value!r}")


def _to_parameters(value: Mapping[str, int] | None) -> Parameters:
    if value is None:
        return Parameters()
    if not isinstance(value, Mapping):
        raise TypeError(f"parameters must be a mapping of names to ints, got {value!r}")
    for name in value:
        if not isinstance(name, str):
            raise TypeError(f"parameter names must be strings, got {name!r}")
    return value if isinstance(value, Parameters) else Parameters(value)


def _new_id() -> str:
    return uuid.uuid4().hex


@attrs.frozen
class ProcessingJob:
    """One batch: a formula over each symbol's candles of one timeframe and date range.

    Everything is checked here, before anything reaches a worker: a formula
    given as text is parsed (so a typo raises ``FormulaError`` now), and the
    parameters are bound into it (``rsi(period) < 30`` with
    ``{"period": 14}`` becomes ``rsi14 < 30``).

    Attributes:
        symbols: the symbols, each once (a list is accepted and kept as a tuple).
        timeframe: one of ``TIMEFRAMES`` (``"1d"``).
        date_range: the bars to report matches for; indicators also read the
            bars before it that they need to be defined at its start.
        formula: the formula, with its parameters bound; ``None`` only reads
            each symbol's candles (nothing matches, no indicator is computed).
        parameters: the values of the formula's named parameters.
        id: the job's id; a new random one by default.

    Raises:
        ValueError: no symbols, a symbol repeated or badly named, an unknown
            timeframe; ``FormulaError`` (a ``ValueError``) for a formula that
            does not parse, or parameters that are missing, unused or bad.
        TypeError: an argument of the wrong type (named).
    """

    symbols: tuple[str, ...] = attrs.field(converter=_to_symbols, validator=_check_symbols)
    timeframe: str = attrs.field(validator=_check_timeframe)
    date_range: DateRange = attrs.field(validator=attrs.validators.instance_of(DateRange))
    formula: Formula | None = attrs.field(default=None, converter=_to_formula)
    parameters: Parameters = attrs.field(factory=Parameters, converter=_to_parameters)
    id: str = attrs.field(factory=_new_id, validator=_check_id)

    def __attrs_post_init__(self) -> None:
        if self.formula is not None:
            object.__setattr__(self, "formula", self.formula.bind(self.parameters))
        elif self.parameters:
            raise ValueError(f"parameters {sorted(self.parameters)} given without a formula")


@attrs.frozen(eq=False)
class ProcessingResult:
    """What one symbol of a batch gave.

    Attributes:
        symbol: the symbol.
        matches: the open times (milliseconds since the epoch, UTC) of the
            bars in the job's date range where the formula holds, oldest first.
        computed_indicators: each of the formula's indicators at the last bar
            of the range, by its canonical name (``"rsi14"``); NaN where it is
            not defined (too few bars); empty on an error.
        processing_time_ms: how long the symbol took in its worker (reading
            its candles and evaluating the formula), or ran before it failed.
        error: ``None``, or why the symbol has no result: the exception's
            message, ``"Processing timeout"``, or how its worker died.
    """

    symbol: str
    matches: tuple[int, ...] = ()
    computed_indicators: Mapping[str, float] = attrs.field(factory=dict)
    processing_time_ms: float = 0.0
    error: str | None = None

    @property
    def ok(self) -> bool:
        """Whether the symbol was processed (``error`` is ``None``)."""
        return self.error is None

    def __eq__(self, other: object) -> bool:
        # NaN indicator values compare equal here, so a result equals its copy.
        if not isinstance(other, ProcessingResult):
            return NotImplemented
        return (self.symbol, self.matches, self.processing_time_ms, self.error) == (
            other.symbol,
            other.matches,
            other.processing_time_ms,
            other.error,
        ) and _same_values(self.computed_indicators, other.computed_indicators)

    def __hash__(self) -> int:
        return hash((self.symbol, self.matches, self.error))


def _same_values(a: Mapping[str, float], b: Mapping[str, float]) -> bool:
    if a.keys() != b.keys():
        return False
    return all(a[key] == b[key] or (math.isnan(a[key]) and math.isnan(b[key])) for key in a)
