"""Scan formulas: parse once, compute only what the formula reads, evaluate per symbol.

Run it: ``python docs/examples/formulas_example.py``. It scans 200 synthetic
symbols (seeded random walks of 250 daily bars) with one formula, prints the
matches with the values that made them match, then shows a formula error
as a user would see it.
"""

from __future__ import annotations

import numpy as np

from services.market.scans import FormulaError, Klines, latest_values, parse_formula


def daily_klines(seed: int, bars: int = 250) -> Klines:
    """A seeded random walk: closes, with opens, highs, lows and volumes around them."""
    rng = np.random.default_rng(seed)
    close = 100 * np.exp(np.cumsum(rng.normal(0, 0.02, bars)))
    open_ = np.concatenate([[100.0], close[:-1]])
    high = np.maximum(open_, close) * (1 + rng.uniform(0, 0.01, bars))
    low = np.minimum(open_, close) * (1 - rng.uniform(0, 0.01, bars))
    volume = rng.uniform(1e5, 1e6, bars)
    return Klines(open_, high, low, close, volume)


def main() -> None:
    formula = parse_formula("RSI14 < 60 and macd_hist > 0 and close > SMA(50)")
    print("formula:", formula)  # the canonical spelling
    print("needs:", ", ".join(sorted(indicator.key for indicator in formula.indicators)))

    matched = 0
    for seed in range(200):
        # Only the four values the formula reads are computed.
        values = latest_values(formula.indicators, daily_klines(seed))
        if formula.evaluate(values):
            matched += 1
            shown = " ".join(f"{key}={value:.2f}" for key, value in sorted(values.items()))
            print(f"match SYM{seed:03d} {shown}")
    print(f"matched {matched} of 200 symbols")

    try:
        parse_formula("rsl14 < 30 and close > sma(50)")
    except FormulaError as error:
        print("error:")
        print(error)  # the message, the formula, and a caret under the position


if __name__ == "__main__":
    main()
