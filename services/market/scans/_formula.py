"""Scan formulas: ``rsi14 < 30 and macd_hist > 0``, parsed into a checked tree, never eval-ed.

A formula is text from a user. It is parsed by a Lark LALR grammar that
knows numbers, indicator names, ``+ - * /``, comparisons and ``and``/``or``/
``not``, nothing else: no strings, attributes, subscripts or calls other than
an indicator's integer parameters (or names of formula parameters, bound
later: ``rsi(period) < 30``). The result is a tree of frozen values whose
every node is type-checked (arithmetic on numbers, ``and`` on conditions) as
it is built, so a formula that parses also evaluates.

Missing data is *unknown*, as in SQL: a comparison with a NaN operand is
unknown, ``not`` of unknown is unknown, ``unknown and false`` is false,
``unknown or true`` is true, and a formula that ends unknown does not match.
So ``not rsi14 > 70`` does not match a symbol whose RSI is not defined yet.
`Formula.evaluate` applies this at one bar, `Formula.evaluate_series` at every
bar at once, with numpy, and exactly the same results.
"""

from __future__ import annotations

import difflib
import functools
import math
import operator
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, ClassVar, Final, TypeAlias

import attrs
import lark
import numpy as np
import numpy.typing as npt

from ._indicators import INDICATORS, MAX_PERIOD, FloatArray, Indicator

#: The longest formula accepted, in characters, as written and as spelled canonically.
MAX_FORMULA_LENGTH: Final = 1000
#: The deepest expression tree accepted (``a + b + c`` is 3 deep; parentheses add nothing).
MAX_FORMULA_DEPTH: Final = 100

_Validator: TypeAlias = Callable[[Any, Any, Any], None]

ARITHMETIC_OPS: Final = ("+", "-", "*", "/")
COMPARISON_OPS: Final = ("<", "<=", ">", ">=", "==", "!=")

# Precedence, loosest first, as in Python.
_OR, _AND, _NOT, _COMPARE, _SUM, _PRODUCT, _UNARY, _ATOM = range(8)
_BINDING = {"+": _SUM, "-": _SUM, "*": _PRODUCT, "/": _PRODUCT}


# How much of a formula an error shows.
_SHOWN = 72


class FormulaError(ValueError):
    """A formula that cannot be used, and where: ``position`` is a 0-based index into ``text``.

    ``str()`` shows the message, then the formula with a caret under the position::

        unknown indicator 'rsl14'; did you mean rsi14?
          rsl14 < 30
          ^

    Args:
        message: what is wrong, naming the offending word.
        text: the whole formula.
        position: where the problem starts, ``0 <= position <= len(text)``.
    """

    def __init__(self, message: str, text: str, position: int) -> None:
        # All three in args, so that the error pickles across processes as is.
        super().__init__(message, text, position)
        self.message = message
        self.text = text
        self.position = position

    def __str__(self) -> str:
        # One line, caret aligned; a long formula shows ~70 characters around the position.
        start = 0 if len(self.text) <= _SHOWN else max(0, self.position - 40)
        end = min(len(self.text), start + _SHOWN)
        shown = re.sub(r"\s", " ", self.text[start:end])
        prefix = "..." if start else ""
        suffix = "..." if end < len(self.text) else ""
        caret = " " * (len(prefix) + self.position - start) + "^"
        return f"{self.message}\n  {prefix}{shown}{suffix}\n  {caret}"


# -- the expression tree -----------------------------------------------------------


def _height(*children: Expr) -> int:
    return 1 + max((_depth_of(child) for child in children), default=0)


def _depth_of(node: Expr) -> int:
    return node.depth if isinstance(node, _Node) else 1


@attrs.frozen
class _Node:
    """The inner nodes' shared behaviour: a bounded depth; str() is the canonical spelling.

    Each node checks its operands in its fields' validators, which attrs runs
    before this class's ``__attrs_post_init__``: an operand of the wrong kind
    is reported before a tree too deep.
    """

    depth: int = attrs.field(init=False, eq=False, repr=False)

    def __attrs_post_init__(self) -> None:
        depth = _height(*_children(self))
        if depth > MAX_FORMULA_DEPTH:
            raise ValueError(f"expression nests more than {MAX_FORMULA_DEPTH} levels deep")
        object.__setattr__(self, "depth", depth)

    def __str__(self) -> str:
        return canonical(self)  # type: ignore[arg-type]  # only Expr classes inherit this


def _check_numbers(node: str, operands: Sequence[Expr]) -> None:
    for operand in operands:
        if not is_number(operand):
            raise TypeError(f"{node} takes numbers, got the condition {canonical(operand)}")


def _check_conditions(node: str, operands: Sequence[Expr]) -> None:
    for operand in operands:
        if is_number(operand):
            raise TypeError(f"{node} takes conditions, got the number {canonical(operand)}")


def _takes(check: Callable[[str, Sequence[Expr]], None], node: str) -> _Validator:
    """A validator of a one-operand field: ``check`` it, naming the node ``node``."""
    return lambda instance, attribute, operand: check(node, [operand])


# Typed converters: lists are accepted, tuples stored (frozen, hashable).
def _number_tuple(operands: Iterable[NumberExpr]) -> tuple[NumberExpr, ...]:
    return tuple(operands)


def _condition_tuple(operands: Iterable[Condition]) -> tuple[Condition, ...]:
    return tuple(operands)


def _str_tuple(ops: Iterable[str]) -> tuple[str, ...]:
    return tuple(ops)


@attrs.frozen
class Number:
    """A number literal, finite and >= 0 (``-2`` is ``Negate(Number(2))``)."""

    value: float = attrs.field(converter=float)

    @value.validator
    def _check(self, attribute: object, value: float) -> None:
        if not 0 <= value < math.inf:
            raise ValueError(f"a number literal must be finite and >= 0, got {value!r}")

    def __str__(self) -> str:
        return canonical(self)


