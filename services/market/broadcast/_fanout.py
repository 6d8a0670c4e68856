"""Bus messages to client queues: frame each once, offer it to every client that wants it."""

from __future__ import annotations

from collections.abc import Sequence

from wsproto.frame_protocol import FrameProtocol

from engine.bus import BusMessage, tokens_match

from ._client import Client
from ._topics import split

# Distinct topics whose client lists are remembered; past this the memo
# starts over, so a stream of one-off topics cannot grow it without bound.
ROUTE_CACHE_SIZE = 10_000


def _wants(client: Client, topic: tuple[str, ...]) -> bool:
    return any(tokens_match(pattern, topic) for pattern in client.patterns)


class Fanout:
    """The open clients, which of them want each topic, and the frame encoder.

    Args:
        text: frame payloads as text (they must be UTF-8) rather than binary.
    """

    def __init__(self, *, text: bool) -> None:
        self._clients: dict[Client, None] = {}
        self._routes: dict[str, tuple[Client, ...]] = {}
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
    def clients(self) -> tuple[Client, ...]:
        """The open clients."""
        return tuple(self._clients)

    def add(self, client: Client) -> None:
        """Route matching topics to a newly opened client."""
        self._clients[client] = None
        self.update(client)

    def update(self, client: Client) -> None:
        """Bring the remembered routes in line with ``client``'s topics."""
        routes = self._routes
        for topic, clients in routes.items():  # values change, keys do not
            wanted = client in self._clients and _wants(client, split(topic))
            present = client in clients
            if wanted and not present:
                routes[topic] = (*clients, client)
            elif present and not wanted:
                routes[topic] = tuple(c for c in clients if c is not client)

    def remove(self, client: Client) -> None:
        """Forget a closed client."""
        if client in self._clients:
            del self._clients[client]
            self.update(client)

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

    def _route(self, topic: str) -> tuple[Client, ...]:
        tokens = split(topic)
        clients = tuple(c for c in self._clients if _wants(c, tokens))
        if len(self._routes) >= ROUTE_CACHE_SIZE:
            self._routes.clear()
        self._routes[topic] = clients
        return clients
