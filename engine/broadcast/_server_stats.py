"""A broadcast server's counters, and the snapshot it gives of them.

The totals cover clients already gone: when a client retires, its own
counters are added to the server's, so ``statistics()`` sums those with
the connected clients' live ones.
"""

from __future__ import annotations

import collections

import attrs

from .._counters import counter_metric, gauge_metric
from ._client import DROP_REASONS, Client, ClientStatistics
from ._fanout import Fanout


@attrs.frozen
class BroadcastStatistics:
    """A snapshot of a broadcast server. Totals include clients already gone.

    Attributes:
        name: the server's name.
        url: where clients connect.
        clients: clients connected now.
        peak_clients: the most ever connected at once.
        handshaking: connections still in the HTTP upgrade.
        accepted: upgrades accepted.
        rejected: refused connections by reason (``unauthorized``,
            ``origin``, ``full``, ``bad_topics``, ``too_many_topics``,
            ``unknown_topics``, ``not_found``, ``bad_request``, ...; and
            ``per_ip`` and ``busy``, answered as soon as they were accepted).
        disconnected: closes by cause (``client_closed``, ``too_slow``,
            ``message_too_big``, ``ping_timeout``, ``protocol_error``,
            ``policy``, ``rate_limited``, ``shutdown``, ``connection_lost``),
            counted when the close starts; the client stays in ``clients``
            until it is gone.
        slow_disconnects: clients closed for falling more than ``max_lag``
            behind (or losing more than ``max_lost``).
        aborted: closes whose handshake did not finish within
            ``close_timeout`` (the TCP connection was dropped).
        received: bus messages the server took.
        unrouted: of those, messages no client wanted.
        invalid: of those, payloads that could not be framed (not UTF-8).
        offered: frames offered to clients; at every moment
            ``offered == sent + dropped + queued``.
        queued: frames the connected clients have not been sent yet.
        sent: frames written to clients.
        dropped_by_reason: frames clients will never get, by reason:
            ``overflow`` (a full client queue discarded its oldest) and
            ``closed`` (still queued when a connection ended). Their sum is
            the property ``dropped``.
        writes: socket writes; ``sent / writes`` is the coalescing factor.
        bytes_sent: bytes written to clients.
        connections: one snapshot per connected client.
    """

    name: str
    url: str
    clients: int = attrs.field(metadata=gauge_metric("Clients connected now"))
    peak_clients: int = attrs.field(metadata=gauge_metric("Most clients at once"))
    handshaking: int = attrs.field(metadata=gauge_metric("Connections in the upgrade"))
    accepted: int = attrs.field(metadata=counter_metric("Upgrades accepted"))
    rejected: dict[str, int] = attrs.field(
        metadata=counter_metric("Connections refused, by reason", label="reason")
    )
    disconnected: dict[str, int] = attrs.field(
        metadata=counter_metric("Clients closed, by cause", label="cause")
    )
    slow_disconnects: int = attrs.field(
        metadata=counter_metric("Clients closed for falling behind")
    )
    aborted: int = attrs.field(
        metadata=counter_metric("Closes whose handshake did not finish in time")
    )
    received: int = attrs.field(metadata=counter_metric("Bus messages taken"))
    unrouted: int = attrs.field(metadata=counter_metric("Bus messages no client wanted"))
    invalid: int = attrs.field(metadata=counter_metric("Payloads that could not be framed"))
    offered: int = attrs.field(metadata=counter_metric("Frames offered to clients"))
    queued: int = attrs.field(metadata=gauge_metric("Frames offered and not written yet"))
    sent: int = attrs.field(metadata=counter_metric("Frames written to clients"))
    dropped_by_reason: dict[str, int] = attrs.field(
        metadata=counter_metric("Frames never sent, by reason", label="reason", name="dropped")
    )
    writes: int = attrs.field(metadata=counter_metric("Socket writes to clients"))
    bytes_sent: int = attrs.field(
        metadata=counter_metric("Bytes written to clients", name="sent_bytes")
    )
    connections: tuple[ClientStatistics, ...]

    @property
    def dropped(self) -> int:
        """Frames clients will never get, for every reason: ``offered - sent - queued``."""
        return sum(self.dropped_by_reason.values())


@attrs.define
class ServerCounts:
    """What a :class:`BroadcastServer` counts besides what its clients count.

    Attributes:
        accepted: upgrades accepted.
        peak: the most clients connected at once.
        aborted: closes whose handshake did not finish in time.
        rejected: refused connections by reason.
        disconnected: closes of retired clients by cause.
        gone: the counters of retired clients (``offered``, ``sent``,
            ``writes``, ``bytes_sent``, ``dropped_<reason>``).
    """

    accepted: int = 0
    peak: int = 0
    aborted: int = 0
    rejected: collections.Counter[str] = attrs.field(factory=collections.Counter)
    disconnected: collections.Counter[str] = attrs.field(factory=collections.Counter)
    gone: collections.Counter[str] = attrs.field(factory=collections.Counter)

    def retire(self, client: Client) -> ClientStatistics:
        """Add a client that has ended (and discarded its queue) to the totals."""
        stats = client.statistics()
        for field in ("offered", "sent", "writes", "bytes_sent"):
            self.gone[field] += getattr(stats, field)
        for reason, count in stats.dropped_by_reason.items():
            self.gone[f"dropped_{reason}"] += count
        self.disconnected[client.cause or "connection_lost"] += 1
        self.aborted += client.aborted
        return stats

    def snapshot(
        self, name: str, url: str, fanout: Fanout[Client], *, handshaking: int
    ) -> BroadcastStatistics:
        """The server's statistics: these counts plus the connected clients' own."""
        connections = tuple(client.statistics() for client in fanout.clients)
        # A close is counted from the moment it starts: it is decided, and
        # the client gets nothing more, though the handshake may still run.
        disconnected = self.disconnected.copy()
        disconnected.update(c.cause for c in fanout.clients if c.cause is not None)

        def total(field: str) -> int:
            return self.gone[field] + sum(int(getattr(c, field)) for c in connections)

        dropped = {
            reason: self.gone[f"dropped_{reason}"]
            + sum(c.dropped_by_reason[reason] for c in connections)
            for reason in DROP_REASONS
        }
        return BroadcastStatistics(
            name=name,
            url=url,
            clients=len(connections),
            peak_clients=self.peak,
            handshaking=handshaking,
            accepted=self.accepted,
            rejected=dict(self.rejected),
            disconnected=dict(disconnected),
            slow_disconnects=disconnected["too_slow"],
            aborted=self.aborted,
            received=fanout.received,
            unrouted=fanout.unrouted,
            invalid=fanout.invalid,
            offered=total("offered"),
            queued=sum(c.queued for c in connections),
            sent=total("sent"),
            dropped_by_reason=dropped,
            writes=total("writes"),
            bytes_sent=total("bytes_sent"),
            connections=connections,
        )
