"""Scan formulas: grammar, checks, errors with positions, injection, fuzzing, evaluation at
one bar and at every bar, named parameters and binding."""

from __future__ import annotations

import doctest
import math
import pickle
import subprocess
import sys
import types
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import engine
import services.market.scans as scans
from services.market.scans import (
    MAX_FORMULA_DEPTH,
    MAX_FORMULA_LENGTH,
    And,
    Arithmetic,
    Compare,
    Condition,
    Expr,
    Formula,
    FormulaError,
    Indicator,
    Negate,
    Not,
    Number,
    NumberExpr,
    Or,
    canonical,
    parse_formula,
)

ROOT = Path(__file__).resolve().parent.parent

close, sma50, rsi14 = Indicator("close"), Indicator("sma", (50,)), Indicator("rsi", (14,))
macd_hist = Indicator("macd_hist")


def lt(a: NumberExpr, b: NumberExpr) -> Compare:
    return Compare([a, b], ["<"])


def n(value: float) -> Number:
    return Number(value)


# -- the grammar ---------------------------------------------------------------------


def test_the_issue_example_parses_into_a_checked_tree() -> None:
    formula = parse_formula("rsi14 < 30 and macd_hist > 0 and close > sma50")
    assert formula.tree == And(
        [lt(rsi14, n(30)), Compare([macd_hist, n(0)], [">"]), Compare([close, sma50], [">"])]
    )
    assert formula.indicators == {rsi14, macd_hist, close, sma50}
    assert formula.text == "rsi14 < 30 and macd_hist > 0 and close > sma50"
    assert str(formula) == formula.canonical() == formula.text


@pytest.mark.parametrize(
    ("text", "tree"),
    [
        # and binds tighter than or; not tighter than and; comparisons tighter than not.
        (
            "close < 1 or close < 2 and close < 3",
            Or([lt(close, n(1)), And([lt(close, n(2)), lt(close, n(3))])]),
        ),
        ("not close < 1 and close < 2", And([Not(lt(close, n(1))), lt(close, n(2))])),
        ("not not close < 1", Not(Not(lt(close, n(1))))),
        (
            "(close < 1 or close < 2) and close < 3",
            And([Or([lt(close, n(1)), lt(close, n(2))]), lt(close, n(3))]),
        ),
        # * / bind tighter than + -; both associate to the left; unary minus binds tightest.
        ("1 + 2 * 3 < close", lt(Arithmetic("+", n(1), Arithmetic("*", n(2), n(3))), close)),
        ("1 - 2 - 3 < close", lt(Arithmetic("-", Arithmetic("-", n(1), n(2)), n(3)), close)),
        ("1 - (2 - 3) < close", lt(Arithmetic("-", n(1), Arithmetic("-", n(2), n(3))), close)),
        ("8 / 4 / 2 < close", lt(Arithmetic("/", Arithmetic("/", n(8), n(4)), n(2)), close)),
        ("-close * 2 < 1", lt(Arithmetic("*", Negate(close), n(2)), n(1))),
        ("- -close < 1", lt(Negate(Negate(close)), n(1))),
        ("(1 + 2) * 3 < close", lt(Arithmetic("*", Arithmetic("+", n(1), n(2)), n(3)), close)),
        # Comparisons chain as in Python.
        ("20 < rsi14 <= 40", Compare([n(20), rsi14, n(40)], ["<", "<="])),
        ("close >= 1", Compare([close, n(1)], [">="])),
        ("close == 1", Compare([close, n(1)], ["=="])),
        ("close != 1", Compare([close, n(1)], ["!="])),
        ("close > 1", Compare([close, n(1)], [">"])),
        # Numbers: decimals, exponents; suffix and call forms; case does not matter.
        ("close > .5e3", Compare([close, n(500)], [">"])),
        ("close > 1.25", Compare([close, n(1.25)], [">"])),
        ("SMA(50) < Close", lt(sma50, close)),
        ("sma50 < close AND Not rsi14 < 30", And([lt(sma50, close), Not(lt(rsi14, n(30)))])),
        ("macd_hist(12, 26, 9) < 0", lt(macd_hist, n(0))),
        ("((close)) < (((1)))", lt(close, n(1))),
        ("close\n<\t1", lt(close, n(1))),
    ],
)
def test_precedence_and_forms(text: str, tree: Condition) -> None:
    formula = parse_formula(text)
    assert formula.tree == tree
    # The canonical spelling parses back to the same tree.
    assert parse_formula(formula.canonical()).tree == tree


def test_canonical_spelling() -> None:
    cases = {
        "(close < 1 or open < 2) and not (close > 3)": "(close < 1 or open < 2) and not close > 3",
        "1 - (2 - 3) < CLOSE": "1 - (2 - 3) < close",
        "close > 1e20 and close > 0.000001": "close > 1e+20 and close > 1e-06",
        "macd(12,26,9) > macd_signal(5, 35, 5)": "macd > macd_signal(5,35,5)",
        "-(close + 1) < --2": "-(close + 1) < --2",
        "close < 1 and (close < 2 and close < 3)": "close < 1 and (close < 2 and close < 3)",
    }
    for text, spelled in cases.items():
        assert parse_formula(text).canonical() == spelled


