"""Fuzzing scan formulas: any text parses into a checked formula or raises FormulaError.

Formulas are drawn as arbitrary text, as soups of the grammar's tokens, and
as expressions built from the grammar (indicators, numbers huge and tiny,
operators, comparison chains, long ``and``/``or`` chains, parentheses and
unary operators nested up to and past every limit), some of them mangled
afterwards. Whatever comes in: ``parse_formula`` returns a formula that
evaluates and spells itself canonically, or raises ``FormulaError`` with a
position inside the text; never ``RecursionError`` or anything else, and
never slowly. Arguments may be parameter names: an accepted formula with
names refuses to evaluate until bound, and binds (or refuses the values
with a ``FormulaError`` in the text). An accepted formula evaluates at every
bar exactly as at each one.
"""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from services.market.scans import Formula, FormulaError, parse_formula
from services.market.scans._formula import MAX_FORMULA_DEPTH, MAX_FORMULA_LENGTH

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# CPU seconds one parse may take at most: a parse is linear in the text (at
# most MAX_FORMULA_LENGTH characters), so even the worst text takes
# milliseconds; seconds would mean a blow-up. CPU time of this thread, not
# wall time: a busy machine that leaves the test waiting for a core (0.85 s
# once, for an 11-character text) is not a slow parse.
SLOW = 1.0

NAMES = st.one_of(
    st.sampled_from(
        [
            "close",
            "open",
            "high",
            "low",
            "volume",
            "sma50",
            "ema20",
            "rsi14",
            "macd",
            "macd_hist",
            "macd_signal",
            "bb_upper20",
            "bb_lower",
            "atr14",
            "change_pct1",
            "sma",
            "rsi",
            "ema",
            "SMA50",
            "Close",
            "nan",
            "inf",
            "infinity",
            "NaN",
            "e",
            "__import__",
            "_",
            "sma0",
            "sma999999",
            "rsi00014",
            "sma" + "9" * 400,
        ]
    ),
    st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,30}", fullmatch=True),
)
NUMBERS = st.one_of(
    st.sampled_from(
        [
            "0",
            "1",
            "2.5",
            ".5",
            "5.",
            "1e3",
            "1E-3",
            "1e308",
            "1e309",
            "1e-400",
            "0e0",
            "9" * 400,
            "0" * 300 + "1",
            "1." + "0" * 300,
            "1e" + "9" * 50,
            "00.00e00",
        ]
    ),
    st.integers(0, 10**30).map(str),
    st.floats(min_value=0, allow_nan=False).map(repr),
)
PARAMETER_NAMES = st.one_of(
    st.sampled_from(["period", "fast", "slow", "N", "close", "sma5", "_", "and", "nan"]),
    st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,8}", fullmatch=True),
)
ARGUMENTS = st.lists(
    st.one_of(st.integers(0, 10**6).map(str), NUMBERS, PARAMETER_NAMES), min_size=0, max_size=4
).map(lambda args: "(" + ",".join(args) + ")")


def _binary(ops: list[str]) -> st.SearchStrategy[str]:
    return st.sampled_from(ops)


@st.composite
def expressions(draw: st.DrawFn, depth: int = 0) -> str:
    """An expression from the grammar's productions, numbers and conditions mixed at will."""
    if depth > 4 or draw(st.integers(0, 3)) == 0:
        atom = draw(st.sampled_from(["name", "number", "call"]))
        if atom == "name":
            return draw(NAMES)
        if atom == "number":
            return draw(NUMBERS)
        return draw(NAMES) + draw(ARGUMENTS)
    shape = draw(st.sampled_from(["binary", "unary", "group", "chain"]))
    if shape == "unary":
        prefix = draw(st.sampled_from(["-", "not ", "- ", "NOT "]))
        return prefix * draw(st.integers(1, 3)) + draw(expressions(depth + 1))
    if shape == "group":
        return "(" + draw(expressions(depth + 1)) + ")"
    ops = ["+", "-", "*", "/", "<", "<=", ">", ">=", "==", "!=", " and ", " or ", " AnD "]
    if shape == "chain":
        op = draw(_binary(ops))
        count = draw(st.integers(2, 60))
        return op.join([draw(expressions(depth + 1))] * count)
    return draw(expressions(depth + 1)) + draw(_binary(ops)) + draw(expressions(depth + 1))


NESTED = st.builds(
    lambda opener, closer, count, inner: opener * count + inner + closer * count,
    st.sampled_from(["(", "-", "not ", "-(", "(-", "not (", "((", "- "]),
    st.sampled_from(["", ")", " > 1", ") > 1"]),
    st.sampled_from(
        [MAX_FORMULA_DEPTH - 2, MAX_FORMULA_DEPTH, MAX_FORMULA_DEPTH + 1, 300, 499, 2000]
    ),
    st.sampled_from(["close", "close > 1", "1", "rsi14 < 30 and close > sma50"]),
)


@st.composite
def mangled(draw: st.DrawFn, text: str) -> str:
    """``text`` with a few characters inserted, deleted or replaced."""
    for _ in range(draw(st.integers(0, 3))):
        if not text:
            break
        at = draw(st.integers(0, len(text) - 1))
        change = draw(st.sampled_from(["insert", "delete", "replace"]))
        char = draw(st.sampled_from([*"()-+*/<>=!,. 0e_aZ\n\t'\"[]", "\x00", "∧", "٣"]))
        if change == "insert":
            text = text[:at] + char + text[at:]
        elif change == "delete":
            text = text[:at] + text[at + 1 :]
        else:
            text = text[:at] + char + text[at + 1 :]
    return text