@attrs.frozen
class Negate(_Node):
    """``-operand``."""

    operand: NumberExpr = attrs.field(validator=_takes(_check_numbers, "'-'"))


@attrs.frozen
class Arithmetic(_Node):
    """``left op right`` with ``op`` one of ``+ - * /``; division by zero gives NaN."""

    op: str = attrs.field(validator=attrs.validators.in_(ARITHMETIC_OPS))
    left: NumberExpr
    right: NumberExpr = attrs.field()

    @right.validator
    def _check(self, attribute: object, right: NumberExpr) -> None:
        _check_numbers(f"'{self.op}'", [self.left, right])


@attrs.frozen
class Compare(_Node):
    """A comparison chain, as in Python: ``20 < rsi14 < 40``, ``ops`` between ``operands``."""

    operands: tuple[NumberExpr, ...] = attrs.field(converter=_number_tuple)
    ops: tuple[str, ...] = attrs.field(converter=_str_tuple)

    @ops.validator
    def _check(self, attribute: object, ops: tuple[str, ...]) -> None:
        if len(ops) < 1 or len(self.operands) != len(ops) + 1:
            raise ValueError("a comparison needs n + 1 operands for n >= 1 operators")
        if not set(ops) <= set(COMPARISON_OPS):
            raise ValueError(f"comparison operators are {COMPARISON_OPS}, got {ops}")
        _check_numbers("a comparison", self.operands)


@attrs.frozen
class _Junction(_Node):
    """``and`` or ``or`` (the subclass's ``_word``) over two or more conditions."""

    _word: ClassVar[str]
    operands: tuple[Condition, ...] = attrs.field(converter=_condition_tuple)

    @operands.validator
    def _check(self, attribute: object, operands: tuple[Condition, ...]) -> None:
        if len(operands) < 2:
            raise ValueError(f"'{self._word}' needs at least two operands")
        _check_conditions(f"'{self._word}'", operands)


@attrs.frozen
class And(_Junction):
    """``a and b and ...``: two or more conditions."""

    _word: ClassVar[str] = "and"


@attrs.frozen
class Or(_Junction):
    """``a or b or ...``: two or more conditions."""

    _word: ClassVar[str] = "or"


@attrs.frozen
class Not(_Node):
    """``not operand``."""

    operand: Condition = attrs.field(validator=_takes(_check_conditions, "'not'"))


_PARAMETER_NAME = re.compile(r"[a-z_][a-z0-9_]*")
_SUFFIX = re.compile(r"(?P<base>[a-z_]*[a-z_])(?P<digits>[0-9]+)")


def _names_an_indicator(word: str) -> bool:
    """Whether ``word`` is an indicator's name, bare or with a period (``close``, ``sma50``)."""
    match = _SUFFIX.fullmatch(word)
    return word in INDICATORS or (match is not None and match["base"] in INDICATORS)


def _argument_tuple(arguments: Iterable[int | str]) -> tuple[int | str, ...]:
    return tuple(arguments)


def _int_tuple(positions: Iterable[int]) -> tuple[int, ...]:
    return tuple(positions)


@attrs.frozen(cache_hash=True)
class UnboundIndicator:
    """An indicator whose parameters are named, not given: ``rsi(period)``, ``macd(fast,slow,9)``.

    A leaf of an *unbound* formula's tree; `Formula.bind` turns it into an
    `Indicator` once the names have values. Arguments are ints (checked as
    in an `Indicator`) or lower-case names, at least one of them a name.

    Attributes:
        name: the indicator's base name, e.g. ``"rsi"``.
        arguments: one per parameter of the indicator: an int or a name.
        positions: where each argument starts in the formula's text, when
            parsed (not part of equality); empty when built by hand.
        key: the canonical spelling, e.g. ``rsi(period)``.

    Raises:
        ValueError: the name is unknown, the number of arguments is wrong, an
            int is out of range, or a name is not a lower-case identifier or
            is itself an indicator's name.
        TypeError: an argument is neither an int nor a str.
    """

    name: str
    arguments: tuple[int | str, ...] = attrs.field(converter=_argument_tuple)
    positions: tuple[int, ...] = attrs.field(default=(), converter=_int_tuple, eq=False, repr=False)
    key: str = attrs.field(init=False, eq=False, repr=False)

    def __attrs_post_init__(self) -> None:
        spec = INDICATORS.get(self.name)
        if spec is None:
            raise ValueError(f"unknown indicator {self.name!r}")
        if len(self.arguments) != len(spec.parameters):
            raise ValueError(
                f"{self.name} takes {len(spec.parameters)} parameter(s), got {len(self.arguments)}"
            )
        if not any(isinstance(argument, str) for argument in self.arguments):
            raise ValueError(f"{self.name}{self.arguments!r} names no parameter: use Indicator")
        for parameter, argument in zip(spec.parameters, self.arguments, strict=True):
            if isinstance(argument, str):
                _check_parameter_name(argument)
            elif isinstance(argument, bool) or not isinstance(argument, int):
                raise TypeError(f"{self.name} arguments are ints or names, got {argument!r}")
            else:
                parameter.check(self.name, argument)
        spelled = ",".join(map(str, self.arguments))
        object.__setattr__(self, "key", f"{self.name}({spelled})")

    @property
    def parameter_names(self) -> frozenset[str]:
        """The names among the arguments."""
        return frozenset(argument for argument in self.arguments if isinstance(argument, str))

    def __str__(self) -> str:
        return self.key


def _check_parameter_name(name: str) -> None:
    if not _PARAMETER_NAME.fullmatch(name):
        raise ValueError(f"a parameter name is a lower-case identifier, got {name!r}")
    if _names_an_indicator(name):
        raise ValueError(f"{name} is an indicator, not a parameter name")