def test_every_operator_evaluates() -> None:
    values = {"close": 10.0, "sma50": 4.0, "rsi14": 25.0}
    true = [
        "close + sma50 == 14", "close - sma50 == 6", "close * sma50 == 40", "close / sma50 == 2.5",
        "-close == 0 - 10", "close > sma50", "close >= 10", "sma50 < close", "sma50 <= 4",
        "close != sma50", "20 < rsi14 < 30", "not close < sma50", "close < 1 or rsi14 < 30",
        "close > 1 and rsi14 < 30",
    ]  # fmt: skip
    false = ["10 < close < 20", "close == sma50", "close < 1 and rsi14 < 30", "not rsi14 < 30"]
    for text in true:
        assert parse_formula(text).evaluate(values) is True, text
    for text in false:
        assert parse_formula(text).evaluate(values) is False, text


def test_missing_data_is_unknown_and_never_matches() -> None:
    nan = {"close": math.nan, "rsi14": 50.0}

    def holds(text: str) -> bool:
        return parse_formula(text).evaluate(nan)

    assert not holds("close > 1")
    assert not holds("close != 1")  # NaN != 1 is True in Python; here it is unknown
    assert not holds("not close > 1")  # not unknown is unknown
    assert not holds("close > 1 or rsi14 > 90")
    assert holds("close > 1 or rsi14 > 10")  # unknown or true is true
    assert holds("not (close > 1 and rsi14 > 90)")  # unknown and false is false
    assert not holds("1 < rsi14 < close")


def test_division_by_zero_is_nan_not_a_crash() -> None:
    formula = parse_formula("close / (sma50 - sma50) > 1 or not close / 0 < 1")
    assert formula.evaluate({"close": 1.0, "sma50": 3.0}) is False
    assert parse_formula("0 / 0 == 0 / 0").evaluate({}) is False


def test_a_missing_value_is_named() -> None:
    with pytest.raises(ValueError, match="no value given for indicator 'sma50'"):
        parse_formula("close > sma50").evaluate({"close": 1.0})


def test_formulas_and_errors_pickle() -> None:
    formula = parse_formula("rsi14 < 30 and macd_hist(5,35,5) > 0")
    copy = pickle.loads(pickle.dumps(formula))
    assert copy == formula
    assert copy.indicators == formula.indicators
    assert {i.key for i in copy.indicators} == {"rsi14", "macd_hist(5,35,5)"}
    with pytest.raises(FormulaError) as info:
        parse_formula("rsi14 < 30 and rsl14 > 1")
    error = pickle.loads(pickle.dumps(info.value))
    assert (error.message, error.text, error.position) == (
        info.value.message,
        info.value.text,
        15,
    )
    assert str(error) == str(info.value)


async def test_a_formula_evaluates_in_a_worker_process(pool: engine.ProcessPool) -> None:
    formula = parse_formula("rsi14 < 30 and close > sma50")
    values = {"rsi14": 25.0, "close": 11.0, "sma50": 10.0}
    assert await pool.run(Formula.evaluate, formula, values) is True
    assert await pool.run(Formula.evaluate, formula, {**values, "rsi14": 35.0}) is False


# -- errors, with positions ------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "position", "message"),
    [
        ("", 0, "formula is empty"),
        ("   ", 0, "formula is empty"),
        ("rsl14 < 30", 0, "unknown indicator 'rsl14'; did you mean rsi14?"),
        ("close > smma50", 8, "unknown indicator 'smma50'; did you mean sma50?"),
        (
            "close > macd_histogram",
            8,
            "unknown indicator 'macd_histogram'; did you mean macd_hist",
        ),
        (
            "zzz > 1",
            0,
            "unknown indicator 'zzz'; indicators are open, high, low, close, volume, smaN",
        ),
        ("rsi < 30", 0, "rsi needs a period: write e.g. rsi14 or rsi(14)"),
        ("close > sma5000", 11, "sma period must be between 1 and 1000, got 5000"),
        ("close > sma(0)", 12, "sma period must be between 1 and 1000, got 0"),
        ("close > sma(2.5)", 12, "sma parameters are whole numbers from 1 to 1000, got 2.5"),
        ("close > sma()", 11, "sma takes 1 parameters (period), got 0"),
        ("macd(5,35) > 0", 4, "macd takes 3 parameters (fast, slow, signal), got 2"),
        ("macd(26,12,9) > 0", 5, "macd fast (26) must be less than slow (12)"),
        ("close(1) > 0", 5, "close takes no parameters, got 1"),
        ("sma50(20) > 1", 5, "sma50 already has its period: write sma50 or sma(50)"),
        ("close + 1", 0, "a formula must be a condition, but close + 1 is a number; compare it"),
        ("rsi14 < 30 and close", 15, "'and' takes conditions, but close is a number"),
        ("close > 1 or 2", 13, "'or' takes conditions, but 2 is a number"),
        ("not close", 4, "'not' takes conditions, but close is a number"),
        ("(close > 1) < 3", 0, "'<' takes numbers, but close > 1 is a condition"),
        ("1 + (close > 1) < 3", 4, "'+' takes numbers, but close > 1 is a condition"),
        ("-(close > 1) < 3", 1, "'-' takes numbers, but close > 1 is a condition"),
        ("close >", 7, "the formula ends early: expected a number, an indicator, '(' or '-'"),
        ("(close > 1", 10, "the formula ends early: expected ')'"),
        ("close > 1)", 9, "unmatched ')'"),
        ("close > 1 2", 10, "unexpected '2': expected an operator"),
        ("close close", 6, "unexpected 'close': expected an operator"),
        ("close > sma(,5)", 12, "unexpected ',': expected a whole number, a parameter name or ')'"),
        ("close = 1", 6, "unexpected character '=': compare with =="),
        ("close > 1 && close < 2", 10, "unexpected character '&': write 'and'"),
        ("close ** 2 > 1", 7, "unexpected '*': expected a number"),
        ("close > 1e999", 8, "number 1e999 is too large"),
        ("close > 1 % 2", 10, "unexpected character '%'"),
        ("close > 1 ∧ 2", 10, "unexpected character '∧'"),
        ("close > ٣", 8, "unexpected character '٣'"),  # only ASCII digits are digits
    ],
)
def test_errors_point_at_the_offending_position(text: str, position: int, message: str) -> None:
    with pytest.raises(FormulaError) as info:
        parse_formula(text)
    error = info.value
    assert error.message.startswith(message)
    assert (error.text, error.position) == (text, position)
    assert isinstance(error, ValueError)


