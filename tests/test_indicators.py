"""Indicators: against plain-loop references, hand-computed values, and properties."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.market.scans import (
    INDICATORS,
    Indicator,
    Klines,
    atr,
    bollinger,
    change_pct,
    ema,
    latest_values,
    macd,
    rsi,
    series_values,
    sma,
    true_range,
)

Floats = npt.NDArray[np.float64]
NAN = math.nan

# -- plain-loop references: the textbook definitions, one bar at a time -------------


def ref_sma(x: Sequence[float], n: int) -> list[float]:
    return [NAN if i < n - 1 else sum(x[i - n + 1 : i + 1]) / n for i in range(len(x))]


def ref_smooth(x: Sequence[float], n: int, alpha: float, start: int = 0) -> list[float]:
    """Seeded at ``start + n - 1`` with the mean of n values, then ``a*x + (1-a)*prev``."""
    out = [NAN] * len(x)
    if start + n - 1 >= len(x):
        return out
    previous = sum(x[start : start + n]) / n
    out[start + n - 1] = previous
    for i in range(start + n, len(x)):
        previous = alpha * x[i] + (1 - alpha) * previous
        out[i] = previous
    return out


def ref_ema(x: Sequence[float], n: int) -> list[float]:
    return ref_smooth(x, n, 2 / (n + 1))


def ref_rsi(x: Sequence[float], n: int) -> list[float]:
    """Wilder's own arithmetic: ``avg = (avg * (n - 1) + change) / n``."""
    out = [NAN] * len(x)
    if len(x) <= n:
        return out
    changes = [x[i] - x[i - 1] for i in range(1, len(x))]
    gain = sum(max(c, 0.0) for c in changes[:n]) / n
    loss = sum(max(-c, 0.0) for c in changes[:n]) / n
    for i in range(n, len(x)):
        if i > n:
            change = changes[i - 1]
            gain = (gain * (n - 1) + max(change, 0.0)) / n
            loss = (loss * (n - 1) + max(-change, 0.0)) / n
        if loss == 0:
            out[i] = 50.0 if gain == 0 else 100.0
        else:
            out[i] = 100 - 100 / (1 + gain / loss)
    return out


def ref_atr(
    high: Sequence[float], low: Sequence[float], close: Sequence[float], n: int
) -> list[float]:
    ranges = [high[0] - low[0]] + [
        max(high[i] - low[i], abs(high[i] - close[i - 1]), abs(low[i] - close[i - 1]))
        for i in range(1, len(close))
    ]
    out = [NAN] * len(close)
    if len(close) <= n:
        return out
    average = sum(ranges[1 : n + 1]) / n
    out[n] = average
    for i in range(n + 1, len(close)):
        average = (average * (n - 1) + ranges[i]) / n
        out[i] = average
    return out


def ref_bollinger(x: Sequence[float], n: int, k: float) -> tuple[list[float], ...]:
    upper, middle, lower = [NAN] * len(x), [NAN] * len(x), [NAN] * len(x)
    for i in range(n - 1, len(x)):
        window = x[i - n + 1 : i + 1]
        mean, deviation = statistics.fmean(window), statistics.pstdev(window)
        upper[i], middle[i], lower[i] = mean + k * deviation, mean, mean - k * deviation
    return upper, middle, lower


def walk(seed: int, bars: int = 300) -> tuple[Floats, Floats, Floats]:
    """A seeded random walk of closes, with highs and lows around it."""
    rng = np.random.default_rng(seed)
    close = 100 * np.exp(np.cumsum(rng.normal(0, 0.02, bars)))
    high = close * (1 + rng.uniform(0, 0.02, bars))
    low = close * (1 - rng.uniform(0, 0.02, bars))
    return high, low, close


def assert_series(actual: Floats, expected: Sequence[float], rel: float = 1e-12) -> None:
    assert len(actual) == len(expected)
    assert np.array_equal(np.isnan(actual), np.isnan(np.asarray(expected, dtype=float)))
    np.testing.assert_allclose(actual, expected, rtol=rel, atol=1e-12, equal_nan=True)


# -- against the references -----------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 5, 14, 50, 200, 299, 300, 301])
def test_sma_and_ema_match_the_loops(n: int) -> None:
    _, _, close = walk(n)
    assert_series(sma(close, n), ref_sma(close.tolist(), n))
    assert_series(ema(close, n), ref_ema(close.tolist(), n))