NumberExpr: TypeAlias = Number | Indicator | UnboundIndicator | Negate | Arithmetic
Condition: TypeAlias = Compare | Not | And | Or
Expr: TypeAlias = NumberExpr | Condition


def is_number(node: Expr) -> bool:
    """Whether ``node`` is a number (else it is a condition)."""
    return isinstance(node, Number | Indicator | UnboundIndicator | Negate | Arithmetic)


def _precedence(node: Expr) -> int:
    match node:
        case Or():
            return _OR
        case And():
            return _AND
        case Not():
            return _NOT
        case Compare():
            return _COMPARE
        case Arithmetic(op=op):
            return _BINDING[op]
        case Negate():
            return _UNARY
    return _ATOM


def _wrap(node: Expr, at_least: int) -> str:
    text = canonical(node)
    return text if _precedence(node) >= at_least else f"({text})"


def canonical(node: Expr) -> str:
    """The tree spelled with single spaces, lower case, and only the parentheses it needs.

    ``parse_formula(canonical(tree)).tree == tree`` for every formula tree.
    """
    match node:
        case Number(value=value):
            return str(int(value)) if value.is_integer() and value < 1e16 else repr(value)
        case Indicator() | UnboundIndicator():
            return node.key
        case Negate(operand=operand):
            return "-" + _wrap(operand, _UNARY)
        case Arithmetic(op=op, left=left, right=right):
            # Left-associative: a right operand of equal precedence keeps its parentheses.
            binding = _BINDING[op]
            return f"{_wrap(left, binding)} {op} {_wrap(right, binding + 1)}"
        case Compare(operands=operands, ops=ops):
            parts = [_wrap(operands[0], _SUM)]
            for op, operand in zip(ops, operands[1:], strict=True):
                parts += [op, _wrap(operand, _SUM)]
            return " ".join(parts)
        case Not(operand=operand):
            return "not " + _wrap(operand, _NOT)
        case And(operands=operands):
            return " and ".join(_wrap(operand, _AND + 1) for operand in operands)
        case Or(operands=operands):
            return " or ".join(_wrap(operand, _OR + 1) for operand in operands)
    raise TypeError(f"not a formula node: {node!r}")


# -- evaluation --------------------------------------------------------------------

_COMPARE_FNS: Mapping[str, Callable[[float, float], bool]] = {
    "<": float.__lt__,
    "<=": float.__le__,
    ">": float.__gt__,
    ">=": float.__ge__,
    "==": float.__eq__,
    "!=": float.__ne__,
}

# "+", "-" and "*", for a float or a numpy array alike; "/" is each evaluator's
# own, since each divides by zero in its own way (to NaN).
_ARITHMETIC_FNS: Mapping[str, Callable[[Any, Any], Any]] = {
    "+": operator.add,
    "-": operator.sub,
    "*": operator.mul,
}


def _number(node: NumberExpr, values: Mapping[str, float]) -> float:
    match node:
        case Number(value=value):
            return value
        case Indicator():
            try:
                return float(values[node.key])
            except KeyError:
                raise ValueError(f"no value given for indicator {node.key!r}") from None
        case Negate(operand=operand):
            return -_number(operand, values)
        case Arithmetic(op=op, left=left, right=right):
            a, b = _number(left, values), _number(right, values)
            if op == "/":
                return a / b if b != 0 else math.nan
            return float(_ARITHMETIC_FNS[op](a, b))
        case UnboundIndicator():
            raise ValueError(f"{node.key} is unbound: bind the formula's parameters first")
    raise TypeError(f"not a number node: {node!r}")


def _truth(node: Condition, values: Mapping[str, float]) -> bool | None:
    """True, False, or None for unknown (a NaN was compared)."""
    match node:
        case Compare(operands=operands, ops=ops):
            numbers = [_number(operand, values) for operand in operands]
            if any(math.isnan(number) for number in numbers):
                return None
            return all(
                _COMPARE_FNS[op](a, b) for op, a, b in zip(ops, numbers, numbers[1:], strict=False)
            )
        case Not(operand=operand):
            result = _truth(operand, values)
            return None if result is None else not result
        case And(operands=operands) | Or(operands=operands):
            # Kleene logic: an operand equal to the decider (False for 'and',
            # True for 'or') decides; otherwise any unknown leaves it unknown.
            decider = isinstance(node, Or)
            unknown = False
            for operand in operands:
                result = _truth(operand, values)
                if result is decider:
                    return decider
                unknown |= result is None
            return None if unknown else not decider
    raise TypeError(f"not a condition node: {node!r}")


def _children(node: object) -> tuple[Expr, ...]:
    match node:
        case Negate(operand=child) | Not(operand=child):
            return (child,)
        case Arithmetic(left=left, right=right):
            return (left, right)
        case Compare(operands=children) | _Junction(operands=children):
            return children
    return ()


def walk(node: Expr) -> Iterator[Expr]:
    """Every node of the tree, parents before children."""
    yield node
    for child in _children(node):
        yield from walk(child)


# -- evaluation over every bar ------------------------------------------------------

# Element-wise, each is the float operator _COMPARE_FNS uses at one bar.
_COMPARE_UFUNCS: Mapping[str, np.ufunc] = {
    "<": np.less,
    "<=": np.less_equal,
    ">": np.greater,
    ">=": np.greater_equal,
    "==": np.equal,
    "!=": np.not_equal,
}

# A value per bar, or one value for every bar (a literal): numpy broadcasts.
_Series: TypeAlias = FloatArray | np.float64
_Truths: TypeAlias = npt.NDArray[np.bool_] | np.bool_


