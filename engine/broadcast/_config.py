"""The broadcast server's settings and the close codes it sends."""

from __future__ import annotations

import enum
import functools
import math
from collections.abc import Callable, Iterable
from typing import Any

import attrs

from .._validation import check_choice, check_count, check_duration, check_name
from ._topics import TopicRules, parse_pattern

CLOSE_GOING_AWAY = 1001
"""Sent to every client when the server shuts down (or its bus closes)."""
CLOSE_POLICY = 1008
"""Sent when a client breaks a rule that has no code of its own (too many requests)."""
CLOSE_TOO_BIG = 1009
"""Sent when a client's message is larger than ``max_inbound_size``."""
CLOSE_PING_TIMEOUT = 1011
"""Sent when a client did not answer a keepalive ping within ``ping_timeout``."""
CLOSE_TOO_SLOW = 4000
"""Sent when a client is more than ``max_lag`` seconds behind (or lost more than ``max_lost``)."""


class FrameType(enum.StrEnum):
    """How bus payloads are framed for the clients."""

    TEXT = "text"
    """Text frames: the payload must be UTF-8 (JSON is); others are counted as invalid."""
    BINARY = "binary"
    """Binary frames: any bytes."""


Validator = Callable[[object, "attrs.Attribute[Any]", Any], None]


def _duration(*, allow_zero: bool = False, allow_inf: bool = True) -> Validator:
    def check(instance: object, attribute: attrs.Attribute[float], value: float) -> None:
        check_duration(attribute.name, value, allow_zero=allow_zero)
        if not allow_inf and math.isinf(value):
            raise ValueError(f"{attribute.name} must be finite, got {value!r}")

    return check


def _count(minimum: int) -> Validator:
    def check(instance: object, attribute: attrs.Attribute[int], value: int) -> None:
        check_count(attribute.name, value, minimum=minimum)

    return check


def _port(instance: object, attribute: attrs.Attribute[int], value: int) -> None:
    check_count("port", value)
    if value > 65535:
        raise ValueError(f"port must be <= 65535, got {value!r}")


def _name(instance: object, attribute: attrs.Attribute[str], value: str) -> None:
    check_name(attribute.name, value)


def _path(instance: object, attribute: attrs.Attribute[str], value: str) -> None:
    if not isinstance(value, str) or not value.startswith("/") or "?" in value:
        raise ValueError(f"path must start with '/' and have no query, got {value!r}")


def _bus_topics(
    instance: object, attribute: attrs.Attribute[tuple[str, ...]], value: tuple[str, ...]
) -> None:
    if not value:
        raise ValueError("bus_topics must name at least one topic pattern")
    for pattern in value:
        if pattern != parse_pattern(pattern):
            raise ValueError(f"bus_topics: {pattern!r} must be a full pattern such as 'trades.>'")


def _origins(
    instance: object, attribute: attrs.Attribute[tuple[str, ...] | None], value: object
) -> None:
    if value is None:
        return
    if not isinstance(value, tuple) or not all(isinstance(o, str) and o for o in value):
        raise ValueError(f"allowed_origins must be None or non-empty strings, got {value!r}")


def _token(instance: object, attribute: attrs.Attribute[str | None], value: object) -> None:
    if value is None:
        return
    if not isinstance(value, str) or not value or not value.isascii() or " " in value:
        raise ValueError("token must be None or a non-empty ASCII string without spaces")


def _kinds(
    instance: object, attribute: attrs.Attribute[tuple[str, ...] | None], value: object
) -> None:
    if value is None:
        return
    if not isinstance(value, tuple) or not value:
        raise ValueError(f"known_kinds must be None or name at least one kind, got {value!r}")
    for kind in value:
        try:
            plain = isinstance(kind, str) and parse_pattern(kind) == f"{kind}.>"
        except ValueError:
            plain = False
        if not plain:
            raise ValueError(f"known_kinds: {kind!r} must be one plain token such as 'trades'")


def _kinds_tuple(value: Iterable[str] | str | None) -> tuple[str, ...] | str | None:
    # A lone string stays one, for the validator to refuse: tuple("trades")
    # would be six one-letter kinds.
    return value if value is None or isinstance(value, str) else tuple(value)


def _optional_count(minimum: int) -> Validator:
    def check(instance: object, attribute: attrs.Attribute[int | None], value: int | None) -> None:
        if value is not None:
            check_count(attribute.name, value, minimum=minimum)

    return check