@pytest.mark.parametrize("n", [1, 2, 14, 30])
def test_rsi_and_atr_match_wilders_arithmetic(n: int) -> None:
    high, low, close = walk(100 + n)
    assert_series(rsi(close, n), ref_rsi(close.tolist(), n), rel=1e-10)
    assert_series(atr(high, low, close, n), ref_atr(high.tolist(), low.tolist(), close.tolist(), n))


@pytest.mark.parametrize(("n", "k"), [(1, 2.0), (20, 2.0), (20, 1.5), (50, 0.0)])
def test_bollinger_matches_statistics_pstdev(n: int, k: float) -> None:
    _, _, close = walk(7)
    for actual, expected in zip(
        bollinger(close, n, k), ref_bollinger(close.tolist(), n, k), strict=True
    ):
        assert_series(actual, expected, rel=1e-11)


def test_macd_is_the_difference_of_emas_and_its_smoothing() -> None:
    _, _, close = walk(3)
    line, signal, hist = macd(close, 12, 26, 9)
    reference_line = np.array(ref_ema(close.tolist(), 12)) - np.array(ref_ema(close.tolist(), 26))
    assert_series(line, reference_line.tolist())
    # The signal line is seeded where the line starts (bar 25), not at bar 0.
    assert_series(signal, ref_smooth(reference_line.tolist(), 9, 2 / 10, start=25))
    assert_series(hist, (reference_line - np.array(signal)).tolist())
    assert int(np.argmax(~np.isnan(signal))) == 26 + 9 - 2


def test_a_two_bar_ema_over_a_long_series_does_not_overflow() -> None:
    # The one-block closed form w**-i overflows near bar 650 when w = 1/3.
    x = 30_000 + np.cumsum(np.random.default_rng(5).normal(0, 10, 20_000))
    result = ema(x, 2)
    assert np.isfinite(result[1:]).all()
    assert_series(result, ref_ema(x.tolist(), 2), rel=1e-13)


# -- values worked out by hand --------------------------------------------------------


def test_moving_averages_by_hand() -> None:
    assert_series(sma([1, 2, 3, 4, 5], 2), [NAN, 1.5, 2.5, 3.5, 4.5])
    # Seed: mean(1, 2, 3) = 2 at bar 2; then alpha = 1/2: 4/2 + 2/2 = 3, 5/2 + 3/2 = 4.
    assert_series(ema([1, 2, 3, 4, 5], 3), [NAN, NAN, 2, 3, 4])
    assert_series(ema([1, 2, 3], 1), [1, 2, 3])


def test_ema_of_a_ramp_lags_it_by_half_the_span_and_macd_is_constant() -> None:
    # For x[i] = i, the SMA seed (n - 1) / 2 below the ramp is the EMA's steady lag.
    ramp = np.arange(100.0)
    np.testing.assert_allclose(ema(ramp, 10)[9:], ramp[9:] - 4.5, rtol=1e-12)
    line, signal, hist = macd(ramp)
    np.testing.assert_allclose(line[25:], (26 - 12) / 2, rtol=1e-12)
    np.testing.assert_allclose(signal[33:], 7.0, rtol=1e-12)
    np.testing.assert_allclose(hist[33:], 0.0, atol=1e-12)


def test_rsi_by_hand_on_a_textbook_series() -> None:
    closes = [44.34, 44.09, 44.15, 43.61, 44.33, 44.83, 45.10, 45.42, 45.84, 46.08]
    closes += [45.89, 46.03, 45.61, 46.28, 46.28, 46.00]
    result = rsi(closes, 14)
    # Changes 1..14 gain 3.34 in all and lose 1.40: RSI = 100 * 3.34 / (3.34 + 1.40).
    assert result[14] == pytest.approx(100 * 3.34 / 4.74, rel=1e-9)
    # Bar 15 loses 0.28: gain = 3.34/14 * 13/14, loss = (1.40/14 * 13 + 0.28) / 14.
    gain, loss = 3.34 / 14 * 13 / 14, (1.40 / 14 * 13 + 0.28) / 14
    assert result[15] == pytest.approx(100 * gain / (gain + loss), rel=1e-9)
    assert round(result[14], 2) == 70.46
    assert np.isnan(result[:14]).all()


