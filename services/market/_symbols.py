"""Exchange symbols in the settings of the service's parts: one rule for all of them."""

from __future__ import annotations

import re
from collections.abc import Iterable

import attrs

_SYMBOL = re.compile(r"[A-Z0-9]{2,20}")


def to_symbols(value: Iterable[str]) -> tuple[str, ...]:
    """An attrs converter: symbol names as a tuple; a lone string (``"BTCUSDT"``) is refused.

    Raises:
        TypeError: ``value`` is a string.
    """
    if isinstance(value, str):
        raise TypeError(f"symbols must be a sequence of symbol names, got the string {value!r}")
    return tuple(value)


def check_symbol(name: str, symbol: object) -> str:
    """An upper-case Binance symbol such as ``"BTCUSDT"``; ``name`` is the setting's name.

    Raises:
        ValueError: ``symbol`` is not one, with ``name`` in the message.
    """
    if not isinstance(symbol, str) or not _SYMBOL.fullmatch(symbol):
        raise ValueError(
            f"{name} must hold upper-case Binance symbols like 'BTCUSDT', got {symbol!r}"
        )
    return symbol


def check_symbols(
    instance: object, attribute: attrs.Attribute[tuple[str, ...]], symbols: tuple[object, ...]
) -> None:
    """An attrs validator: at least one symbol, each as :func:`check_symbol` says, none twice.

    Raises:
        ValueError: naming the field.
    """
    if not symbols:
        raise ValueError(f"{attribute.name} must name at least one symbol, got none")
    for symbol in symbols:
        check_symbol(attribute.name, symbol)
    if len(set(symbols)) != len(symbols):
        raise ValueError(f"{attribute.name} must not repeat, got {list(symbols)!r}")
