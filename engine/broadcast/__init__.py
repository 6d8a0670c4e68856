"""Broadcast: messages of any :class:`engine.bus.Bus` to WebSocket clients.

A service mounts it on its bus with :func:`serve_broadcast`. The bus is
read by a task that never blocks the loop, each message is framed once and
offered to every client's own bounded queue, and each client has its own
writer: a client that falls too far behind is closed with a code and a
reason, while the others carry on at full rate.

See ``docs/broadcast.md``.
"""

from __future__ import annotations

from ._client import ClientStatistics as ClientStatistics
from ._config import CLOSE_GOING_AWAY as CLOSE_GOING_AWAY
from ._config import CLOSE_PING_TIMEOUT as CLOSE_PING_TIMEOUT
from ._config import CLOSE_POLICY as CLOSE_POLICY
from ._config import CLOSE_TOO_BIG as CLOSE_TOO_BIG
from ._config import CLOSE_TOO_SLOW as CLOSE_TOO_SLOW
from ._config import BroadcastConfig as BroadcastConfig
from ._server import BroadcastServer as BroadcastServer
from ._server import serve_broadcast as serve_broadcast
from ._server_stats import BroadcastStatistics as BroadcastStatistics

__all__ = [
    "CLOSE_GOING_AWAY",
    "CLOSE_PING_TIMEOUT",
    "CLOSE_POLICY",
    "CLOSE_TOO_BIG",
    "CLOSE_TOO_SLOW",
    "BroadcastConfig",
    "BroadcastServer",
    "BroadcastStatistics",
    "ClientStatistics",
    "serve_broadcast",
]
