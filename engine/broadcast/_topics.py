"""Topic patterns clients choose, in the query string or in a subscribe message.

Bus topics are dot-separated tokens (``trades.BTCUSDT``); patterns use ``*``
for one token and a final ``>`` for the rest, as the bus does. A client may
name a bare kind (``trades``), which means every symbol of that kind
(``trades.>``), and may list ``symbols`` to narrow bare kinds to them.

Everything here is bounded before it is built: a request lists at most
``MAX_LISTED`` topics and as many symbols, duplicates are removed first, and
the number of patterns the request would produce is counted, and checked
against the client's limit, before any of them is made.
"""

from __future__ import annotations

import json
import urllib.parse
from collections.abc import Sequence

import attrs

Tokens = tuple[str, ...]

MAX_PATTERN_LENGTH = 200
"""Characters of one pattern at most: a topic is a kind and a symbol, not an essay."""
MAX_LISTED = 1024
"""Topics, and symbols, one request may list at most, counted before duplicates are removed."""

OPS = ("subscribe", "unsubscribe")


class TooManyTopics(ValueError):
    """A request lists, or would produce, more patterns than allowed."""


class UnknownTopic(ValueError):
    """A pattern that can never match anything the server carries."""


def _check_token(text: str, token: str, *, wildcards: bool) -> None:
    if not token:
        raise ValueError(f"topic {text!r} has an empty token")
    if not all(33 <= ord(c) <= 126 for c in token):
        raise ValueError(f"topic {text!r}: tokens are printable ASCII without spaces")
    if "*" in token or ">" in token:
        kind = "wildcards must be whole tokens" if wildcards else "no wildcards allowed"
        raise ValueError(f"topic {text!r}: {kind}")


def _is_kind(text: str) -> bool:
    """A bare kind (``trades``): one token, not a wildcard."""
    return "." not in text and text not in ("*", ">")


def parse_pattern(text: object) -> str:
    """Check one pattern a client sent and return it in full form.

    A bare kind such as ``trades`` becomes ``trades.>``; ``>`` alone is every topic.

    Raises:
        ValueError: not a string, empty, too long, an empty token, a space
            or control character, or a misplaced wildcard.
    """
    if not isinstance(text, str):
        raise ValueError(f"a topic must be a non-empty string, got {type(text).__name__}")
    if not text:
        raise ValueError("a topic must be a non-empty string, got ''")
    if len(text) > MAX_PATTERN_LENGTH:
        raise ValueError(f"a topic must be at most {MAX_PATTERN_LENGTH} characters")
    tokens = text.split(".")
    for index, token in enumerate(tokens):
        if token == "*" or (token == ">" and index == len(tokens) - 1):
            continue
        _check_token(text, token, wildcards=True)
    if _is_kind(text):
        return f"{text}.>"
    return text


def _listed(what: str, values: Sequence[object]) -> dict[str, None]:
    """The distinct strings of ``values``, in order; the count is checked first."""
    if len(values) > MAX_LISTED:
        raise TooManyTopics(f"at most {MAX_LISTED} {what} in one request, got {len(values)}")
    strings: list[str] = []
    for value in values:
        if not isinstance(value, str):
            raise ValueError(f"{what} must be strings, got {type(value).__name__}")
        strings.append(value)
    return dict.fromkeys(strings)


def _check_symbol(symbol: str) -> None:
    if not symbol:
        raise ValueError("a symbol must be a non-empty string, got ''")
    if len(symbol) > MAX_PATTERN_LENGTH:
        raise ValueError(f"a symbol must be at most {MAX_PATTERN_LENGTH} characters")
    _check_token(symbol, symbol, wildcards=False)


def expand(topics: Sequence[object], symbols: Sequence[object], *, limit: int) -> list[str]:
    """Full patterns for ``topics`` narrowed to ``symbols``, at most ``limit`` of them.

    With symbols, a bare kind becomes one pattern per symbol
    (``trades`` + ``BTCUSDT`` -> ``trades.BTCUSDT``) and no topics at all
    means every kind (``*.BTCUSDT``); longer patterns are kept as given.
    Duplicates are removed, and the patterns counted, before any is built.

    Raises:
        TooManyTopics: more than ``MAX_LISTED`` topics or symbols listed,
            or more than ``limit`` distinct patterns.
        ValueError: a bad topic or symbol.
    """
    names = _listed("symbols", symbols)
    for name in names:
        _check_symbol(name)
    # Each distinct topic's full pattern, or None for a bare kind that the
    # symbols narrow (it becomes one pattern per symbol).
    parsed: dict[str, str | None] = {}
    for topic in _listed("topics", topics):
        full = parse_pattern(topic)
        parsed[topic] = None if names and _is_kind(topic) else full
    _check_count(parsed, names, limit)
    if names and not parsed:
        return [f"*.{name}" for name in names]
    patterns: list[str] = []
    for topic, pattern in parsed.items():
        if pattern is None:
            patterns.extend(f"{topic}.{name}" for name in names)
        else:
            patterns.append(pattern)
    return list(dict.fromkeys(patterns))