def test_the_error_shows_a_caret_under_the_position() -> None:
    with pytest.raises(FormulaError) as info:
        parse_formula("rsi14 < 30 and\nclose > smma50")
    assert str(info.value) == (
        "unknown indicator 'smma50'; did you mean sma50?\n"
        "  rsi14 < 30 and close > smma50\n"
        "                         ^"
    )


def test_a_long_formula_shows_a_window_around_the_position() -> None:
    text = " and ".join(["close > 1"] * 40) + " and clsoe > 1"
    with pytest.raises(FormulaError) as info:
        parse_formula(text)
    _, shown, caret = str(info.value).splitlines()
    assert shown.startswith("  ...")
    assert len(shown) < 90
    assert shown[caret.index("^") :].startswith("clsoe")


def test_limits_on_length_and_depth() -> None:
    longest = "close > " + "0" * (MAX_FORMULA_LENGTH - 8)
    assert parse_formula(longest).text == longest
    with pytest.raises(FormulaError, match="1001 characters long; the limit is 1000"):
        parse_formula(longest + "0")
    # Unary minus nests one level per character: the depth limit, not the stack, stops it.
    deep_enough = "-" * (MAX_FORMULA_DEPTH - 2) + "close < 1"
    assert parse_formula(deep_enough).tree.depth == MAX_FORMULA_DEPTH
    with pytest.raises(FormulaError, match="nests more than 100 levels deep") as info:
        parse_formula("-" + deep_enough)
    assert info.value.position == 0  # the comparison that went over the limit
    with pytest.raises(FormulaError, match="nests more than 100 levels"):
        parse_formula(" + ".join(["close"] * 101) + " > 1")
    # Parentheses build no nodes: nested 400 deep within the length limit, still depth 2.
    assert parse_formula("(" * 400 + "close" + ")" * 400 + " > 1").tree.depth == 2


def test_hand_built_trees_are_checked_too() -> None:
    with pytest.raises(TypeError, match="'and' takes conditions, got the number close"):
        And([lt(close, n(1)), close])  # type: ignore[list-item]
    with pytest.raises(TypeError, match="a comparison takes numbers"):
        Compare([lt(close, n(1)), n(1)], ["<"])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="n \\+ 1 operands"):
        Compare([close], [])
    with pytest.raises(ValueError, match="must be finite and >= 0"):
        Number(-1)
    with pytest.raises(ValueError, match="'or' needs at least two"):
        Or([lt(close, n(1))])
    with pytest.raises(TypeError, match="root must be a condition"):
        Formula("close", close)  # type: ignore[arg-type]


# -- injection ---------------------------------------------------------------------------

INJECTIONS = [
    "__import__('os').system('x')",
    "__import__ < 1",
    "__import__(1) > 0",
    "close.__class__",
    "close.__class__ > 1",
    "().__class__.__bases__",
    "open('/etc/passwd')",
    "open(1) > 0",
    "open > 0 and exec(1) > 0",
    'eval("1")',
    "eval(1) > 0",
    "lambda: 1",
    "(lambda x: x)(1) > 0",
    "close[0] > 1",
    "[close] > 1",
    "{} > 1",
    "'close' > 1",
    "b'x' > 1",
    "f'{close}' > 1",
    "close > 1; import os",
    "close > 1\nimport os",
    "close if close else 1 > 0",
    "close > 1 # comment",
    "close @ close > 1",
    "globals() > 0",
    "close > 1 and __builtins__ > 0",
    "sma(50, x=1) > 0",
    "sma(*[50]) > 0",
    "sma(0x32) > 0",
    "close > 0x10",
    "close > 1_000",
    "close > 1j",
    "`close` > 1",
    "$close > 1",
    "close > 1\x00",
    "x" * 5000,
    "(" * 10_000 + "close" + ")" * 10_000 + " > 1",
    "-" * 10_000 + "close > 1",
    "not " * 2_000 + "close > 1",
]


