"""Bus messages to client queues: frame each once, offer it to every client that wants it.

Which clients want a topic is worked out once per topic and remembered (a
route). When a client's patterns change, only the difference is applied:
each pattern added is tested against the remembered topics that could match
it, for which the client is added, and each pattern removed against those
the client is in. An index of the remembered topics by token (and by
length, for patterns of wildcards only) narrows "could match" to the topics
that share one of the pattern's tokens in the same place, so a change costs
about as much as the routes it changes, not the size of the memo times the
client's patterns, and a change that changes nothing costs nothing.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from typing import Generic, Protocol, TypeVar

from wsproto.frame_protocol import FrameProtocol

from ..bus import BusMessage, tokens_match
from ._topics import Tokens, split

# Distinct topics whose client lists are remembered; past this the memo
# starts over, so a stream of one-off topics cannot grow it without bound.
ROUTE_CACHE_SIZE = 10_000


class Subscriber(Protocol):
    """What the fanout needs of a client: its patterns, and a queue to offer frames to."""

    @property
    def patterns(self) -> tuple[Tokens, ...]:
        """The client's patterns, split into tokens."""

    def offer(self, frame: bytes) -> None:
        """Queue one frame; never waits."""


C = TypeVar("C", bound=Subscriber)


def _wanted(patterns: Iterable[Tokens], topic: Tokens) -> bool:
    return any(tokens_match(pattern, topic) for pattern in patterns)


class Fanout(Generic[C]):
    """The open clients, which of them want each topic, and the frame encoder.

    Args:
        text: frame payloads as text (they must be UTF-8) rather than binary.
        cache_size: distinct topics whose routes are remembered at most.
    """

    def __init__(self, *, text: bool, cache_size: int = ROUTE_CACHE_SIZE) -> None:
        # Each open client, with the patterns its routes were last brought in line with.
        self._clients: dict[C, frozenset[Tokens]] = {}
        # The clients that want each remembered topic (dicts: adding or
        # removing one client is one operation, whatever the others).
        self._routes: dict[str, dict[C, None]] = {}
        self._tokens: dict[str, Tokens] = {}  # each remembered topic, split
        # The remembered topics by (position, token), and by their number of tokens.
        self._by_token: dict[tuple[int, str], list[str]] = {}
        self._by_length: dict[int, list[str]] = {}
        self._cache_size = cache_size
        # wsproto's frame layer on its own, used only to build frames: server
        # frames are unmasked and no extension is negotiated, so one frame's
        # bytes are right for every client, and no connection state is
        # needed (Connection.send's event dispatch costs more than framing).
        self._encoder = FrameProtocol(client=False, extensions=[])
        self._text = text
        self.received = 0
        self.unrouted = 0
        self.invalid = 0

    def __len__(self) -> int:
        return len(self._clients)

    @property
    def clients(self) -> tuple[C, ...]:
        """The open clients."""
        return tuple(self._clients)

    def routes(self) -> dict[str, frozenset[C]]:
        """A snapshot of the remembered routes: each topic and the clients that want it."""
        return {topic: frozenset(clients) for topic, clients in self._routes.items()}

    def add(self, client: C) -> None:
        """Route matching topics to a newly opened client."""
        self._clients.setdefault(client, frozenset())
        self.update(client)

    def update(self, client: C) -> None:
        """Bring the remembered routes in line with ``client``'s patterns (if it is open)."""
        routed = self._clients.get(client)
        if routed is None:
            return
        patterns = frozenset(client.patterns)
        if patterns != routed:
            self._clients[client] = patterns
            self._reroute(client, routed, patterns)

    def remove(self, client: C) -> None:
        """Forget a closed client."""
        routed = self._clients.pop(client, None)
        if routed:
            self._reroute(client, routed, frozenset())

    def dispatch(self, messages: Sequence[BusMessage]) -> None:
        """Frame each message once and offer the frame to every client that wants it."""
        routes = self._routes
        for message in messages:
            clients = routes.get(message.topic)
            if clients is None:
                clients = self._route(message.topic)
            if not clients:
                self.unrouted += 1
                continue
            frame = self._frame(message.data)
            if frame is not None:
                for client in clients:
                    client.offer(frame)
        self.received += len(messages)

    def _frame(self, data: bytes) -> bytes | None:
        if not self._text:
            return bytes(self._encoder.send_data(data))
        try:
            text = data.decode()
        except UnicodeDecodeError:
            self.invalid += 1
            return None
        return bytes(self._encoder.send_data(text))

    def _route(self, topic: str) -> dict[C, None]:
        if len(self._routes) >= self._cache_size:
            self._forget_routes()
        tokens = split(topic)
        clients = dict.fromkeys(
            c for c, patterns in self._clients.items() if _wanted(patterns, tokens)
        )
        self._routes[topic] = clients
        self._tokens[topic] = tokens
        for position, token in enumerate(tokens):
            self._by_token.setdefault((position, token), []).append(topic)
        self._by_length.setdefault(len(tokens), []).append(topic)
        return clients

    def _forget_routes(self) -> None:
        self._routes.clear()
        self._tokens.clear()
        self._by_token.clear()
        self._by_length.clear()

    def _reroute(self, client: C, old: frozenset[Tokens], new: frozenset[Tokens]) -> None:
        """Apply a change of ``client``'s patterns from ``old`` to ``new`` to the routes."""
        routes, tokens = self._routes, self._tokens
        for pattern in old - new:  # only routes the client is in, that this pattern matches
            for topic in self._candidates(pattern):
                clients = routes[topic]
                if (
                    client in clients
                    and tokens_match(pattern, tokens[topic])
                    and not _wanted(new, tokens[topic])
                ):
                    del clients[client]
        for pattern in new - old:  # only routes the client is not in yet
            for topic in self._candidates(pattern):
                clients = routes[topic]
                if client not in clients and tokens_match(pattern, tokens[topic]):
                    clients[client] = None

    def _candidates(self, pattern: Tokens) -> Iterable[str]:
        """The remembered topics ``pattern`` could match: a superset, found by the index."""
        rest = pattern[-1] == ">"
        fixed = pattern[:-1] if rest else pattern
        fewest: list[str] | None = None
        for position, token in enumerate(fixed):
            if token != "*":
                found = self._by_token.get((position, token), [])
                if fewest is None or len(found) < len(fewest):
                    fewest = found
        if fewest is not None:
            return fewest
        # Wildcards only: ``*.*`` matches topics of two tokens, ``*.>`` of more than one.
        if not rest:
            return self._by_length.get(len(fixed), [])
        return itertools.chain.from_iterable(
            topics for length, topics in self._by_length.items() if length > len(fixed)
        )