def _number_series(node: NumberExpr, series: Mapping[str, FloatArray]) -> _Series:
    """`_number` at every bar, with the same float operations element by element."""
    match node:
        case Number(value=value):
            return np.float64(value)
        case Indicator():
            return series[node.key]
        case Negate(operand=operand):
            return -_number_series(operand, series)
        case Arithmetic(op=op, left=left, right=right):
            a, b = _number_series(left, series), _number_series(right, series)
            if op == "/":
                return np.where(b != 0, a / b, np.nan)
            result: _Series = _ARITHMETIC_FNS[op](a, b)
            return result
        case UnboundIndicator():
            raise ValueError(f"{node.key} is unbound: bind the formula's parameters first")
    raise TypeError(f"not a number node: {node!r}")


def _truth_series(
    node: Condition, series: Mapping[str, FloatArray], *, true: bool, false: bool
) -> tuple[_Truths | None, _Truths | None]:
    """`_truth` at every bar, as (where true, where false); a bar that is neither is unknown.

    Only what is asked for is computed (``true``, ``false``), the other is
    None: a formula without ``not`` never needs where its parts are false.
    """
    match node:
        case Compare(operands=operands, ops=ops):
            numbers = [_number_series(operand, series) for operand in operands]
            holds: _Truths = np.bool_(True)
            for op, a, b in zip(ops, numbers, numbers[1:], strict=False):
                holds = holds & _COMPARE_UFUNCS[op](a, b)
            # A comparison with NaN is False in IEEE arithmetic, except '!='.
            if not (false or "!=" in ops):
                return holds, None
            known: _Truths = np.bool_(True)
            for operand, number in zip(operands, numbers, strict=True):
                if not isinstance(operand, Number):  # a literal is never NaN
                    known = known & ~np.isnan(number)
            where_true = (known & holds) if "!=" in ops else holds
            return where_true, (known & ~holds) if false else None
        case Not(operand=operand):
            inner_true, inner_false = _truth_series(operand, series, true=false, false=true)
            return inner_false, inner_true
        case And(operands=operands) | Or(operands=operands):
            # Kleene logic: 'and' is true where all are, false where any is;
            # 'or' the other way round. Elsewhere it is unknown.
            is_or = isinstance(node, Or)
            all_true: _Truths = np.bool_(not is_or)
            all_false: _Truths = np.bool_(is_or)
            for part in operands:
                part_true, part_false = _truth_series(part, series, true=true, false=false)
                if part_true is not None:
                    all_true = (all_true | part_true) if is_or else (all_true & part_true)
                if part_false is not None:
                    all_false = (all_false & part_false) if is_or else (all_false | part_false)
            return (all_true if true else None), (all_false if false else None)
    raise TypeError(f"not a condition node: {node!r}")


# -- binding parameters ------------------------------------------------------------


def _rebuild(node: Expr, leaf: Callable[[UnboundIndicator], Indicator]) -> Expr:
    """The tree with each UnboundIndicator replaced by ``leaf(it)``; nodes are checked again."""
    match node:
        case UnboundIndicator():
            return leaf(node)
        case Negate(operand=operand):
            return Negate(_rebuild(operand, leaf))  # type: ignore[arg-type]
        case Not(operand=operand):
            return Not(_rebuild(operand, leaf))  # type: ignore[arg-type]
        case Arithmetic(op=op, left=left, right=right):
            return Arithmetic(op, _rebuild(left, leaf), _rebuild(right, leaf))  # type: ignore[arg-type]
        case Compare(operands=operands, ops=ops):
            return Compare([_rebuild(operand, leaf) for operand in operands], ops)  # type: ignore[misc]
        case And(operands=operands):
            return And([_rebuild(operand, leaf) for operand in operands])  # type: ignore[misc]
        case Or(operands=operands):
            return Or([_rebuild(operand, leaf) for operand in operands])  # type: ignore[misc]
    return node


def _names(names: Iterable[str]) -> str:
    return ", ".join(sorted(names)) or "none"