def test_rsi_extremes_and_a_flat_series() -> None:
    assert rsi(np.arange(30.0), 14)[-1] == 100.0
    assert rsi(np.arange(30.0)[::-1], 14)[-1] == 0.0
    assert rsi(np.full(30, 7.0), 14)[-1] == 50.0  # no gains, no losses: neutral


def test_bollinger_and_atr_by_hand() -> None:
    upper, middle, lower = bollinger([1, 2, 3, 4], 4, 2)
    assert middle[3] == 2.5
    assert upper[3] == pytest.approx(2.5 + 2 * math.sqrt(1.25))
    assert lower[3] == pytest.approx(2.5 - 2 * math.sqrt(1.25))
    high, low, close = [10, 12, 11, 15], [9, 10, 8, 14], [9.5, 11, 10, 14.5]
    # Bar 1: max(2, |12-9.5|, |10-9.5|) = 2.5; bar 2: max(3, 1, 3) = 3; bar 3: max(1, 5, 4) = 5.
    assert true_range(high, low, close).tolist() == [1, 2.5, 3, 5]
    assert_series(atr(high, low, close, 2), [NAN, NAN, 2.75, (2.75 + 5) / 2])


def test_change_pct() -> None:
    assert_series(change_pct([100, 110, 99, 0, 5], 1), [NAN, 10.0, -10.0, -100.0, NAN])
    assert_series(change_pct([100, 110, 121], 2), [NAN, NAN, 21.0])


# -- too few bars, NaN, bad arguments -------------------------------------------------


@pytest.mark.parametrize("name", sorted(INDICATORS))
def test_each_name_is_first_defined_at_bars_needed(name: str) -> None:
    spec = INDICATORS[name]
    params = spec.defaults or tuple(7 for _ in spec.parameters)
    indicator = Indicator(name, params)
    high, low, close = walk(11, 60)
    klines = Klines(close, high, low, close, high - low)
    series = indicator.series(klines)
    assert len(series) == 60
    first = int(np.argmax(~np.isnan(series)))
    assert first == indicator.bars_needed - 1
    assert np.isfinite(series[first:]).all()
    cut = indicator.bars_needed - 1
    short = Klines(close[:cut], high[:cut], low[:cut], close[:cut], low[:cut])
    assert math.isnan(latest_values([indicator], short)[indicator.key])


def test_empty_and_short_inputs_give_nan_not_errors() -> None:
    for result in [sma([], 3), ema([1.0], 3), rsi([1.0, 2.0], 14), *macd([1.0] * 10)]:
        assert np.isnan(result).all()
    assert atr([], [], [], 14).shape == (0,)
    assert math.isnan(latest_values([Indicator("close")], Klines.from_rows([]))["close"])


def test_leading_nans_are_skipped_and_inner_nans_propagate() -> None:
    x = [NAN, NAN, 1.0, 2.0, 3.0, 4.0]
    assert_series(ema(x, 3), [NAN, NAN, NAN, NAN, 2.0, 3.0])
    y = [1.0, 2.0, 3.0, NAN, 4.0, 5.0, 6.0, 7.0]
    assert np.isnan(ema(y, 2)[3:]).all()
    assert_series(sma(y, 2), [NAN, 1.5, 2.5, NAN, NAN, 4.5, 5.5, 6.5])


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda: sma([1.0], 0), ValueError, "n must be >= 1, got 0"),
        (lambda: ema([1.0], -3), ValueError, "n must be >= 1, got -3"),
        (lambda: rsi([1.0], 2.5), TypeError, "n must be an int, got 2.5"),  # type: ignore[arg-type]
        (lambda: sma([1.0], True), TypeError, "n must be an int, got True"),
        (lambda: macd([1.0], 26, 12), ValueError, "fast must be < slow, got fast=26, slow=12"),
        (lambda: macd([1.0], signal=0), ValueError, "signal must be >= 1, got 0"),
        (lambda: bollinger([1.0], 20, -1), ValueError, "k must be a finite number >= 0, got -1"),
        (lambda: sma([[1.0, 2.0]], 1), ValueError, "values must be a 1-D array, got shape (1, 2)"),
        (lambda: atr([1.0], [1.0, 2.0], [1.0]), ValueError, "same length, got 1, 2, 1"),
        (
            lambda: Klines([1], [1], [1], [1], [1, 2]),
            ValueError,
            "differ in length: [1, 1, 1, 1, 2]",
        ),
        (lambda: Klines.from_rows([[0, "1", "2", "x", "4", "5"]]), ValueError, "kline rows"),
        (lambda: Klines.from_rows([[0, "1", "2"]] * 5), ValueError, "kline rows"),
        (lambda: Indicator("smma", (5,)), ValueError, "unknown indicator 'smma'"),
        (lambda: Indicator("sma", (0,)), ValueError, "sma period must be between 1 and 1000"),
        (lambda: Indicator("macd", (26, 12, 9)), ValueError, "fast (26) must be less than slow"),
        (lambda: Indicator("macd", (5, 35)), ValueError, "macd takes 3 parameter(s)"),
    ],
)
def test_bad_arguments_are_named(call: object, error: type[Exception], message: str) -> None:
    assert callable(call)
    with pytest.raises(error) as info:
        call()
    assert message in str(info.value)