def _rate(instance: object, attribute: attrs.Attribute[float], value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{attribute.name} must be a number per second, got {value!r}")
    if math.isnan(value) or value <= 0:
        raise ValueError(f"{attribute.name} must be > 0 (math.inf: no limit), got {value!r}")


def _frame(instance: object, attribute: attrs.Attribute[str], value: str) -> None:
    check_choice("frame", value, FrameType)


def _tuple(value: Iterable[str]) -> tuple[str, ...]:
    return tuple(value)


def _optional_tuple(value: Iterable[str] | None) -> tuple[str, ...] | None:
    return None if value is None else tuple(value)


@attrs.frozen
class BroadcastConfig:
    """Settings of :func:`serve_broadcast`; every field is checked when it is built.

    Attributes:
        host: the address to bind.
        port: the port to bind; 0 picks a free one (see ``BroadcastServer.port``).
        path: the WebSocket endpoint's path; other paths are answered 404.
        bus_topics: the bus patterns the server subscribes to, once for all
            clients; each client picks a subset. Patterns must not overlap
            (a message matching two would be sent twice).
        bus_queue_size: the bound of the server's own bus subscription
            (``drop_oldest``; the bus counts what it drops).
        max_clients: connected clients at most; more are answered 503.
        max_handshaking: connections still in the HTTP upgrade at once, at
            most; a connection accepted past it is answered 503 at once,
            before its request is read (counted as ``busy``). Each may take
            up to ``handshake_timeout``, so this bounds what connections
            that never finish their upgrade can hold.
        queue_size: each client's queue of frames not yet written; when it
            is full, the oldest frame is dropped (and counted) for each new one.
        max_lag: seconds the oldest frame not yet written to a client may
            wait; a client further behind is disconnected with
            ``CLOSE_TOO_SLOW``. Checked every ``min(1, max_lag / 4)``
            seconds; ``math.inf`` disables it. A client that keeps up on
            average catches up within it after a burst, however many
            messages the burst holds.
        max_lost: if set, a client whose queue overflowed, losing its
            oldest frames, more than this many times in total is also
            disconnected with ``CLOSE_TOO_SLOW``; 0 disconnects at the first
            loss. ``None`` (the default): losses alone close no client.
        max_topics: topic patterns one client may hold. A request is refused
            (HTTP 400, or an error reply) if it would produce more, counted
            before any is built.
        known_kinds: the kinds (first topic tokens) the bus carries, such as
            ``("trades", "book")``; a client pattern of another kind is
            refused with the list. ``None`` accepts any kind. Either way, a
            pattern that overlaps none of ``bus_topics`` is refused.
        max_clients_per_ip: connections one IP address may hold at most,
            open clients and connections still in the upgrade alike; a
            connection accepted past it is answered 503 at once, before its
            request is read (counted as ``per_ip``). ``None``: no limit.
        request_rate: control messages (subscribe, unsubscribe) per second
            one client may send on average; ``math.inf`` disables the limit.
        request_burst: control messages a client may send at once. Past
            the rate and burst, a message gets an error reply and still
            counts; a client that sends ``request_burst`` more while refused
            is closed with ``CLOSE_POLICY`` (cause ``rate_limited``).
        max_inbound_size: bytes of one client message (a subscribe request)
            at most; larger closes the connection with ``CLOSE_TOO_BIG``.
        allowed_origins: if set, a request carrying an ``Origin`` header not
            in it is answered 403. Requests without ``Origin`` (non-browser
            clients, which could send any Origin anyway) are let through.
        token: if set, clients must send ``Authorization: Bearer <token>``
            or ``?token=<token>``; otherwise they are answered 401.
        ping_interval: seconds between keepalive pings; ``math.inf`` disables.
        ping_timeout: seconds a ping may go unanswered before the client is
            closed with ``CLOSE_PING_TIMEOUT``.
        handshake_timeout: seconds a new connection has to complete the
            HTTP upgrade.
        close_timeout: seconds a closing client gets to receive our close
            frame and answer it (a slow client first finishes the write in
            progress); then the TCP connection is dropped.
        frame: ``"text"`` (default; payloads must be UTF-8) or ``"binary"``.
        name: for statistics and logs.
    """

    host: str = attrs.field(default="127.0.0.1", validator=_name)
    port: int = attrs.field(default=0, validator=_port)
    path: str = attrs.field(default="/ws", validator=_path)
    bus_topics: tuple[str, ...] = attrs.field(
        default=(">",), converter=_tuple, validator=_bus_topics
    )
    bus_queue_size: int = attrs.field(default=10_000, validator=_count(1))
    max_clients: int = attrs.field(default=1000, validator=_count(1))
    max_handshaking: int = attrs.field(default=128, validator=_count(1))
    # Well above the dispatcher's batch (MAX_DISPATCH, 1,024), and above a
    # burst of 20,000 messages, so that a client keeping up on average loses
    # nothing to one: time behind (max_lag) is what closes a slow client.
    queue_size: int = attrs.field(default=32_768, validator=_count(1))
    max_lag: float = attrs.field(default=10.0, validator=_duration())
    max_lost: int | None = attrs.field(default=None, validator=_optional_count(0))
    max_topics: int = attrs.field(default=64, validator=_count(1))
    known_kinds: tuple[str, ...] | None = attrs.field(
        default=None, converter=_kinds_tuple, validator=_kinds
    )
    max_clients_per_ip: int | None = attrs.field(default=None, validator=_optional_count(1))
    request_rate: float = attrs.field(default=10.0, validator=_rate)
    request_burst: int = attrs.field(default=20, validator=_count(1))
    max_inbound_size: int = attrs.field(default=4096, validator=_count(1))
    allowed_origins: tuple[str, ...] | None = attrs.field(
        default=None, converter=_optional_tuple, validator=_origins
    )
    token: str | None = attrs.field(default=None, validator=_token, repr=False)
    ping_interval: float = attrs.field(default=20.0, validator=_duration())
    ping_timeout: float = attrs.field(default=20.0, validator=_duration(allow_inf=False))
    handshake_timeout: float = attrs.field(default=10.0, validator=_duration(allow_inf=False))
    close_timeout: float = attrs.field(default=5.0, validator=_duration(allow_inf=False))
    frame: str = attrs.field(default="text", validator=_frame)
    name: str = attrs.field(default="broadcast", validator=_name)

    @functools.cached_property
    def topic_rules(self) -> TopicRules:
        """What clients may subscribe to, as these settings say (built once)."""
        return TopicRules(self.max_topics, self.bus_topics, self.known_kinds)