@pytest.mark.parametrize("text", INJECTIONS)
def test_injection_attempts_are_rejected(text: str) -> None:
    with pytest.raises(FormulaError) as info:
        parse_formula(text)
    assert 0 <= info.value.position <= len(text)


def test_the_parser_never_calls_or_evaluates_python(monkeypatch: pytest.MonkeyPatch) -> None:
    # If anything reached Python's evaluator, these would be called.
    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("eval/exec/compile called")

    for name in ("eval", "exec", "compile", "__import__"):
        monkeypatch.setattr(f"builtins.{name}", forbidden)
    formula = parse_formula("rsi14 < 30 and close > sma50 and volume > 1e6")
    assert formula.evaluate({"rsi14": 1.0, "close": 2.0, "sma50": 1.0, "volume": 2e6}) is True


# -- fuzzing -------------------------------------------------------------------------------

TOKENS = [
    "close", "sma50", "rsi14", "macd", "macd_hist", "bb_upper20", "sma", "rsi", "foo", "open",
    "(", ")", ",", "+", "-", "*", "/", "<", "<=", ">", ">=", "==", "!=", "=", "!", "and", "or",
    "not", "AND", "0", "1", "2.5", "1e3", "1e999", ".5", "50", "0x1", "'", '"', ".", "[", "]",
    "__import__", "__class__", "lambda", ":", ";", " ", "\n", "\t", "∧", "٣",
]  # fmt: skip


def assert_only_formula_errors(text: str) -> None:
    try:
        formula = parse_formula(text)
    except FormulaError as exc:
        error = exc
    else:
        # Whatever parses is a checked condition that evaluates.
        assert parse_formula(formula.canonical()).tree == formula.tree
        formula.evaluate(dict.fromkeys((i.key for i in formula.indicators), 1.0))
        return
    assert 0 <= error.position <= len(text)
    assert error.message
    assert str(error).startswith(error.message)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=120))
def test_arbitrary_text_raises_only_formula_errors(text: str) -> None:
    assert_only_formula_errors(text)


@settings(max_examples=400, deadline=None)
@given(st.lists(st.sampled_from(TOKENS), max_size=30), st.sampled_from(["", " "]))
def test_token_soup_raises_only_formula_errors(tokens: list[str], separator: str) -> None:
    assert_only_formula_errors(separator.join(tokens))


# -- generated trees: canonical round trip, and evaluation against a reference -------------

INDICATORS = [
    close,
    sma50,
    rsi14,
    macd_hist,
    Indicator("bb_lower", (20,)),
    Indicator("macd", (5, 35, 5)),
]
KEYS = [indicator.key for indicator in INDICATORS]

numbers: st.SearchStrategy[NumberExpr] = st.recursive(
    st.one_of(
        st.builds(Number, st.floats(0, 1e20, allow_nan=False) | st.integers(0, 10**6)),
        st.sampled_from(INDICATORS),
    ),
    lambda inner: st.one_of(
        st.builds(Negate, inner),
        st.builds(Arithmetic, st.sampled_from(["+", "-", "*", "/"]), inner, inner),
    ),
    max_leaves=6,
)


@st.composite
def comparisons(draw: st.DrawFn) -> Compare:
    ops = draw(
        st.lists(st.sampled_from(["<", "<=", ">", ">=", "==", "!="]), min_size=1, max_size=2)
    )
    return Compare([draw(numbers) for _ in range(len(ops) + 1)], ops)


conditions: st.SearchStrategy[Condition] = st.recursive(
    comparisons(),
    lambda inner: st.one_of(
        st.builds(Not, inner),
        st.builds(And, st.lists(inner, min_size=2, max_size=3)),
        st.builds(Or, st.lists(inner, min_size=2, max_size=3)),
    ),
    max_leaves=5,
)

# Values that exercise NaN, infinities, zeros and signs.
values = st.fixed_dictionaries(
    dict.fromkeys(
        KEYS, st.sampled_from([math.nan, math.inf, -math.inf, 0.0, -0.0, 1.0, -2.5]) | st.floats()
    )
)


def reference_number(node: Expr, values: Mapping[str, float]) -> float:
    if isinstance(node, Number):
        return node.value
    if isinstance(node, Indicator):
        return values[node.key]
    if isinstance(node, Negate):
        return -reference_number(node.operand, values)
    assert isinstance(node, Arithmetic)
    a, b = reference_number(node.left, values), reference_number(node.right, values)
    if node.op == "/":
        return math.nan if b == 0 else a / b
    return {"+": a + b, "-": a - b, "*": a * b}[node.op]