# -- klines and the registry ------------------------------------------------------------


def test_klines_from_binance_rows() -> None:
    rows = [
        [1_700_000_000_000, "10.5", "11.0", "10.0", "10.75", "123.4", 1_700_000_059_999, "0"],
        [1_700_000_060_000, "10.75", "12.0", "10.5", "11.5", "99", 1_700_000_119_999, "0"],
    ]
    klines = Klines.from_rows(rows)
    assert len(klines) == 2
    assert klines.close.tolist() == [10.75, 11.5]
    assert klines.volume.tolist() == [123.4, 99.0]
    assert klines.high.flags.c_contiguous


def test_indicator_references_and_keys() -> None:
    assert Indicator("macd") == Indicator("macd", (12, 26, 9))
    assert Indicator("macd").key == "macd"
    assert Indicator("macd_hist", (5, 35, 5)).key == "macd_hist(5,35,5)"
    assert Indicator("sma", (50,)).key == str(Indicator("sma", [50])) == "sma50"
    assert Indicator("close").key == "close"
    assert len({Indicator("rsi", (14,)), Indicator("rsi", (14,)), Indicator("rsi", (15,))}) == 2
    assert all(spec.description for spec in INDICATORS.values())


class CountingKlines:
    """Klines that count how often each array is read."""

    def __init__(self) -> None:
        self.high, self.low, self._close = walk(1)
        self.open, self.volume = self._close, self.high - self.low
        self.reads = 0

    @property
    def close(self) -> Floats:
        self.reads += 1
        return self._close


def test_latest_values_computes_each_family_once() -> None:
    klines = CountingKlines()
    wanted = [Indicator(name) for name in ("macd", "macd_signal", "macd_hist")]
    wanted += [Indicator(f"bb_{side}", (20,)) for side in ("upper", "middle", "lower")]
    values = latest_values(wanted, klines)
    assert klines.reads == 2  # one MACD, one Bollinger computation
    line, signal, hist = macd(klines._close)
    assert values == {
        "macd": line[-1],
        "macd_signal": signal[-1],
        "macd_hist": hist[-1],
        "bb_upper20": bollinger(klines._close)[0][-1],
        "bb_middle20": sma(klines._close, 20)[-1],
        "bb_lower20": bollinger(klines._close)[2][-1],
    }


def test_series_values_computes_each_family_once_and_keeps_every_bar() -> None:
    klines = CountingKlines()
    wanted = [Indicator(name) for name in ("macd", "macd_signal", "macd_hist")]
    wanted += [Indicator(f"bb_{side}", (20,)) for side in ("upper", "middle", "lower")]
    wanted += [Indicator("rsi", (14,)), Indicator("close")]
    series = series_values(wanted, klines)
    assert klines.reads == 4  # MACD, Bollinger, RSI and the close itself
    assert set(series) == {indicator.key for indicator in wanted}
    for indicator in wanted:
        assert len(series[indicator.key]) == len(klines._close)
        np.testing.assert_array_equal(series[indicator.key], indicator.series(klines))
    # latest_values is the last bar of the same arrays.
    assert latest_values(wanted, klines) == {key: values[-1] for key, values in series.items()}