FORMULAS = st.one_of(
    st.text(max_size=300),
    st.text(alphabet=st.characters(codec="ascii"), min_size=900, max_size=1100),
    expressions(),
    expressions().flatmap(mangled),
    NESTED,
    NESTED.flatmap(mangled),
    st.lists(expressions(), min_size=1, max_size=5).map(" and ".join),
)


def check(text: str) -> None:
    """``parse_formula(text)`` is a usable formula, or a FormulaError inside the text; fast."""
    began = time.thread_time()
    error: FormulaError | None = None
    try:
        formula = parse_formula(text)
    except FormulaError as exc:
        error = exc
    took = time.thread_time() - began
    assert took < SLOW, f"{took:.3f} s of CPU to parse {text[:80]!r}..."
    if error is not None:
        assert 0 <= error.position <= len(text)
        assert error.message
        assert str(error).startswith(error.message)
        assert len(str(error).splitlines()) == 3
        return
    assert formula.tree.depth <= MAX_FORMULA_DEPTH
    if formula.parameter_names:
        bound = bind(formula)
        if bound is None:
            return
        formula = bound
    values = {indicator.key: 1.0 for indicator in formula.indicators}
    assert formula.evaluate(values) in (True, False)
    assert formula.evaluate(dict.fromkeys(values, math.nan)) in (True, False)
    # The canonical spelling is a formula too, whatever was written, and the same one.
    again = parse_formula(formula.canonical())
    assert again.tree == formula.tree
    assert again.canonical() == formula.canonical()
    # At every bar as at each: bars of 1.0, NaN, 0 and -inf.
    bar_values = [1.0, math.nan, 0.0, -math.inf]
    series = {key: np.array(bar_values) for key in values}
    expected = [formula.evaluate(dict.fromkeys(values, value)) for value in bar_values]
    assert formula.evaluate_series(series, bars=len(bar_values)).tolist() == expected


def bind(formula: Formula) -> Formula | None:
    """The formula bound to 5 for each name (None if refused); unbound, it refuses to evaluate."""
    with pytest.raises(FormulaError, match="unbound parameters") as info:
        formula.evaluate({})
    assert 0 <= info.value.position <= len(formula.text)
    again = parse_formula(formula.canonical())
    assert again.tree == formula.tree
    refused: FormulaError | None = None
    try:
        bound = formula.bind(dict.fromkeys(formula.parameter_names, 5))
    except FormulaError as exc:  # macd(a,5,b) is fast == slow; a long formula grows
        refused = exc
    if refused is not None:
        assert 0 <= refused.position <= len(formula.text)
        return None
    assert not bound.parameter_names
    assert parse_formula(bound.text) == bound
    return bound


@FUZZ
@given(FORMULAS)
@example("(" * (MAX_FORMULA_LENGTH // 2 - 3) + "1" + ")" * (MAX_FORMULA_LENGTH // 2 - 3))
@example("-" * (MAX_FORMULA_LENGTH - 9) + "close > 1")
@example("not " * (MAX_FORMULA_LENGTH // 4 - 3) + "close > 1")
@example("(" * 100_000)
@example(" and ".join(["close > 1e15"] * 50))
@example("sma(n) > 1 and MACD(a, Slow, 9) > 0 or rsi(n) < 30")
@example("macd(a, 5, 9) > sma(a)")  # a = 5 is refused: fast must be below slow
def test_any_formula_parses_or_raises_a_formula_error_quickly(text: str) -> None:
    check(text)


@FUZZ
@given(st.lists(st.sampled_from(
    ["close", "sma50", "rsi(14)", "macd(5,35,5)", "1", "1e15", "1e309", ".5", "nan",
     "sma(n)", "macd(a,b,9)", "rsi(", "n", "sma",
     "(", ")", ",", "+", "-", "*", "/", "<", "<=", ">", ">=", "==", "!=", "and", "or",
     "not", " "]), max_size=400))  # fmt: skip
def test_token_soup_up_to_the_length_limit(tokens: list[str]) -> None:
    check(" ".join(tokens))


def test_deep_nesting_is_refused_by_the_limits_not_the_stack_and_fast() -> None:
    for text in [
        "(" * 499 + "close" + ")" * 499 + ">1",
        "-" * 999 + "1",
        "not " * 249 + "close>1",
        "(" * 10**6,
        "-(" * 333 + "1",
    ]:
        check(text)


def test_a_formula_too_long_once_spelled_canonically_is_refused() -> None:
    # 895 characters as written; 1e15 is 1000000000000000 once spelled in full.
    text = " and ".join(["close>1e15"] * 60)
    with pytest.raises(FormulaError, match="1735 characters long once spelled canonically") as info:
        parse_formula(text)
    assert info.value.position == 0
    # Within the limit both ways, it parses, and its spelling parses back.
    formula = parse_formula(" and ".join(["close>1e15"] * 30))
    assert parse_formula(formula.canonical()).tree == formula.tree
