"""Topic patterns clients choose, in the query string or in a subscribe message.

Bus topics are dot-separated tokens (``trades.BTCUSDT``); patterns use ``*``
for one token and a final ``>`` for the rest, as the bus does. A client may
name a bare kind (``trades``), which means every symbol of that kind
(``trades.>``), and may list ``symbols`` to narrow bare kinds to them.
"""

from __future__ import annotations

import json
import urllib.parse
from collections.abc import Iterable, Sequence

import attrs

Tokens = tuple[str, ...]

MAX_PATTERN_LENGTH = 200
"""Characters of one pattern at most: a topic is a kind and a symbol, not an essay."""

OPS = ("subscribe", "unsubscribe")


def _check_token(text: str, token: str, *, wildcards: bool) -> None:
    if not token:
        raise ValueError(f"topic {text!r} has an empty token")
    if not all(33 <= ord(c) <= 126 for c in token):
        raise ValueError(f"topic {text!r}: tokens are printable ASCII without spaces")
    if "*" in token or ">" in token:
        kind = "wildcards must be whole tokens" if wildcards else "no wildcards allowed"
        raise ValueError(f"topic {text!r}: {kind}")


def parse_pattern(text: object) -> str:
    """Check one pattern a client sent and return it in full form.

    A bare kind such as ``trades`` becomes ``trades.>``; ``>`` alone is every topic.

    Raises:
        ValueError: not a string, empty, too long, an empty token, a space
            or control character, or a misplaced wildcard.
    """
    if not isinstance(text, str) or not text:
        raise ValueError(f"a topic must be a non-empty string, got {text!r}")
    if len(text) > MAX_PATTERN_LENGTH:
        raise ValueError(f"a topic must be at most {MAX_PATTERN_LENGTH} characters")
    tokens = text.split(".")
    for index, token in enumerate(tokens):
        if token == "*" or (token == ">" and index == len(tokens) - 1):
            continue
        _check_token(text, token, wildcards=True)
    if len(tokens) == 1 and text not in ("*", ">"):
        return f"{text}.>"
    return text


def expand(topics: Iterable[object], symbols: Iterable[object]) -> list[str]:
    """Full patterns for ``topics`` narrowed to ``symbols``.

    With symbols, a bare kind becomes one pattern per symbol
    (``trades`` + ``BTCUSDT`` -> ``trades.BTCUSDT``) and no topics at all
    means every kind (``*.BTCUSDT``); longer patterns are kept as given.

    Raises:
        ValueError: a bad topic or symbol.
    """
    names = []
    for symbol in symbols:
        if not isinstance(symbol, str) or not symbol:
            raise ValueError(f"a symbol must be a non-empty string, got {symbol!r}")
        _check_token(symbol, symbol, wildcards=False)
        names.append(symbol)
    patterns: list[str] = []
    for topic in topics:
        pattern = parse_pattern(topic)
        if names and isinstance(topic, str) and pattern == f"{topic}.>":
            patterns.extend(parse_pattern(f"{topic}.{name}") for name in names)
        else:
            patterns.append(pattern)
    if names and not patterns:
        patterns = [parse_pattern(f"*.{name}") for name in names]
    return list(dict.fromkeys(patterns))


def split(pattern: str) -> Tokens:
    """A checked pattern (or a topic) as tokens."""
    return tuple(pattern.split("."))


@attrs.frozen
class Target:
    """What a client's request line asked for, before any check.

    Attributes:
        path: the path, without the query.
        topics: the ``topics`` parameters, split at commas.
        symbols: the ``symbols`` parameters, split at commas.
        token: the last ``token`` parameter, if any.
    """

    path: str
    topics: tuple[str, ...]
    symbols: tuple[str, ...]
    token: str | None


def _comma_list(values: Sequence[str]) -> tuple[str, ...]:
    return tuple(item for value in values for item in value.split(",") if item)


def parse_target(target: str) -> Target:
    """Split the request target: ``/ws?topics=trades,book.BTCUSDT&symbols=ETHUSDT``.

    ``topics`` and ``symbols`` are comma-separated and may repeat; other
    parameters are ignored. Nothing is checked here (see :func:`expand`).
    """
    parts = urllib.parse.urlsplit(target)
    query = urllib.parse.parse_qs(parts.query, keep_blank_values=True)
    tokens = query.get("token")
    return Target(
        parts.path,
        _comma_list(query.get("topics", [])),
        _comma_list(query.get("symbols", [])),
        tokens[-1] if tokens else None,
    )


class BadRequest(ValueError):
    """A client's message is not a valid request; the reply quotes ``request_id``."""

    def __init__(self, message: str, request_id: str | int | None = None) -> None:
        super().__init__(message)
        self.request_id = request_id


@attrs.frozen
class Request:
    """A client's subscribe or unsubscribe message.

    Attributes:
        op: ``"subscribe"`` or ``"unsubscribe"``.
        patterns: the full patterns it names.
        request_id: the client's ``id``, echoed in the reply.
    """

    op: str
    patterns: tuple[str, ...]
    request_id: str | int | None


def parse_request(data: str | bytes) -> Request:
    """Read ``{"op": "subscribe", "topics": [...], "symbols": [...], "id": 1}``.

    Raises:
        BadRequest: not JSON, not an object, an unknown ``op``, or bad topics.
    """
    try:
        message = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise BadRequest("a request must be a JSON object") from None
    if not isinstance(message, dict):
        raise BadRequest("a request must be a JSON object")
    request_id = message.get("id")
    if isinstance(request_id, bool) or not isinstance(request_id, str | int | None):
        raise BadRequest("id must be a string or an integer")
    op = message.get("op")
    if op not in OPS:
        raise BadRequest(f"op must be 'subscribe' or 'unsubscribe', got {op!r}", request_id)
    topics, symbols = message.get("topics", []), message.get("symbols", [])
    if not isinstance(topics, list) or not isinstance(symbols, list):
        raise BadRequest("topics and symbols must be lists of strings", request_id)
    if not topics and not symbols:
        raise BadRequest("name at least one topic or symbol", request_id)
    try:
        patterns = expand(topics, symbols)
    except ValueError as exc:
        raise BadRequest(str(exc), request_id) from None
    return Request(op, tuple(patterns), request_id)
