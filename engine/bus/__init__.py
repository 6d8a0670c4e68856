"""The bus seam: publish/subscribe by topic, in memory by default.

Services talk to a :class:`Bus`; which one (memory, Redis pub/sub, NATS
JetStream) is configuration. Adapters for Redis and NATS implement the same
protocol, so callers do not change when the transport does.
"""

from __future__ import annotations

from .._hub import tokens_match as tokens_match
from ._base import Bus as Bus
from ._base import BusMessage as BusMessage
from ._base import Subscription as Subscription
from ._memory import MemoryBus as MemoryBus
from ._memory import MemorySubscription as MemorySubscription

__all__ = [
    "Bus",
    "BusMessage",
    "MemoryBus",
    "MemorySubscription",
    "Subscription",
    "tokens_match",
]
