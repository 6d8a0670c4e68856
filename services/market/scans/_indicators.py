"""Technical indicators over kline arrays, and the registry of names formulas may use.

The functions take float arrays (anything ``numpy.asarray`` turns into a 1-D
float64 array) and return arrays aligned with their input: element ``i`` is
the indicator at bar ``i``, NaN where it is not defined yet. Too few bars is
therefore never an error, only NaN. A NaN inside the input propagates: the
recursive indicators (EMA, RSI, ATR) stay NaN after it, the windowed ones
(SMA, Bollinger) for one window.

Definitions follow TA-Lib's defaults, so values agree with most charting
tools once the series is long enough:

* EMA is seeded with the SMA of its first ``n`` values (first value at bar
  ``n - 1``), then ``ema[i] = a * x[i] + (1 - a) * ema[i - 1]`` with
  ``a = 2 / (n + 1)``. (pandas' ``ewm(span=n, adjust=False)`` seeds with
  ``x[0]`` instead; both converge to the same values.)
* RSI and ATR use Wilder's smoothing: the same recursion with ``a = 1 / n``,
  seeded with the plain mean of the first ``n`` gains, losses or true ranges.

The recursions are computed in closed form, ``y[k] = w**k * (seed + a *
cumsum(x[j] / w**j))`` with ``w = 1 - a``, one block at a time: a single
block overflows float64 once ``w**-k`` does (a 2-period EMA over 650 bars),
so each block is cut where ``w**-k`` reaches 1e50 and the next one is seeded
with its last value. It agrees with a plain loop to about 1e-15 relative
(the tests require 1e-12) and is faster than one (``docs/formulas.md``).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from types import MappingProxyType
from typing import ParamSpec, Protocol, TypeVar

import attrs
import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]
_P = ParamSpec("_P")
_R = TypeVar("_R")

#: The largest period (or other parameter) an indicator name accepts.
MAX_PERIOD = 1000


# -- argument checks -----------------------------------------------------------


def _check_period(name: str, value: object) -> int:
    # bool is an int subclass; sma(x, True) is a bug, not a 1-period SMA.
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return int(value)


def _as_series(name: str, values: npt.ArrayLike) -> FloatArray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array, got shape {array.shape}")
    return array


def _quiet(fn: Callable[_P, _R]) -> Callable[_P, _R]:
    """Run ``fn`` with numpy's floating-point warnings off.

    inf - inf, 0 / 0 and overflow give NaN or inf by definition here; in a
    service they would only be log noise (and errors under ``-W error``).
    """

    @functools.wraps(fn)
    def quiet(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        with np.errstate(all="ignore"):
            return fn(*args, **kwargs)

    return quiet


def _nan(length: int) -> FloatArray:
    out = np.empty(length)
    out.fill(np.nan)
    return out


# -- the indicators --------------------------------------------------------------


@_quiet
def sma(values: npt.ArrayLike, n: int) -> FloatArray:
    """Simple moving average: the mean of the last ``n`` values.

    Args:
        values: the series, e.g. closes.
        n: the window, in bars (>= 1).

    Returns:
        An array as long as ``values``; the first ``n - 1`` elements are NaN.
    """
    x = _as_series("values", values)
    n = _check_period("n", n)
    out = _nan(len(x))
    if len(x) >= n:
        out[n - 1 :] = _window_sums(x, n) / n
    return out


def _window_sums(x: FloatArray, n: int) -> FloatArray:
    # Each window summed on its own, not as a difference of running sums,
    # which drift over long series and turn a constant's SMA into a near miss.
    return np.convolve(x, np.ones(n), mode="valid")


# Each closed-form block of _recurrence keeps w**-k below this, far from overflow.
_BLOCK_GROWTH = 50 * math.log(10)


def _recurrence(seed: float, x: FloatArray, alpha: float) -> FloatArray:
    """``y[k] = alpha * x[k] + (1 - alpha) * y[k-1]`` for each ``x[k]``, with ``y[-1] = seed``."""
    w = 1.0 - alpha
    if w == 0.0:  # a 1-period average is the series itself
        return x.copy()
    block = max(1, int(_BLOCK_GROWTH / -math.log(w)))
    out = np.empty(len(x))
    previous = seed
    for start in range(0, len(x), block):
        chunk = x[start : start + block]
        powers = w ** np.arange(1, len(chunk) + 1, dtype=np.float64)
        ys = powers * (previous + alpha * np.cumsum(chunk / powers))
        out[start : start + block] = ys
        previous = float(ys[-1])
    return out


def _smooth(x: FloatArray, n: int, alpha: float) -> FloatArray:
    """``out[i] = alpha * x[i] + (1 - alpha) * out[i-1]``, seeded with the mean of ``n`` values.

    Leading NaNs are skipped, so smoothing an indicator (MACD's signal line)
    starts where the indicator does.
    """
    out = _nan(len(x))
    first = int(np.argmin(np.isnan(x))) if len(x) else 0  # the first defined value
    seed_at = first + n - 1
    if seed_at >= len(x) or math.isnan(x[first]):
        return out
    seed = float(x[first : seed_at + 1].sum()) / n
    out[seed_at] = seed
    out[seed_at + 1 :] = _recurrence(seed, x[seed_at + 1 :], alpha)
    return out


@_quiet
def ema(values: npt.ArrayLike, n: int) -> FloatArray:
    """Exponential moving average with ``alpha = 2 / (n + 1)``, seeded with the SMA of ``n`` values.

    Args:
        values: the series; leading NaNs are skipped (the EMA starts ``n - 1``
            bars after the first defined value).
        n: the span, in bars (>= 1); ``n == 1`` returns the series itself.

    Returns:
        An array as long as ``values``, NaN before the seed.
    """
    x = _as_series("values", values)
    n = _check_period("n", n)
    return _smooth(x, n, 2.0 / (n + 1))


@_quiet
def macd(
    values: npt.ArrayLike, fast: int = 12, slow: int = 26, signal: int = 9
) -> tuple[FloatArray, FloatArray, FloatArray]:
    """MACD: ``ema(fast) - ema(slow)``, its ``signal``-bar EMA, and their difference.

    The line is defined from bar ``slow - 1``, the signal line and histogram
    from bar ``slow + signal - 2``. (TA-Lib seeds the fast EMA later so that
    both start together; its first values differ slightly, then agree.)

    Args:
        values: the series, e.g. closes.
        fast: the fast EMA's span (>= 1, < ``slow``).
        slow: the slow EMA's span.
        signal: the signal line's span (>= 1).

    Returns:
        ``(line, signal_line, histogram)``, each as long as ``values``.
    """
    x = _as_series("values", values)
    fast = _check_period("fast", fast)
    slow = _check_period("slow", slow)
    signal = _check_period("signal", signal)
    if fast >= slow:
        raise ValueError(f"fast must be < slow, got fast={fast}, slow={slow}")
    line = _smooth(x, fast, 2.0 / (fast + 1)) - _smooth(x, slow, 2.0 / (slow + 1))
    signal_line = _smooth(line, signal, 2.0 / (signal + 1))
    return line, signal_line, line - signal_line


@_quiet
def rsi(values: npt.ArrayLike, n: int = 14) -> FloatArray:
    """Wilder's relative strength index, 0 to 100.

    ``100 * avg_gain / (avg_gain + avg_loss)`` (the same as ``100 - 100 / (1 +
    RS)``), with the averages Wilder-smoothed over ``n`` bars and seeded with
    the mean of the first ``n`` changes. A window with neither gains nor
    losses (a halted symbol) gives 50, neutral: TA-Lib gives 0 there, which
    would make a flat series look oversold.

    Args:
        values: the series, e.g. closes.
        n: the period (>= 1).

    Returns:
        An array as long as ``values``; defined from bar ``n``.
    """
    x = _as_series("values", values)
    n = _check_period("n", n)
    out = _nan(len(x))
    if len(x) <= n:
        return out
    changes = np.diff(x)
    gains = _smooth(np.maximum(changes, 0.0), n, 1.0 / n)
    losses = _smooth(np.maximum(-changes, 0.0), n, 1.0 / n)
    total = gains + losses
    # gains / total first: a ratio <= 1 exactly, so the RSI never exceeds 100.
    out[1:] = np.where(total > 0, 100.0 * (gains / total), 50.0)
    out[1:][np.isnan(total)] = np.nan
    return out


@_quiet
def bollinger(
    values: npt.ArrayLike, n: int = 20, k: float = 2.0
) -> tuple[FloatArray, FloatArray, FloatArray]:
    """Bollinger bands: the ``n``-bar SMA plus and minus ``k`` standard deviations.

    The deviation is the population one (``ddof=0``), as in TA-Lib and
    Bollinger's own definition.

    Args:
        values: the series, e.g. closes.
        n: the window (>= 1).
        k: the width in standard deviations (finite, >= 0).

    Returns:
        ``(upper, middle, lower)``, each as long as ``values``; the first
        ``n - 1`` elements are NaN.
    """
    x = _as_series("values", values)
    n = _check_period("n", n)
    if isinstance(k, bool) or not isinstance(k, int | float) or not 0 <= k < math.inf:
        raise ValueError(f"k must be a finite number >= 0, got {k!r}")
    upper, middle, lower = _nan(len(x)), _nan(len(x)), _nan(len(x))
    if len(x) >= n:
        mean = _window_sums(x, n) / n
        # Two passes (deviations from each window's own mean), not E[x²] - E[x]²,
        # which cancels catastrophically for a quiet market at a high price.
        deviations = np.lib.stride_tricks.sliding_window_view(x, n) - mean[:, np.newaxis]
        width = k * np.sqrt(np.einsum("ij,ij->i", deviations, deviations) / n)
        middle[n - 1 :] = mean
        upper[n - 1 :] = mean + width
        lower[n - 1 :] = mean - width
    return upper, middle, lower


@_quiet
def true_range(high: npt.ArrayLike, low: npt.ArrayLike, close: npt.ArrayLike) -> FloatArray:
    """Wilder's true range: the bar's range, stretched to the previous close.

    ``max(high - low, |high - prev_close|, |low - prev_close|)``; bar 0,
    which has no previous close, is ``high - low``.

    Args:
        high, low, close: the bars' highs, lows and closes, of equal length.

    Returns:
        An array as long as the inputs.
    """
    h, lo, c = _as_bars(high, low, close)
    out = h - lo
    if len(c) > 1:
        previous = c[:-1]
        out[1:] = np.maximum(
            out[1:], np.maximum(np.abs(h[1:] - previous), np.abs(lo[1:] - previous))
        )
    return out


def _as_bars(
    high: npt.ArrayLike, low: npt.ArrayLike, close: npt.ArrayLike
) -> tuple[FloatArray, FloatArray, FloatArray]:
    h, lo, c = _as_series("high", high), _as_series("low", low), _as_series("close", close)
    if not len(h) == len(lo) == len(c):
        raise ValueError(
            f"high, low and close must have the same length, got {len(h)}, {len(lo)}, {len(c)}"
        )
    return h, lo, c


@_quiet
def atr(high: npt.ArrayLike, low: npt.ArrayLike, close: npt.ArrayLike, n: int = 14) -> FloatArray:
    """Average true range, Wilder-smoothed over ``n`` bars.

    Seeded at bar ``n`` with the mean of the true ranges of bars 1 to ``n``
    (bar 0 has no previous close), as TA-Lib does.

    Args:
        high, low, close: the bars' highs, lows and closes, of equal length.
        n: the period (>= 1).

    Returns:
        An array as long as the inputs; defined from bar ``n``.
    """
    n = _check_period("n", n)
    ranges = true_range(high, low, close)
    out = _nan(len(ranges))
    out[1:] = _smooth(ranges[1:], n, 1.0 / n)
    return out


@_quiet
def change_pct(values: npt.ArrayLike, n: int = 1) -> FloatArray:
    """Percent change over ``n`` bars: ``100 * (x[i] / x[i - n] - 1)``.

    Args:
        values: the series, e.g. closes.
        n: how many bars back (>= 1).

    Returns:
        An array as long as ``values``; defined from bar ``n``, NaN where the
        earlier value is 0.
    """
    x = _as_series("values", values)
    n = _check_period("n", n)
    out = _nan(len(x))
    if len(x) > n:
        before = x[:-n]
        out[n:] = np.where(before != 0, 100.0 * (x[n:] / before - 1.0), np.nan)
    return out


# -- klines ------------------------------------------------------------------------


class KlinesLike(Protocol):
    """Anything with equally long ``open``/``high``/``low``/``close``/``volume`` arrays."""

    @property
    def open(self) -> npt.ArrayLike: ...
    @property
    def high(self) -> npt.ArrayLike: ...
    @property
    def low(self) -> npt.ArrayLike: ...
    @property
    def close(self) -> npt.ArrayLike: ...
    @property
    def volume(self) -> npt.ArrayLike: ...


def _float_array(values: npt.ArrayLike) -> FloatArray:
    return np.ascontiguousarray(values, dtype=np.float64)


_FIELDS = ("open", "high", "low", "close", "volume")


@attrs.frozen(eq=False)
class Klines:
    """One symbol's candles as float64 arrays, oldest first, all of one length.

    Any object with these five attributes will do where klines are asked for
    (`KlinesLike`); this class validates them once.

    Raises:
        ValueError: an array is not 1-D, or the lengths differ.
    """

    # Arrays compare by identity (eq=False): value equality of arrays is
    # ambiguous in Python.
    open: FloatArray = attrs.field(converter=_float_array)
    high: FloatArray = attrs.field(converter=_float_array)
    low: FloatArray = attrs.field(converter=_float_array)
    close: FloatArray = attrs.field(converter=_float_array)
    volume: FloatArray = attrs.field(converter=_float_array)

    def __attrs_post_init__(self) -> None:
        for name in _FIELDS:
            _as_series(name, getattr(self, name))
        lengths = [len(getattr(self, name)) for name in _FIELDS]
        if len(set(lengths)) != 1:
            raise ValueError(f"open, high, low, close and volume differ in length: {lengths}")

    def __len__(self) -> int:
        return len(self.close)

    @classmethod
    def from_rows(cls, rows: Sequence[Sequence[object]]) -> Klines:
        """From Binance-format kline rows: ``[open_time, open, high, low, close, volume, ...]``.

        Prices arrive as decimal strings; they become float64.

        Raises:
            ValueError: a row is too short or a field is not a number.
        """
        if not rows:
            return cls(*np.empty((5, 0)))
        try:
            table = np.array([row[1:6] for row in rows], dtype=np.float64)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"kline rows must hold open, high, low, close, volume: {exc}") from exc
        if table.ndim != 2 or table.shape[1] != 5:
            raise ValueError(f"kline rows must hold open, high, low, close, volume: {rows[0]!r}")
        return cls(*table.T)


# -- the registry of names a formula may use ----------------------------------------

# An indicator family computes all of its outputs at once (MACD's three lines,
# Bollinger's three bands); latest_values computes each family once per symbol.
Family = Callable[[KlinesLike, tuple[int, ...]], tuple[FloatArray, ...]]


@attrs.frozen
class Parameter:
    """An integer parameter of an indicator name, with its default and range."""

    name: str
    default: int | None = None
    minimum: int = 1
    maximum: int = MAX_PERIOD

    def check(self, indicator: str, value: int) -> None:
        """Raise ValueError naming ``indicator`` and this parameter if ``value`` is out of range."""
        if not self.minimum <= value <= self.maximum:
            raise ValueError(
                f"{indicator} {self.name} must be between {self.minimum} and {self.maximum},"
                f" got {value}"
            )


@attrs.frozen
class IndicatorSpec:
    """What a name usable in formulas means: its parameters and how to compute it.

    Attributes:
        name: the base name, e.g. ``"sma"``, ``"macd_hist"``, ``"close"``.
        parameters: its integer parameters; one parameter may also be written
            as a suffix (``sma50``), several only as a call (``macd(5,35,5)``).
        description: one line, for documentation and error messages.
        family: computes the family's arrays from klines and parameters.
        output: which of the family's arrays this name is.
        bars: how many bars the first defined value needs, given the parameters.
        constraint: checks the parameters together (MACD's fast < slow).
    """

    name: str
    parameters: tuple[Parameter, ...]
    description: str
    family: Family = attrs.field(repr=False)
    output: int = 0
    bars: Callable[[tuple[int, ...]], int] = attrs.field(repr=False, default=lambda p: 1)
    constraint: Callable[[str, tuple[int, ...]], None] | None = attrs.field(
        repr=False, default=None
    )

    @property
    def defaults(self) -> tuple[int, ...] | None:
        """The parameters a bare name means, or None if the name needs them spelled out."""
        defaults = tuple(p.default for p in self.parameters if p.default is not None)
        return defaults if len(defaults) == len(self.parameters) else None

    @property
    def pattern(self) -> str:
        """How the name is written: ``close``, ``smaN``, ``macd`` or ``macd(fast,slow,signal)``."""
        if not self.parameters:
            return self.name
        if len(self.parameters) == 1 and self.defaults is None:
            return f"{self.name}N"
        return self.name

    def check(self, params: tuple[int, ...]) -> None:
        """Raise ValueError naming the indicator if ``params`` are not valid for it."""
        if not all(isinstance(p, int) and not isinstance(p, bool) for p in params):
            raise TypeError(f"{self.name} parameters must be ints, got {params!r}")
        if len(params) != len(self.parameters):
            names = ", ".join(p.name for p in self.parameters) or "none"
            raise ValueError(
                f"{self.name} takes {len(self.parameters)} parameter(s) ({names}),"
                f" got {len(params)}"
            )
        for parameter, value in zip(self.parameters, params, strict=True):
            parameter.check(self.name, value)
        if self.constraint is not None:
            self.constraint(self.name, params)


def _field(name: str) -> Family:
    def family(klines: KlinesLike, params: tuple[int, ...]) -> tuple[FloatArray, ...]:
        return (_as_series(name, getattr(klines, name)),)

    return family


def _on_close(fn: Callable[..., FloatArray | tuple[FloatArray, ...]]) -> Family:
    def family(klines: KlinesLike, params: tuple[int, ...]) -> tuple[FloatArray, ...]:
        result = fn(klines.close, *params)
        return result if isinstance(result, tuple) else (result,)

    return family


def _volume_sma(klines: KlinesLike, params: tuple[int, ...]) -> tuple[FloatArray, ...]:
    return (sma(klines.volume, *params),)


def _atr(klines: KlinesLike, params: tuple[int, ...]) -> tuple[FloatArray, ...]:
    return (atr(klines.high, klines.low, klines.close, *params),)


def _fast_below_slow(name: str, params: tuple[int, ...]) -> None:
    if params[0] >= params[1]:
        raise ValueError(f"{name} fast ({params[0]}) must be less than slow ({params[1]})")


def _period_plus(extra: int) -> Callable[[tuple[int, ...]], int]:
    def bars(params: tuple[int, ...]) -> int:
        return params[0] + extra

    return bars


def _macd_bars(output: int) -> Callable[[tuple[int, ...]], int]:
    def bars(params: tuple[int, ...]) -> int:
        # The line needs `slow` bars; its signal EMA then `signal - 1` more.
        _, slow, signal = params
        return slow + (signal - 1 if output else 0)

    return bars


def _specs() -> Iterable[IndicatorSpec]:
    period = (Parameter("period"),)
    for name in _FIELDS:
        yield IndicatorSpec(name, (), f"the last bar's {name}", _field(name))
    # name, what it is, family, extra bars beyond the period for the first value
    by_period: list[tuple[str, str, Family, int]] = [
        ("sma", "simple moving average of closes", _on_close(sma), 0),
        ("ema", "exponential moving average of closes, SMA-seeded", _on_close(ema), 0),
        ("rsi", "Wilder's relative strength index of closes, 0 to 100", _on_close(rsi), 1),
        ("atr", "average true range, Wilder-smoothed", _atr, 1),
        ("volume_sma", "simple moving average of volumes", _volume_sma, 0),
        ("change_pct", "percent change of the close over N bars", _on_close(change_pct), 1),
    ]
    for name, description, family, extra in by_period:
        yield IndicatorSpec(name, period, description, family, bars=_period_plus(extra))
    bands = _on_close(bollinger)
    for output, side in enumerate(["upper", "middle", "lower"]):
        yield IndicatorSpec(
            f"bb_{side}",
            period,
            f"Bollinger {side} band of closes, 2 standard deviations",
            bands,
            output,
            bars=_period_plus(0),
        )
    macd_params = (Parameter("fast", 12), Parameter("slow", 26), Parameter("signal", 9))
    macd_family = _on_close(macd)
    lines = ["MACD line, ema(fast) - ema(slow)", "MACD signal line", "MACD histogram"]
    for output, (name, description) in enumerate(
        zip(["macd", "macd_signal", "macd_hist"], lines, strict=True)
    ):
        yield IndicatorSpec(
            name,
            macd_params,
            description,
            macd_family,
            output,
            bars=_macd_bars(output),
            constraint=_fast_below_slow,
        )


#: Every name a formula may use, by base name (read-only).
INDICATORS: Mapping[str, IndicatorSpec] = MappingProxyType({s.name: s for s in _specs()})


def _int_tuple(values: Iterable[int]) -> tuple[int, ...]:
    return tuple(values)


@attrs.frozen(cache_hash=True)
class Indicator:
    """A reference to one indicator value, parameters bound: ``sma50``, ``macd``.

    This is also the leaf of a formula's expression tree. Two references to
    the same values are equal: ``macd`` and ``macd(12,26,9)`` are one
    ``Indicator("macd", (12, 26, 9))``.

    Raises:
        ValueError: the name is unknown or the parameters are invalid for it.
    """

    name: str
    params: tuple[int, ...] = attrs.field(default=(), converter=_int_tuple)
    #: The canonical spelling, and the key of its value: ``sma50``, ``macd(5,35,5)``.
    key: str = attrs.field(init=False, eq=False, repr=False)

    def __attrs_post_init__(self) -> None:
        spec = INDICATORS.get(self.name)
        if spec is None:
            raise ValueError(f"unknown indicator {self.name!r}")
        # Frozen: fields are set once, here, so that Indicator("macd") is macd(12,26,9).
        if not self.params and spec.defaults is not None:
            object.__setattr__(self, "params", spec.defaults)
        spec.check(self.params)
        if not self.params or self.params == spec.defaults:
            key = self.name
        elif len(self.params) == 1:
            key = f"{self.name}{self.params[0]}"
        else:
            key = f"{self.name}({','.join(map(str, self.params))})"
        object.__setattr__(self, "key", key)

    @property
    def spec(self) -> IndicatorSpec:
        """The registry entry for this name."""
        return INDICATORS[self.name]

    @property
    def bars_needed(self) -> int:
        """How many bars the first defined value needs (EMAs settle over several times more)."""
        return self.spec.bars(self.params)

    def series(self, klines: KlinesLike) -> FloatArray:
        """The indicator at every bar of ``klines``, NaN where not yet defined."""
        spec = self.spec
        return spec.family(klines, self.params)[spec.output]

    def __str__(self) -> str:
        return self.key


def series_values(indicators: Iterable[Indicator], klines: KlinesLike) -> dict[str, FloatArray]:
    """Each indicator at every bar of ``klines``, by ``Indicator.key``.

    Indicators of one family (``macd`` and ``macd_hist``, the three Bollinger
    bands) share one computation. Each array is as long as ``klines``, NaN
    where the indicator is not defined yet (too few bars). Arrays of one
    family, and the OHLCV fields themselves, may be views of shared or input
    memory: treat them as read-only.

    Args:
        indicators: e.g. ``Formula.indicators``.
        klines: the symbol's candles, e.g. a `Klines`.

    Returns:
        ``{indicator.key: series}``, e.g. for `Formula.evaluate_series`.

    Raises:
        ValueError: a field of ``klines`` that an indicator reads is not 1-D.
    """
    computed: dict[tuple[Family, tuple[int, ...]], tuple[FloatArray, ...]] = {}
    series: dict[str, FloatArray] = {}
    for indicator in indicators:
        spec = indicator.spec
        cache_key = (spec.family, indicator.params)
        arrays = computed.get(cache_key)
        if arrays is None:
            arrays = computed[cache_key] = spec.family(klines, indicator.params)
        series[indicator.key] = arrays[spec.output]
    return series


def latest_values(indicators: Iterable[Indicator], klines: KlinesLike) -> dict[str, float]:
    """Each indicator's value at the last bar of ``klines``, by ``Indicator.key``.

    The last element of each of `series_values`' arrays (so families share
    one computation). A value that is not defined (too few bars) is NaN; with
    no bars at all every value is NaN.

    Args:
        indicators: e.g. ``Formula.indicators``.
        klines: the symbol's candles, e.g. a `Klines`.

    Returns:
        ``{indicator.key: value}``.

    Raises:
        ValueError: a field of ``klines`` that an indicator reads is not 1-D.
    """
    return {
        key: float(values[-1]) if len(values) else math.nan
        for key, values in series_values(indicators, klines).items()
    }