@attrs.frozen
class Formula:
    """A parsed, checked scan formula. Make one with `parse_formula`.

    Picklable: it travels to worker processes as plain frozen values.

    A formula whose indicators name parameters (``rsi(period) < 30``) is
    *unbound*: `bind` gives it values. An unbound formula pickles, spells
    itself and binds; asking it for `indicators` or evaluating it raises
    `FormulaError`.

    Attributes:
        text: the formula as written.
        tree: its expression tree; the root is a condition.
        parameter_names: the names of its parameters, lower case; empty once bound.
    """

    text: str
    tree: Condition
    _indicators: frozenset[Indicator] = attrs.field(init=False, eq=False, repr=False)
    parameter_names: frozenset[str] = attrs.field(init=False, eq=False, repr=False)

    def __attrs_post_init__(self) -> None:
        if is_number(self.tree):
            raise TypeError(f"a formula's root must be a condition, got {self.tree!r}")
        nodes = list(walk(self.tree))
        found = frozenset(node for node in nodes if isinstance(node, Indicator))
        object.__setattr__(self, "_indicators", found)
        names = frozenset().union(
            *(node.parameter_names for node in nodes if isinstance(node, UnboundIndicator))
        )
        object.__setattr__(self, "parameter_names", names)

    @property
    def indicators(self) -> frozenset[Indicator]:
        """The indicator values it reads, so a scan computes only those.

        Raises:
            FormulaError: the formula is unbound (see `bind`).
        """
        self._check_bound()
        return self._indicators

    def evaluate(self, values: Mapping[str, float]) -> bool:
        """Whether the formula holds for these indicator values.

        Args:
            values: each of `indicators` by its ``key`` (``"sma50"``), e.g.
                from `latest_values`. NaN means "not known" (too few bars).

        Returns:
            True only if the formula is true; false and unknown both give False.

        Raises:
            FormulaError: the formula is unbound (see `bind`).
            ValueError: a value the formula needs is missing from ``values``.
        """
        if self.parameter_names:
            self._check_bound()
        return _truth(self.tree, values) is True

    def evaluate_series(
        self, values: Mapping[str, npt.ArrayLike], *, bars: int | None = None
    ) -> npt.NDArray[np.bool_]:
        """Where the formula holds, at every bar at once.

        Element ``i`` is ``evaluate({key: series[i] for key, series in
        values.items()})``, exactly (the same float operations and the same
        three-valued logic), computed with numpy over whole arrays.

        Args:
            values: each of `indicators` by its ``key``, one value per bar,
                e.g. from `series_values`; all of one length. NaN is "not known".
            bars: the number of bars. Needed only when the formula reads no
                indicator (``1 < 2``) and ``values`` is empty; otherwise it
                must agree with the arrays.

        Returns:
            A bool array, one element per bar: True where the formula is true;
            false and unknown both give False.

        Raises:
            FormulaError: the formula is unbound (see `bind`).
            ValueError: a series the formula needs is missing or not 1-D, the
                lengths differ, or the number of bars cannot be told.
        """
        self._check_bound()
        series: dict[str, FloatArray] = {}
        for indicator in self._indicators:
            try:
                array = np.asarray(values[indicator.key], dtype=np.float64)
            except KeyError:
                raise ValueError(f"no series given for indicator {indicator.key!r}") from None
            if array.ndim != 1:
                raise ValueError(f"{indicator.key} must be a 1-D array, got shape {array.shape}")
            series[indicator.key] = array
        lengths = {key: len(array) for key, array in series.items()}
        if not lengths and values:  # a formula without indicators: any series tells the length
            key, first = next(iter(values.items()))
            lengths[key] = len(np.asarray(first))
        if bars is not None:
            lengths["bars="] = bars
        if len(set(lengths.values())) > 1:
            raise ValueError(f"the series differ in length: {lengths}")
        if not lengths:
            raise ValueError("no series to tell the number of bars by: pass bars=")
        length = next(iter(lengths.values()))
        with np.errstate(all="ignore"):  # inf - inf and 0 * inf are NaN, as in Python
            where, _ = _truth_series(self.tree, series, true=True, false=False)
        assert where is not None  # asked for
        return np.array(np.broadcast_to(where, (length,)), dtype=np.bool_)

    def bind(self, parameters: Mapping[str, object]) -> Formula:
        """The formula with its parameters' values written in.

        ``parse_formula("rsi(period) < 30").bind({"period": 14})`` is
        ``parse_formula("rsi(14) < 30")``: a plain (bound) formula whose
        ``text`` is the text as written with each name replaced by its value
        (or, for a formula built by hand, its canonical spelling). A formula
        without parameters binds to itself, given no parameters.

        Args:
            parameters: a value for each of `parameter_names`, and nothing else:
                an int (not a bool) valid for the indicator it feeds.

        Returns:
            The bound formula.

        Raises:
            FormulaError: ``parameters`` names a parameter the formula does
                not use (the message lists those it does), misses one, or
                gives a value that is not an int or is invalid for its
                indicator (the message is the one for the number written in,
                the position that of the name); or the bound formula is
                longer than `MAX_FORMULA_LENGTH`.
            TypeError: ``parameters`` is not a mapping.
        """
        if not isinstance(parameters, Mapping):
            raise TypeError(f"parameters are a mapping, got {type(parameters).__name__}")
        unused = set(parameters) - self.parameter_names
        if unused:
            uses = f"the formula's parameters are {_names(self.parameter_names)}"
            message = f"unknown parameter(s) {_names(map(repr, unused))}: {uses}"
            raise FormulaError(message, self.text, 0)
        missing = self.parameter_names - set(parameters)
        if missing:
            first = min(missing, key=self._position)
            message = f"no value for parameter(s) {_names(map(repr, missing))}"
            raise FormulaError(message, self.text, self._position(first))
        if not self.parameter_names:
            return self
        # (where, how long, the value written instead): a set, as a hand-built
        # tree may hold one leaf object in two places.
        edits: set[tuple[int, int, str]] = set()

        def leaf(node: UnboundIndicator) -> Indicator:
            spec = INDICATORS[node.name]
            params: list[int] = []
            for index, (parameter, argument) in enumerate(
                zip(spec.parameters, node.arguments, strict=True)
            ):
                if isinstance(argument, int):
                    params.append(argument)
                    continue
                value = parameters[argument]
                at = self._argument_position(node, index)
                if isinstance(value, bool) or not isinstance(value, int | np.integer):
                    message = f"parameter {argument!r} must be an int, got {value!r}"
                    raise FormulaError(message, self.text, at)
                try:
                    parameter.check(spec.name, int(value))
                except ValueError as exc:
                    raise FormulaError(str(exc), self.text, at) from None
                params.append(int(value))
                edits.add((at, len(argument), str(int(value))))
            try:
                return Indicator(spec.name, params)
            except ValueError as exc:  # valid one by one, not together (macd)
                raise FormulaError(str(exc), self.text, self._argument_position(node, 0)) from None

        tree = _rebuild(self.tree, leaf)
        text = self.text
        # 0 is never an argument's position (one follows "name("): it means unknown.
        if all(self._argument_position(*where) for where in self._arguments()):
            for at, length, value in sorted(edits, reverse=True):
                text = text[:at] + value + text[at + length :]
        else:  # positions unknown (a tree built by hand): spell it
            text = canonical(tree)
        bound = Formula(text, tree)  # type: ignore[arg-type]  # rebuilt conditions stay conditions
        longest = max(len(text), len(bound.canonical()))
        if longest > MAX_FORMULA_LENGTH:
            limit = MAX_FORMULA_LENGTH
            message = f"formula is {longest} characters long once bound; the limit is {limit}"
            raise FormulaError(message, self.text, 0)
        return bound

    def _arguments(self) -> Iterator[tuple[UnboundIndicator, int]]:
        """Each named argument: its node and its index."""
        for node in walk(self.tree):
            if isinstance(node, UnboundIndicator):
                for index, argument in enumerate(node.arguments):
                    if isinstance(argument, str):
                        yield node, index

    def _argument_position(self, node: UnboundIndicator, index: int) -> int:
        """Where the argument starts in `text`, or 0 if that is unknown (a tree built by hand)."""
        if index >= len(node.positions):
            return 0
        at = node.positions[index]
        argument = str(node.arguments[index])
        return at if self.text[at : at + len(argument)].lower() == argument else 0

    def _position(self, name: str) -> int:
        """Where the parameter ``name`` first appears in `text` (0 if unknown)."""
        found = [
            self._argument_position(node, index)
            for node, index in self._arguments()
            if node.arguments[index] == name
        ]
        return min((at for at in found if at), default=0)

    def _check_bound(self) -> None:
        if self.parameter_names:
            first = min(self.parameter_names, key=self._position)
            message = (
                f"the formula has unbound parameters ({_names(self.parameter_names)}):"
                " bind them first, with Formula.bind"
            )
            raise FormulaError(message, self.text, self._position(first))

    def canonical(self) -> str:
        """The formula spelled canonically: lower case, single spaces, minimal parentheses."""
        return canonical(self.tree)

    def __str__(self) -> str:
        return self.canonical()