def _check_count(parsed: dict[str, str | None], names: dict[str, None], limit: int) -> None:
    """Count the distinct patterns ``expand`` would build, and check them, building none."""
    kinds = [topic for topic, pattern in parsed.items() if pattern is None]
    kept = {pattern for pattern in parsed.values() if pattern is not None}
    if names and not parsed:
        count, longest = len(names), 1
    else:
        # A pattern given in full that a kind and a symbol also spell is one pattern.
        both = sum(1 for p in kept if p.count(".") == 1 and _spelled(p, parsed, names))
        count = len(kinds) * len(names) + len(kept) - both
        longest = max(map(len, kinds), default=0)
    if count > limit:
        raise TooManyTopics(f"at most {limit} topics, got {count}")
    if longest and longest + 1 + max(map(len, names)) > MAX_PATTERN_LENGTH:
        raise ValueError(f"a topic must be at most {MAX_PATTERN_LENGTH} characters")


def _spelled(pattern: str, parsed: dict[str, str | None], names: dict[str, None]) -> bool:
    kind, _, name = pattern.partition(".")
    return parsed.get(kind, "") is None and name in names


def split(pattern: str) -> Tokens:
    """A checked pattern (or a topic) as tokens."""
    return tuple(pattern.split("."))


def overlap(a: Tokens, b: Tokens) -> bool:
    """Whether some topic matches both patterns (``*`` one token, a final ``>`` the rest)."""
    for x, y in zip(a, b, strict=False):
        if x == ">" or y == ">":
            return True  # both have a token here; the rest can be anything
        if x != y and x != "*" and y != "*":
            return False
    return len(a) == len(b)


@attrs.frozen
class TopicRules:
    """What a client may subscribe to: how many patterns, and which can ever match.

    Attributes:
        limit: distinct patterns one client may hold.
        carried: the patterns the server subscribes to on the bus; a client
            pattern that overlaps none of them would never receive anything.
        kinds: the first tokens the bus carries (``trades``, ``book``, ...),
            or ``None`` to accept any.
    """

    limit: int
    carried: tuple[str, ...] = (">",)
    kinds: tuple[str, ...] | None = None

    def patterns(
        self, topics: Sequence[object], symbols: Sequence[object], *, subscribe: bool = True
    ) -> list[str]:
        """:func:`expand` within ``limit``, then, to subscribe, :meth:`check_known`.

        Raises:
            TooManyTopics: too many topics, symbols or patterns.
            UnknownTopic: a pattern that can never match (to subscribe only).
            ValueError: a bad topic or symbol.
        """
        patterns = expand(topics, symbols, limit=self.limit)
        if subscribe:
            self.check_known(patterns)
        return patterns

    def check_known(self, patterns: Sequence[str]) -> None:
        """Refuse a pattern of an unknown kind, or one that overlaps nothing carried.

        Raises:
            UnknownTopic: the first such pattern, with the valid kinds or
                the carried patterns in its message.
        """
        carried = [split(c) for c in self.carried]
        for pattern in patterns:
            tokens = split(pattern)
            if self.kinds is not None and tokens[0] not in ("*", ">", *self.kinds):
                valid = ", ".join(self.kinds)
                raise UnknownTopic(f"unknown topic {pattern!r}: the kinds are {valid}")
            if not any(overlap(tokens, c) for c in carried):
                valid = ", ".join(self.carried)
                raise UnknownTopic(f"topic {pattern!r} matches nothing served here: {valid}")


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

    Raises:
        ValueError: a target that cannot be split (``//[``: a bad IPv6 host).
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


def parse_request(data: str | bytes, rules: TopicRules) -> Request:
    """Read ``{"op": "subscribe", "topics": [...], "symbols": [...], "id": 1}``.

    Raises:
        BadRequest: not JSON (or nested too deep to read), not an object, an
            unknown ``op``, or topics that ``rules`` refuse.
    """
    try:
        message = json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise BadRequest("a request must be a JSON object") from None
    if not isinstance(message, dict):
        raise BadRequest("a request must be a JSON object")
    request_id = message.get("id")
    if isinstance(request_id, bool) or not isinstance(request_id, str | int | None):
        raise BadRequest("id must be a string or an integer")
    op = message.get("op")
    if not isinstance(op, str) or op not in OPS:
        shown = type(op).__name__ if isinstance(op, list | dict) else repr(op)[:40]
        raise BadRequest(f"op must be 'subscribe' or 'unsubscribe', got {shown}", request_id)
    topics, symbols = message.get("topics", []), message.get("symbols", [])
    if not isinstance(topics, list) or not isinstance(symbols, list):
        raise BadRequest("topics and symbols must be lists of strings", request_id)
    if not topics and not symbols:
        raise BadRequest("name at least one topic or symbol", request_id)
    try:
        patterns = rules.patterns(topics, symbols, subscribe=op == "subscribe")
    except ValueError as exc:
        raise BadRequest(str(exc), request_id) from None
    return Request(op, tuple(patterns), request_id)