def reference_truth(node: Expr, values: Mapping[str, float]) -> float:
    """Kleene logic on numbers: false 0, unknown 0.5, true 1; and = min, or = max, not = 1 - x."""
    if isinstance(node, Not):
        return 1 - reference_truth(node.operand, values)
    if isinstance(node, And):
        return min(reference_truth(operand, values) for operand in node.operands)
    if isinstance(node, Or):
        return max(reference_truth(operand, values) for operand in node.operands)
    assert isinstance(node, Compare)
    numbers = [reference_number(operand, values) for operand in node.operands]
    if any(math.isnan(number) for number in numbers):
        return 0.5
    python = " ".join(f"v{i} {op}" for i, op in enumerate(node.ops)) + f" v{len(node.ops)}"
    # The reference may use Python's evaluator on text it wrote itself.
    truth = eval(python, {}, {f"v{i}": v for i, v in enumerate(numbers)})
    return 1.0 if truth else 0.0


@settings(max_examples=150, deadline=None)
@given(conditions, values)
def test_generated_trees_round_trip_and_evaluate_like_the_reference(
    tree: Condition, values: dict[str, float]
) -> None:
    text = canonical(tree)
    assume(len(text) <= MAX_FORMULA_LENGTH)
    formula = parse_formula(text)
    assert formula.tree == tree
    assert formula.canonical() == text
    assert formula.evaluate(values) is (reference_truth(tree, values) == 1.0)
    assert pickle.loads(pickle.dumps(formula)) == formula


# -- surface and docs ------------------------------------------------------------------------


def test_public_surface_is_exactly_all_and_documented() -> None:
    public = {
        name
        for name, value in vars(scans).items()
        if not name.startswith("_")
        and not isinstance(value, types.ModuleType)
        and name != "annotations"
    }
    assert public == set(scans.__all__)
    assert len(scans.__all__) == len(public)  # no duplicates; ruff (RUF022) keeps the order
    documented = (value for name in scans.__all__ if callable(value := getattr(scans, name)))
    assert all(value.__doc__ for value in documented)


@pytest.mark.subprocess
def test_the_formulas_page_example_runs() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "docs" / "examples" / "formulas_example.py")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "formula: rsi14 < 60 and macd_hist > 0 and close > sma50"
    assert lines[1] == "needs: close, macd_hist, rsi14, sma50"
    matched = [line for line in lines if line.startswith("match ")]
    assert f"matched {len(matched)} of 200 symbols" in lines
    assert 0 < len(matched) < 200
    for line in matched:  # each match satisfies the formula by its printed (rounded) values
        fields = {key: float(value) for key, value in (f.split("=") for f in line.split()[2:])}
        assert fields["rsi14"] <= 60
        assert fields["macd_hist"] >= 0
        assert fields["close"] >= fields["sma50"]
    error_at = lines.index("error:")
    assert lines[error_at + 1 : error_at + 4] == [
        "unknown indicator 'rsl14'; did you mean rsi14?",
        "  rsl14 < 30 and close > sma(50)",
        "  ^",
    ]


# -- over every bar ------------------------------------------------------------------------

# Series values that exercise NaN, infinities, zeros and signs, bar by bar.
SPECIAL = st.sampled_from([math.nan, math.inf, -math.inf, 0.0, -0.0, 1.0, -2.5, 1e308])
series = st.integers(0, 12).flatmap(
    lambda bars: st.fixed_dictionaries(
        dict.fromkeys(KEYS, st.lists(SPECIAL | st.floats(), min_size=bars, max_size=bars))
    )
)


@settings(max_examples=300, deadline=None)
@given(conditions, series)
def test_evaluate_series_is_evaluate_at_every_bar(
    tree: Condition, values: dict[str, list[float]]
) -> None:
    formula = Formula(canonical(tree), tree)
    bars = len(values[KEYS[0]])
    arrays = {key: np.array(column, dtype=np.float64) for key, column in values.items()}
    result = formula.evaluate_series(arrays)
    assert result.dtype == np.bool_
    assert result.shape == (bars,)
    for i in range(bars):
        at_bar = {key: column[i] for key, column in values.items()}
        assert bool(result[i]) is formula.evaluate(at_bar), (i, at_bar)


def test_evaluate_series_follows_the_three_valued_table() -> None:
    nan = math.nan
    # Bars: close unknown, close true, close false; rsi14 is 50 throughout.
    values = {"close": np.array([nan, 2.0, 0.0]), "rsi14": np.full(3, 50.0)}

    def holds(text: str) -> list[bool]:
        result: list[bool] = parse_formula(text).evaluate_series(values).tolist()
        return result

    assert holds("close > 1") == [False, True, False]
    assert holds("close != 1") == [False, True, True]  # NaN != 1 is unknown, not true
    assert holds("not close > 1") == [False, False, True]  # not unknown is unknown
    assert holds("close > 1 and rsi14 > 90") == [False, False, False]
    assert holds("not (close > 1 and rsi14 > 90)") == [True, True, True]  # unknown and false
    assert holds("close > 1 or rsi14 > 10") == [True, True, True]  # unknown or true
    assert holds("not (close > 1 or rsi14 > 90)") == [False, False, True]
    assert holds("1 < close < rsi14") == [False, True, False]
    assert holds("close / (rsi14 - rsi14) > 1 or not close / 0 < 1") == [False] * 3