# -- parsing -----------------------------------------------------------------------

_GRAMMAR = r"""
?start: or_test
?or_test: and_test (_OR and_test)*
?and_test: not_test (_AND not_test)*
?not_test: NOT not_test | comparison
?comparison: sum (COMPARE sum)*
?sum: term ((PLUS | MINUS) term)*
?term: factor ((STAR | SLASH) factor)*
?factor: MINUS factor | atom
?atom: NUMBER                       -> number
     | NAME                         -> name
     | NAME LPAR [arguments] RPAR   -> call
     | LPAR or_test RPAR            -> group
arguments: _argument (_COMMA _argument)*
_argument: NUMBER | NAME

_OR: "or"i
_AND: "and"i
NOT: "not"i
COMPARE: "<=" | ">=" | "==" | "!=" | "<" | ">"
PLUS: "+"
MINUS: "-"
STAR: "*"
SLASH: "/"
LPAR: "("
RPAR: ")"
_COMMA: ","
NAME: /[A-Za-z_][A-Za-z0-9_]*/
NUMBER: /([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][+-]?[0-9]+)?/
%ignore /[ \t\r\n]+/
"""

# What Lark's terminal names mean to a user, for "expected ..." messages.
_EXPECTED = {
    "NUMBER": "a number",
    "NAME": "an indicator",
    "LPAR": "'('",
    "RPAR": "')'",
    "MINUS": "'-'",
    "PLUS": "'+'",
    "STAR": "'*'",
    "SLASH": "'/'",
    "COMPARE": "a comparison",
    "NOT": "'not'",
    "_AND": "'and'",
    "_OR": "'or'",
    "_COMMA": "','",
    "$END": "the end",
}

# Characters people try, and what to write instead.
_HINTS = {
    "=": "compare with ==",
    "&": "write 'and'",
    "|": "write 'or'",
    "!": "write 'not' (or != to compare)",
    "'": "strings are not part of formulas",
    '"': "strings are not part of formulas",
    ".": "attribute access is not part of formulas",
    "[": "subscripts are not part of formulas",
    ";": "a formula is one expression",
    "%": "the operators are + - * /",
    "^": "the operators are + - * /",
    ":": "a formula is one expression",
}


@attrs.frozen
class _Typed:
    """A node on its way up the parse, with where its text starts."""

    node: Expr
    position: int


class _Problem(Exception):
    """Raised while building; parse_formula adds the text and makes it a FormulaError."""

    def __init__(self, message: str, position: int | None) -> None:
        super().__init__(message)
        self.message = message
        self.position = position or 0


def _at(token: lark.Token) -> int:
    return token.start_pos or 0