def test_series_values_of_no_bars_are_empty_arrays_and_latest_values_nan() -> None:
    empty = Klines.from_rows([])
    wanted = [Indicator("sma", (5,)), Indicator("macd_hist"), Indicator("volume")]
    series = series_values(wanted, empty)
    assert {key: len(values) for key, values in series.items()} == {
        "sma5": 0,
        "macd_hist": 0,
        "volume": 0,
    }
    assert all(math.isnan(value) for value in latest_values(wanted, empty).values())
    assert series_values([], empty) == {}


def test_series_values_refuses_a_field_that_is_not_1d() -> None:
    class Flat:
        open = high = low = volume = np.ones(3)
        close = np.ones((3, 1))

    with pytest.raises(ValueError, match="close must be a 1-D array"):
        series_values([Indicator("close")], Flat())


# -- properties --------------------------------------------------------------------------

bar_shapes = st.tuples(st.floats(1, 1e4), st.floats(0, 1), st.floats(0, 1))
prices = st.lists(st.floats(0.01, 1e6, allow_nan=False), min_size=0, max_size=80)
periods = st.integers(1, 30)


@settings(max_examples=60, deadline=None)
@given(prices, periods)
def test_rsi_is_between_0_and_100_where_defined(closes: list[float], n: int) -> None:
    result = rsi(closes, n)
    assert np.isnan(result[:n]).all()
    defined = result[n:]
    assert ((defined >= 0) & (defined <= 100)).all()


@settings(max_examples=60, deadline=None)
@given(st.floats(0.01, 1e6), st.integers(1, 60), periods)
def test_averages_of_a_constant_are_the_constant(value: float, bars: int, n: int) -> None:
    x = np.full(bars, value)
    for result in (sma(x, n), ema(x, n)):
        np.testing.assert_allclose(result[n - 1 :], value, rtol=1e-12)
    upper, _, lower = bollinger(x, n)
    np.testing.assert_allclose(upper[n - 1 :] - lower[n - 1 :], 0, atol=value * 1e-12)


@settings(max_examples=60, deadline=None)
@given(prices, periods, st.floats(0, 5))
def test_bollinger_middle_is_the_sma_and_the_bands_are_ordered(
    closes: list[float], n: int, k: float
) -> None:
    upper, middle, lower = bollinger(closes, n, k)
    assert_series(middle, sma(closes, n).tolist())
    defined = ~np.isnan(middle)
    assert (upper[defined] >= middle[defined]).all()
    assert (middle[defined] >= lower[defined]).all()


@settings(max_examples=60, deadline=None)
@given(prices, periods)
def test_ema_stays_within_the_range_of_its_inputs(closes: list[float], n: int) -> None:
    result = ema(closes, n)[n - 1 :]
    if len(closes) >= n:
        assert (result >= min(closes) * (1 - 1e-12)).all()
        assert (result <= max(closes) * (1 + 1e-12)).all()


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.tuples(st.floats(1, 1e4), st.floats(0, 1), st.floats(0, 1)), max_size=60), periods
)
def test_atr_is_non_negative_and_bounded_by_the_largest_true_range(
    bars: list[tuple[float, float, float]], n: int
) -> None:
    low = np.array([b[0] for b in bars])
    high = low * (1 + np.array([b[1] for b in bars]))
    close = low + (high - low) * np.array([b[2] for b in bars])
    result = atr(high, low, close, n)
    defined = result[~np.isnan(result)]
    assert (defined >= 0).all()
    if len(defined):
        assert defined.max() <= true_range(high, low, close)[1:].max() * (1 + 1e-12)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats() | st.sampled_from([math.inf, -math.inf, math.nan, 0.0]), max_size=40))
def test_any_floats_give_arrays_not_errors_or_warnings(x: list[float]) -> None:
    # Warnings are errors in this test suite: inf - inf, 0 / 0 and overflow must pass quietly.
    klines = Klines(x, x, x, x, x)
    for name, spec in INDICATORS.items():
        indicator = Indicator(name, (3,) if spec.defaults is None else spec.defaults)
        assert len(indicator.series(klines)) == len(x)
    assert len(latest_values([Indicator("rsi", (2,)), Indicator("atr", (2,))], klines)) == 2