def test_evaluate_series_of_no_bars_and_of_constants() -> None:
    formula = parse_formula("rsi14 < 30 and close > sma50")
    empty: dict[str, npt.ArrayLike] = {"rsi14": [], "close": np.array([]), "sma50": ()}
    assert formula.evaluate_series(empty).shape == (0,)
    constant = parse_formula("1 < 2 and not 0 / 1 == 1")
    assert constant.evaluate_series({"close": [1.0, 2.0]}).tolist() == [True, True]
    assert constant.evaluate_series({}, bars=3).tolist() == [True] * 3
    assert constant.evaluate_series({}, bars=0).shape == (0,)
    with pytest.raises(ValueError, match="pass bars="):
        constant.evaluate_series({})
    # The result is its own array, free to change.
    result = constant.evaluate_series({}, bars=2)
    result[0] = False
    assert constant.evaluate_series({}, bars=2).tolist() == [True, True]


def test_evaluate_series_refuses_missing_ragged_or_2d_series() -> None:
    formula = parse_formula("close > sma50")
    with pytest.raises(ValueError, match="no series given for indicator 'sma50'"):
        formula.evaluate_series({"close": [1.0]})
    with pytest.raises(ValueError, match="differ in length"):
        formula.evaluate_series({"close": [1.0], "sma50": [1.0, 2.0]})
    with pytest.raises(ValueError, match="differ in length"):
        formula.evaluate_series({"close": [1.0], "sma50": [1.0]}, bars=2)
    with pytest.raises(ValueError, match="sma50 must be a 1-D array"):
        formula.evaluate_series({"close": [1.0], "sma50": [[1.0]]})


def test_evaluate_series_over_klines_ends_with_the_latest_bar() -> None:
    rng = np.random.default_rng(7)
    closes = 100 + np.cumsum(rng.normal(0, 2, 300))
    klines = scans.Klines(closes, closes + 1, closes - 1, closes, np.ones(300))
    formula = parse_formula("rsi14 < 45 and close > sma20 or macd_hist > 0")
    matches = formula.evaluate_series(scans.series_values(formula.indicators, klines))
    assert 0 < matches.sum() < 300
    assert not matches[:20].any()  # sma20 and the MACD are not defined yet
    for end in (1, 50, 150, 300):
        latest = scans.latest_values(formula.indicators, _head(klines, end))
        assert bool(matches[end - 1]) is formula.evaluate(latest)


def _head(klines: scans.Klines, bars: int) -> scans.Klines:
    return scans.Klines(
        klines.open[:bars], klines.high[:bars], klines.low[:bars], klines.close[:bars],
        klines.volume[:bars],
    )  # fmt: skip


# -- parameters ----------------------------------------------------------------------------


UNBOUND = {
    scans.UnboundIndicator("sma", ["n"]): ("sma(n)", "sma(5)"),
    scans.UnboundIndicator("rsi", ["period"]): ("rsi(period)", "rsi(14)"),
    scans.UnboundIndicator("macd_hist", ["fast", "slow", 9]): (
        "macd_hist(fast,slow,9)",
        "macd_hist(3,8,9)",
    ),
    scans.UnboundIndicator("bb_lower", ["n"]): ("bb_lower(n)", "bb_lower(5)"),
}
VALUES = {"n": 5, "period": 14, "fast": 3, "slow": 8}
unbound_numbers: st.SearchStrategy[NumberExpr] = st.recursive(
    st.one_of(
        st.sampled_from(list(UNBOUND)),
        st.sampled_from(INDICATORS),
        st.builds(Number, st.integers(0, 99)),
    ),
    lambda inner: st.one_of(
        st.builds(Negate, inner), st.builds(Arithmetic, st.sampled_from(["+", "/"]), inner, inner)
    ),
    max_leaves=4,
)
unbound_conditions: st.SearchStrategy[Condition] = st.recursive(
    st.builds(lambda a, b: Compare([a, b], ["<"]), unbound_numbers, unbound_numbers),
    lambda inner: st.one_of(
        st.builds(Not, inner), st.builds(And, st.lists(inner, min_size=2, max_size=3))
    ),
    max_leaves=4,
)


@settings(max_examples=100, deadline=None)
@given(unbound_conditions)
def test_unbound_trees_round_trip_and_bind_like_numbers_written_in(tree: Condition) -> None:
    text = canonical(tree)
    formula = parse_formula(text)
    assert formula.tree == tree
    assert pickle.loads(pickle.dumps(formula)) == formula
    written_in = text
    for spelled, bound_spelling in UNBOUND.values():
        written_in = written_in.replace(spelled, bound_spelling)
    names = formula.parameter_names
    assert names <= set(VALUES)
    assert bool(names) == (written_in != text)
    bound = formula.bind({name: VALUES[name] for name in names})
    assert bound.text == written_in
    assert bound == parse_formula(written_in)