class _Builder(lark.Transformer[lark.Token, _Typed]):
    """Builds checked nodes as Lark reduces rules: bottom-up, without recursion.

    Lark calls these methods from inside the LALR parser (an embedded
    transformer), so no parse tree is built and no recursive pass walks it:
    deep input cannot overflow the stack; the depth limit stops it instead.
    """

    def _make(self, position: int, node: Callable[..., Expr], *args: object) -> _Typed:
        try:
            return _Typed(node(*args), position)
        except ValueError as exc:  # the depth limit; the types were checked before
            raise _Problem(str(exc), position) from None

    def _numbers(self, what: str, *operands: _Typed) -> None:
        for operand in operands:
            if not is_number(operand.node):
                message = f"{what} takes numbers, but {_quote(operand.node)} is a condition"
                raise _Problem(message, operand.position)

    def _conditions(self, what: str, *operands: _Typed) -> None:
        for operand in operands:
            if is_number(operand.node):
                quoted = _quote(operand.node)
                message = f"{what} takes conditions, but {quoted} is a number; compare it"
                raise _Problem(message, operand.position)

    def number(self, children: list[lark.Token]) -> _Typed:
        (token,) = children
        value = float(token)
        if math.isinf(value):
            shown = token if len(token) <= 20 else token[:17] + "..."
            raise _Problem(f"number {shown} is too large", _at(token))
        return _Typed(Number(value), _at(token))

    def name(self, children: list[lark.Token]) -> _Typed:
        (token,) = children
        return _Typed(_resolve(token, None, []), _at(token))

    def call(self, children: list[lark.Token | list[lark.Token] | None]) -> _Typed:
        token, lpar, arguments, _ = children
        assert isinstance(token, lark.Token)
        assert isinstance(lpar, lark.Token)
        assert not isinstance(arguments, lark.Token)
        return _Typed(_resolve(token, lpar, arguments or []), _at(token))

    def arguments(self, children: list[lark.Token]) -> list[lark.Token]:
        return children

    def group(self, children: list[lark.Token | _Typed]) -> _Typed:
        lpar, inner, _ = children
        assert isinstance(lpar, lark.Token)
        assert isinstance(inner, _Typed)
        return _Typed(inner.node, _at(lpar))

    def _prefix(
        self,
        children: list[lark.Token | _Typed],
        check: Callable[[str, _Typed], None],
        what: str,
        node: Callable[..., Expr],
    ) -> _Typed:
        """An operator before its one operand: ``-x``, ``not x``; ``check`` the operand."""
        keyword, operand = children
        assert isinstance(keyword, lark.Token)
        assert isinstance(operand, _Typed)
        check(what, operand)
        return self._make(_at(keyword), node, operand.node)

    def factor(self, children: list[lark.Token | _Typed]) -> _Typed:
        return self._prefix(children, self._numbers, "'-'", Negate)

    def sum(self, children: list[lark.Token | _Typed]) -> _Typed:
        return self._arithmetic(children)

    def term(self, children: list[lark.Token | _Typed]) -> _Typed:
        return self._arithmetic(children)

    def _arithmetic(self, children: list[lark.Token | _Typed]) -> _Typed:
        # a - b - c arrives flat; fold it to the left, as Python does.
        result = children[0]
        assert isinstance(result, _Typed)
        for op, right in zip(children[1::2], children[2::2], strict=True):
            assert isinstance(op, lark.Token)
            assert isinstance(right, _Typed)
            self._numbers(f"'{op}'", result, right)
            result = self._make(result.position, Arithmetic, str(op), result.node, right.node)
        return result

    def comparison(self, children: list[lark.Token | _Typed]) -> _Typed:
        operands = [child for child in children if isinstance(child, _Typed)]
        ops = [str(child) for child in children if isinstance(child, lark.Token)]
        self._numbers(f"'{ops[0]}'", *operands)
        nodes = [operand.node for operand in operands]
        return self._make(operands[0].position, Compare, nodes, ops)

    def not_test(self, children: list[lark.Token | _Typed]) -> _Typed:
        return self._prefix(children, self._conditions, "'not'", Not)

    def and_test(self, children: list[_Typed]) -> _Typed:
        self._conditions("'and'", *children)
        return self._make(children[0].position, And, [child.node for child in children])

    def or_test(self, children: list[_Typed]) -> _Typed:
        self._conditions("'or'", *children)
        return self._make(children[0].position, Or, [child.node for child in children])


def _quote(node: Expr) -> str:
    text = canonical(node)
    return text if len(text) <= 40 else text[:37] + "..."


# -- indicator names ---------------------------------------------------------------

# A period to show in "needs a period" messages.
_EXAMPLE_PERIOD = {"rsi": 14, "atr": 14, "change_pct": 1}


def _suggest(base: str, digits: str) -> str:
    """``; did you mean sma50?`` for ``smma50``, or the list of names if nothing is close."""
    close = difflib.get_close_matches(base, list(INDICATORS), n=3, cutoff=0.6)
    if not close:
        return "; indicators are " + ", ".join(spec.pattern for spec in INDICATORS.values())
    spelled = []
    for name in close:
        spec = INDICATORS[name]
        suffixed = digits and len(spec.parameters) == 1
        spelled.append(name + digits if suffixed else spec.pattern)
    return "; did you mean " + " or ".join(spelled) + "?"


def _resolve(
    token: lark.Token, lpar: lark.Token | None, arguments: list[lark.Token]
) -> Indicator | UnboundIndicator:
    """The Indicator a name (``sma50``, ``macd``) or a call (``sma(50)``, ``rsi(period)``) means."""
    word = str(token).lower()
    spec = INDICATORS.get(word)
    if spec is None:
        # A suffixed period: sma50 is sma(50).
        match = _SUFFIX.fullmatch(word)
        base, digits = (match["base"], match["digits"]) if match else (word, "")
        spec = INDICATORS.get(base)
        if spec is None or len(spec.parameters) != 1:
            raise _Problem(f"unknown indicator {word!r}{_suggest(base, digits)}", _at(token))
        if lpar is not None:
            message = f"{word} already has its {spec.parameters[0].name}: write {word}"
            raise _Problem(f"{message} or {base}({int(digits)})", _at(lpar))
        params: tuple[int, ...] = (int(digits),)
        positions = [_at(token) + len(base)]
    elif lpar is None:
        if spec.parameters and spec.defaults is None:
            example = f"{word}{_EXAMPLE_PERIOD.get(word, 20)}"
            message = f"{word} needs a {spec.parameters[0].name}: write e.g. {example}"
            raise _Problem(f"{message} or {word}({example.removeprefix(word)})", _at(token))
        params, positions = spec.defaults or (), []
    else:
        if len(arguments) != len(spec.parameters):
            names = ", ".join(parameter.name for parameter in spec.parameters)
            takes = f"{len(spec.parameters)} parameters ({names})" if names else "no parameters"
            raise _Problem(f"{word} takes {takes}, got {len(arguments)}", _at(lpar))
        if any(argument.type == "NAME" for argument in arguments):
            return _unbound(word, arguments)
        params = tuple(_integer(word, argument) for argument in arguments)
        positions = [_at(argument) for argument in arguments]
    for parameter, value, position in zip(spec.parameters, params, positions, strict=False):
        try:
            parameter.check(spec.name, value)
        except ValueError as exc:
            raise _Problem(str(exc), position) from None
    try:
        return Indicator(spec.name, params)
    except ValueError as exc:  # parameters valid one by one but not together (macd)
        raise _Problem(str(exc), positions[0] if positions else _at(token)) from None


