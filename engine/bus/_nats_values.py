"""The values of the NATS bus: its connection states, its settings and its statistics."""

from __future__ import annotations

import enum
import ssl
from typing import Literal

import attrs

from .._counters import Tally, counter_metric, gauge_metric, metric_source
from .._hub import SubscriptionStatistics


class NatsState(enum.StrEnum):
    """The connection's state, as nats-py reports it."""

    CONNECTED = "connected"
    """Connected to a server."""
    RECONNECTING = "reconnecting"
    """Lost the server; nats-py is reconnecting by itself."""
    CLOSED = "closed"
    """The bus is closed."""


# The enum's values again as a Literal (a type checker cannot derive one from
# the other), as every option enum of the engine is declared.
NatsStateName = Literal["connected", "reconnecting", "closed"]
"""The values of :class:`NatsState`, as the strings ``NatsBus.wait_state`` also accepts."""


@metric_source(label="bus")
@attrs.frozen
class NatsStatistics:
    """A snapshot of a :class:`NatsBus`.

    Attributes:
        name: the bus's name.
        url: the server URL with any credentials masked.
        stream: the JetStream stream, or ``None`` for core NATS.
        state: ``connected``, ``reconnecting`` or ``closed``.
        connected: 1 while connected to a server, else 0 (``state`` as a gauge).
        published: core: messages queued by :meth:`NatsBus.publish`;
            JetStream: messages the stream acknowledged.
        unsent: core publishes nats-py refused (its reconnect buffer was
            full while the server was away), and pipelined JetStream
            publishes still unconfirmed when the bus closed. Core publishes
            written to a connection just before it broke are lost without a
            trace: core NATS is at most once.
        duplicates: JetStream publishes the server recognised by msg_id and
            did not store again.
        publish_retries: JetStream publishes sent again after no answer.
        unconfirmed: JetStream publishes in flight (``max_unconfirmed > 0``).
        received: messages that arrived for a subscription (queued, or
            dropped by its policy).
        acked: messages acked.
        redelivered: JetStream messages delivered more than once.
        dropped: messages discarded: by the subscriptions' overflow policies,
            after a ``disconnect``, or by nats-py for a slow consumer.
        reconnects: times the connection came back after a loss.
        subscriptions: one snapshot per live subscription.
    """

    name: str
    url: str
    stream: str | None
    state: str
    connected: int = attrs.field(metadata=gauge_metric("1 while connected to a server, else 0"))
    published: int = attrs.field(default=0, metadata=counter_metric("Messages published"))
    unsent: int = attrs.field(default=0, metadata=counter_metric("Publishes never sent"))
    duplicates: int = attrs.field(
        default=0, metadata=counter_metric("JetStream publishes de-duplicated by msg_id")
    )
    publish_retries: int = attrs.field(
        default=0, metadata=counter_metric("JetStream publishes sent again")
    )
    unconfirmed: int = attrs.field(
        default=0, metadata=gauge_metric("JetStream publishes awaiting the stream's answer")
    )
    received: int = attrs.field(default=0, metadata=counter_metric("Messages received"))
    acked: int = attrs.field(default=0, metadata=counter_metric("Messages acked"))
    redelivered: int = attrs.field(
        default=0, metadata=counter_metric("JetStream messages delivered again")
    )
    dropped: int = attrs.field(default=0, metadata=counter_metric("Messages discarded"))
    reconnects: int = attrs.field(default=0, metadata=counter_metric("Reconnections"))
    subscriptions: tuple[SubscriptionStatistics, ...] = ()


class NatsTally(Tally[NatsStatistics]):
    """The counters behind :meth:`NatsBus.statistics`."""


@attrs.frozen
class NatsSettings:
    """How a :class:`NatsBus` behaves; see :func:`open_nats_bus` for each field."""

    name: str
    stream: str | None
    subjects: tuple[str, ...]
    ack_wait: float
    duplicate_window: float
    fetch_batch: int
    fetch_wait: float
    publish_retry_after: float
    max_unconfirmed: int
    reconnect_wait: float
    reconnect_buffer: int
    outbox_size: int
    tls: ssl.SSLContext | None = attrs.field(default=None, repr=False)