def test_names_stand_where_integer_parameters_may() -> None:
    formula = parse_formula("RSI(Period) < 30 and close > sma(slow) and macd(fast, slow, 9) > 0")
    assert formula.parameter_names == frozenset({"period", "slow", "fast"})
    assert formula.canonical() == (
        "rsi(period) < 30 and close > sma(slow) and macd(fast,slow,9) > 0"
    )
    assert parse_formula(formula.canonical()).tree == formula.tree
    leaf = formula.tree.operands[0].operands[0]  # type: ignore[union-attr]
    assert leaf == scans.UnboundIndicator("rsi", ["period"])
    assert leaf.positions == (4,)
    assert parse_formula("close > sma50").parameter_names == frozenset()


def test_bind_gives_the_formula_with_the_numbers_written_in() -> None:
    formula = parse_formula("RSI(Period) < 30 and close > sma(slow) and macd(fast, slow, 9) > 0")
    bound = formula.bind({"period": 14, "slow": 50, "fast": np.int64(12)})
    literal = parse_formula("RSI(14) < 30 and close > sma(50) and macd(12, 50, 9) > 0")
    assert bound == literal  # the same text, written as the user did, and the same tree
    assert bound.text == "RSI(14) < 30 and close > sma(50) and macd(12, 50, 9) > 0"
    assert bound.parameter_names == frozenset()
    assert {i.key for i in bound.indicators} == {"rsi14", "close", "sma50", "macd(12,50,9)"}
    assert bound.bind({}) is bound
    # The unbound formula is unchanged and binds again, to other values.
    assert formula.bind({"period": 2, "slow": 3, "fast": 1}).canonical() == (
        "rsi2 < 30 and close > sma3 and macd(1,3,9) > 0"
    )


def test_a_hand_built_unbound_tree_binds_to_its_canonical_spelling() -> None:
    tree = lt(scans.UnboundIndicator("sma", ["n"]), n(1))
    formula = Formula("whatever was typed", tree)
    assert formula.parameter_names == {"n"}
    bound = formula.bind({"n": 5})
    assert bound.text == "sma5 < 1"
    assert bound.tree == lt(Indicator("sma", (5,)), n(1))
    with pytest.raises(FormulaError) as info:
        formula.bind({"n": 0})
    assert info.value.position == 0  # nowhere to point in a text the tree did not come from


@pytest.mark.parametrize(
    ("parameters", "position", "message"),
    [
        ({"period": 14}, 25, "no value for parameter(s) 'fast', 'slow'"),
        ({"fast": 5, "slow": 35}, 4, "no value for parameter(s) 'period'"),
        (
            {"period": 14, "fast": 5, "slow": 35, "perod": 14},
            0,
            "unknown parameter(s) 'perod': the formula's parameters are fast, period, slow",
        ),
        ({"period": True, "fast": 5, "slow": 35}, 4, "parameter 'period' must be an int, got True"),
        ({"period": 14.0, "fast": 5, "slow": 35}, 4, "parameter 'period' must be an int, got 14.0"),
        ({"period": "14", "fast": 5, "slow": 35}, 4, "parameter 'period' must be an int, got '14'"),
        ({"period": 0, "fast": 5, "slow": 35}, 4, "rsi period must be between 1 and 1000, got 0"),
        ({"period": 14, "fast": 5, "slow": 1001}, 25, "sma period must be between 1 and 1000"),
        ({"period": 14, "fast": 35, "slow": 5}, 48, "macd fast (35) must be less than slow (5)"),
    ],
)
def test_bind_refuses_with_the_position_of_the_name(
    parameters: dict[str, object], position: int, message: str
) -> None:
    text = "rsi(period) < 30 and sma(slow) < close and macd(fast,slow,9) > 0"
    with pytest.raises(FormulaError) as info:
        parse_formula(text).bind(parameters)
    assert info.value.message.startswith(message)
    assert info.value.position == position
    assert info.value.text == text


def test_the_same_checks_and_messages_as_a_number_written_in() -> None:
    for value in (0, 1001):
        with pytest.raises(FormulaError) as literal:
            parse_formula(f"close > sma({value})")
        with pytest.raises(FormulaError) as named:
            parse_formula("close > sma(n)").bind({"n": value})
        assert named.value.message == literal.value.message
        assert named.value.position == literal.value.position == 12


def test_a_formula_without_parameters_refuses_any() -> None:
    with pytest.raises(FormulaError, match=r"unknown parameter\(s\) 'n': .* are none"):
        parse_formula("close > sma50").bind({"n": 1})
    with pytest.raises(TypeError, match="a mapping"):
        parse_formula("close > sma(n)").bind([("n", 1)])  # type: ignore[arg-type]


def test_an_unbound_formula_says_which_parameters_to_bind() -> None:
    formula = parse_formula("close > sma(slow) and rsi(period) < 30")
    calls: list[Callable[[], object]] = [
        lambda: formula.indicators,
        lambda: formula.evaluate({"close": 1.0}),
        lambda: formula.evaluate_series({"close": [1.0]}),
    ]
    for call in calls:
        with pytest.raises(FormulaError) as info:
            call()
        assert info.value.message.startswith("the formula has unbound parameters (period, slow)")
        assert info.value.position == 12  # slow, the first name in the text