def _unbound(word: str, arguments: list[lark.Token]) -> UnboundIndicator:
    """``rsi(period)``: an indicator with named parameters, each literal one checked now."""
    spec = INDICATORS[word]
    values: list[int | str] = []
    for parameter, argument in zip(spec.parameters, arguments, strict=True):
        if argument.type == "NAME":
            name = str(argument).lower()
            try:
                _check_parameter_name(name)
            except ValueError as exc:
                message = f"{exc}: {word} parameters are whole numbers or parameter names"
                raise _Problem(message, _at(argument)) from None
            values.append(name)
            continue
        value = _integer(word, argument)
        try:
            parameter.check(spec.name, value)
        except ValueError as exc:
            raise _Problem(str(exc), _at(argument)) from None
        values.append(value)
    return UnboundIndicator(spec.name, values, [_at(argument) for argument in arguments])


def _integer(indicator: str, token: lark.Token) -> int:
    if not token.isdigit():
        message = f"{indicator} parameters are whole numbers from 1 to {MAX_PERIOD}, got {token}"
        raise _Problem(message, _at(token))
    return int(token)


# -- the entry point -----------------------------------------------------------------

_OPERATORS = frozenset({"_OR", "_AND", "COMPARE", "PLUS", "MINUS", "STAR", "SLASH"})


def _expected(expected: set[str]) -> str:
    # LALR's expected sets are exact about operands but over-generous after
    # them (default reductions admit ')' anywhere): say it in a user's terms.
    if "NAME" in expected and "MINUS" in expected:
        if "NOT" in expected:
            return "a number, an indicator, '(', '-' or 'not'"
        return "a number, an indicator, '(' or '-'"
    if "NUMBER" in expected:  # inside an indicator's parentheses
        if "RPAR" in expected:
            return "a whole number, a parameter name or ')'"
        return "a whole number or a parameter name"
    if expected & _OPERATORS:
        return "an operator (and, or, < <= > >= == !=, + - * /) or the end"
    return " or ".join(_EXPECTED.get(name, name) for name in sorted(expected))


def _syntax_error(text: str, exc: lark.UnexpectedInput) -> FormulaError:
    if isinstance(exc, lark.UnexpectedCharacters):
        char = exc.char
        hint = _HINTS.get(char)
        message = f"unexpected character {char!r}" + (f": {hint}" if hint else "")
        return FormulaError(message, text, exc.pos_in_stream or 0)
    if isinstance(exc, lark.UnexpectedToken):
        token = exc.token
        if token.type == "$END":
            expected = _expected(set(exc.expected))
            return FormulaError(f"the formula ends early: expected {expected}", text, len(text))
        if token.type == "RPAR" and not set(exc.expected) & {"RPAR", "NAME", "NUMBER"}:
            return FormulaError("unmatched ')'", text, _at(token))
        message = f"unexpected {str(token)!r}: expected {_expected(set(exc.expected))}"
        return FormulaError(message, text, _at(token))
    return FormulaError("syntax error", text, exc.pos_in_stream or 0)


@functools.cache
def _parser() -> lark.Lark:
    # Built on first use, not at import: worker processes only unpickle formulas.
    return lark.Lark(_GRAMMAR, parser="lalr", transformer=_Builder(), maybe_placeholders=True)


def parse_formula(text: str) -> Formula:
    """Parse and check a scan formula such as ``rsi14 < 30 and close > sma50``.

    The grammar (see ``docs/formulas.md``): numbers; indicator names, with a
    period as a suffix (``sma50``) or integer parameters in parentheses
    (``sma(50)``, ``macd(5,35,5)``); unary ``-``; ``+ - * /``; comparisons
    ``< <= > >= == !=``, chained as in Python; ``not``, ``and``, ``or``;
    parentheses. Keywords and names are case-insensitive. Precedence is
    Python's. The formula as a whole must be a condition.

    Args:
        text: the formula, at most `MAX_FORMULA_LENGTH` characters, and its
            canonical spelling too.

    Returns:
        The checked `Formula`.

    Raises:
        FormulaError: the formula is empty, too long (as written or as
            spelled canonically) or too deep, does not parse, names an
            unknown indicator or an invalid parameter, mixes conditions and
            numbers, or is not a condition. Its ``position`` points at the
            offending character (0 for a canonical spelling too long).
        TypeError: ``text`` is not a string.
    """
    if not isinstance(text, str):
        raise TypeError(f"a formula is a str, got {type(text).__name__}")
    if len(text) > MAX_FORMULA_LENGTH:
        message = f"formula is {len(text)} characters long; the limit is {MAX_FORMULA_LENGTH}"
        raise FormulaError(message, text, MAX_FORMULA_LENGTH)
    if not text.strip():
        raise FormulaError("formula is empty", text, 0)
    try:
        typed = _parser().parse(text)
    except _Problem as problem:
        raise FormulaError(problem.message, text, problem.position) from None
    except lark.UnexpectedInput as exc:
        raise _syntax_error(text, exc) from None
    assert isinstance(typed, _Typed)
    if is_number(typed.node):
        quoted = _quote(typed.node)
        message = f"a formula must be a condition, but {quoted} is a number; compare it"
        raise FormulaError(message, text, typed.position)
    formula = Formula(text, typed.node)  # type: ignore[arg-type]  # a condition, checked above
    # The canonical spelling can be longer than the text (spaces around
    # operators, 1e15 in full): refused here, it could not be parsed back.
    spelled = len(formula.canonical())
    if spelled > MAX_FORMULA_LENGTH:
        message = (
            f"formula is {spelled} characters long once spelled canonically (single spaces "
            f"around operators, numbers in full); the limit is {MAX_FORMULA_LENGTH}"
        )
        raise FormulaError(message, text, 0)
    return formula
