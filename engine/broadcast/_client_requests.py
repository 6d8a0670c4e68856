"""A client's requests: subscribe and unsubscribe messages, their replies, their limits.

A client may change its topics with a JSON message (``{"op": "subscribe",
"topics": [...]}``); it is answered with an acknowledgement or an error.
Messages are reassembled from their frames up to ``max_inbound_size``,
requests are rate limited (a token bucket), and replies waiting to be
written are bounded: past each limit the client is closed with a code.
"""

from __future__ import annotations

import json

import trio
from wsproto import WSConnection
from wsproto.events import CloseConnection, TextMessage

from ._client_queue import FrameQueue
from ._config import CLOSE_POLICY, CLOSE_TOO_BIG, BroadcastConfig
from ._ratelimit import TokenBucket, Verdict
from ._topics import BadRequest, Tokens, parse_request, split

MAX_REPLIES = 32
"""Replies (acks, errors) waiting for a client that sends requests but does not read."""


class ClientRequests(FrameQueue):
    """The request side of a client, between its queue and its connection.

    :class:`~engine.broadcast._client.Client` extends it: it owns ``ws`` and
    ``_close``, writes ``_replies`` before its frames, and says what a
    change of topics means to the server (:meth:`_topics_changed`).

    Args:
        config: the server's settings (``max_inbound_size``, ``request_rate``,
            ``request_burst``, ``max_topics``, ``topic_rules``).
    """

    ws: WSConnection
    _close: CloseConnection | None

    def __init__(self, config: BroadcastConfig) -> None:
        super().__init__(config)
        self.topics: tuple[str, ...] = ()
        self.patterns: tuple[Tokens, ...] = ()
        self._replies: list[bytes] = []
        self._requests = TokenBucket(config.request_rate, config.request_burst)
        self._inbound: list[bytes] = []
        self._inbound_size = 0

    def _topics_changed(self) -> None:
        """A request changed :attr:`topics` (the server routes by them)."""
        raise NotImplementedError

    def _message_part(self, data: str | bytes | bytearray, finished: bool) -> None:
        if self._close is not None:
            return
        part = data.encode() if isinstance(data, str) else bytes(data)
        self._inbound_size += len(part)
        if self._inbound_size > self.config.max_inbound_size:
            limit = self.config.max_inbound_size
            self.request_close(CLOSE_TOO_BIG, f"message over {limit} bytes", "message_too_big")
            return
        self._inbound.append(part)
        if finished:
            message = b"".join(self._inbound)
            self._inbound, self._inbound_size = [], 0
            self._on_request(message)

    def _on_request(self, message: str | bytes) -> None:
        verdict = self._requests.take(trio.current_time())
        if verdict is Verdict.CLOSE:
            self.request_close(CLOSE_POLICY, "too many requests", "rate_limited")
            return
        if verdict is Verdict.REFUSE:
            rate, burst = self.config.request_rate, self.config.request_burst
            limit = f"rate limited: at most {rate:g} requests per second, {burst} at once"
            self._reply({"op": "error", "error": limit})
            return
        try:
            request = parse_request(message, self.config.topic_rules)
            topics = self._apply(request.op, request.patterns)
        except BadRequest as exc:
            self._reply({"op": "error", "id": exc.request_id, "error": str(exc)})
            return
        self._reply({"op": f"{request.op}d", "id": request.request_id, "topics": list(topics)})

    def _apply(self, op: str, patterns: tuple[str, ...]) -> tuple[str, ...]:
        if op == "subscribe":
            topics = tuple(dict.fromkeys(self.topics + patterns))
            if len(topics) > self.config.max_topics:
                raise BadRequest(f"at most {self.config.max_topics} topics per client")
        else:
            topics = tuple(t for t in self.topics if t not in patterns)
        if topics != self.topics:  # a request that changes nothing costs nothing more
            self._set_topics(topics)
            self._topics_changed()
        return topics

    def _set_topics(self, topics: tuple[str, ...]) -> None:
        self.topics = topics
        self.patterns = tuple(split(t) for t in topics)

    def _reply(self, body: dict[str, object]) -> None:
        if len(self._replies) >= MAX_REPLIES:
            self.request_close(CLOSE_POLICY, "too many unread replies", "policy")
            return
        if body.get("id") is None:
            body.pop("id", None)
        self._replies.append(self.ws.send(TextMessage(data=json.dumps(body))))
        self._wake_writer()