@pytest.mark.parametrize(
    ("text", "position", "message"),
    [
        ("sma(close) > 1", 4, "close is an indicator, not a parameter name"),
        ("sma(rsi14) > 1", 4, "rsi14 is an indicator, not a parameter name"),
        ("sma(p, q) > 1", 3, "sma takes 1 parameters (period), got 2"),
        ("macd(a, 0, 9) > 1", 8, "macd slow must be between 1 and 1000, got 0"),
        ("macd(a, 2.5, 9) > 1", 8, "macd parameters are whole numbers from 1 to 1000, got 2.5"),
        ("sma50(p) > 1", 5, "sma50 already has its period"),
        ("close(p) > 1", 5, "close takes no parameters, got 1"),
        ("sma(p > 1", 6, "unexpected '>': expected ')' or ','"),
        ("sma(-p) > 1", 4, "unexpected '-': expected a whole number, a parameter name or ')'"),
        ("sma(p", 5, "the formula ends early: expected ')' or ','"),
        ("sma(p) + 1", 0, "a formula must be a condition, but sma(p) + 1 is a number"),
    ],
)
def test_names_in_the_wrong_place_are_errors_with_positions(
    text: str, position: int, message: str
) -> None:
    with pytest.raises(FormulaError) as info:
        parse_formula(text)
    assert info.value.message.startswith(message)
    assert info.value.position == position


def test_hand_built_unbound_indicators_are_checked() -> None:
    with pytest.raises(ValueError, match="unknown indicator 'smaa'"):
        scans.UnboundIndicator("smaa", ["n"])
    with pytest.raises(ValueError, match="takes 1 parameter"):
        scans.UnboundIndicator("sma", ["n", "m"])
    with pytest.raises(ValueError, match="names no parameter: use Indicator"):
        scans.UnboundIndicator("sma", [5])
    with pytest.raises(ValueError, match="lower-case identifier, got 'N'"):
        scans.UnboundIndicator("sma", ["N"])
    with pytest.raises(ValueError, match="close is an indicator"):
        scans.UnboundIndicator("sma", ["close"])
    with pytest.raises(ValueError, match="macd slow must be between 1 and 1000, got 0"):
        scans.UnboundIndicator("macd", ["a", 0, 9])
    with pytest.raises(TypeError, match="ints or names, got True"):
        scans.UnboundIndicator("macd", ["a", True, 9])


def test_bound_and_unbound_formulas_pickle_and_bind_in_a_copy() -> None:
    formula = parse_formula("rsi(period) < 30 and close > sma(slow)")
    copy = pickle.loads(pickle.dumps(formula))
    assert copy == formula
    assert copy.parameter_names == formula.parameter_names
    assert copy.tree.operands[0].operands[0].positions == (4,)
    bound = copy.bind({"period": 14, "slow": 50})
    assert (
        pickle.loads(pickle.dumps(bound))
        == bound
        == parse_formula("rsi(14) < 30 and close > sma(50)")
    )


async def test_a_bound_formula_evaluates_in_a_worker_process(pool: engine.ProcessPool) -> None:
    formula = parse_formula("rsi(period) < 30 and close > sma(slow)")
    bound = await pool.run(Formula.bind, formula, {"period": 14, "slow": 50})
    values = {"rsi14": 25.0, "close": 11.0, "sma50": 10.0}
    assert await pool.run(Formula.evaluate, bound, values) is True


def test_binding_keeps_the_length_and_depth_limits() -> None:
    # 20 names of 1 character become 4 digits each: 1,000 characters as written is the limit.
    one = "sma(a) > 1 and "
    text = (one * 66).removesuffix(" and ")
    assert len(text) <= MAX_FORMULA_LENGTH
    formula = parse_formula(text)
    with pytest.raises(FormulaError, match="characters long once bound; the limit is 1000"):
        formula.bind({"a": 1000})
    assert len(formula.bind({"a": 9}).text) == len(text)
    # A name is a leaf: depth is that of the same formula with a number.
    deep = "-" * (MAX_FORMULA_DEPTH - 2) + "sma(a) > 1"  # exactly as deep as allowed
    assert parse_formula(deep).tree.depth == parse_formula(deep.replace("(a)", "5")).tree.depth
    with pytest.raises(FormulaError, match="nests more than"):
        parse_formula("-" + deep)


# -- the formulas page ---------------------------------------------------------------------


def _section(page: str, heading: str) -> str:
    start = page.index(f"\n## {heading}\n")
    end = page.find("\n## ", start + 1)
    return page[start : end if end >= 0 else len(page)]


@pytest.mark.parametrize("heading", ["Over every bar", "Parameters"])
def test_the_formulas_page_sections_run_as_shown(heading: str) -> None:
    page = (ROOT / "docs" / "formulas.md").read_text()
    blocks = _section(page, heading).split("```pycon\n")[1:]
    assert blocks, f"no pycon examples under {heading!r}"
    namespace: dict[str, object] = {}
    for number, block in enumerate(blocks):
        example = block.split("```")[0]
        test = doctest.DocTestParser().get_doctest(
            example, namespace, f"formulas.md {heading} #{number}", "docs/formulas.md", 0
        )
        runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
        output: list[str] = []
        runner.run(test, out=output.append, clear_globs=False)
        assert runner.failures == 0, "".join(output)
        namespace = test.globs
