"""The bus seam: publish/subscribe by topic, in memory or on a broker.

Services talk to a :class:`Bus`; which one is configuration:
:func:`connect` opens the one a URL names (``memory://``, ``redis://``,
``nats://``). The adapters implement the same protocol, so callers do not
change when the transport does; what changes is the delivery guarantee
(``docs/bus.md`` has the table):

* :class:`MemoryBus`: in this process, at most once, no copies;
* :class:`RedisBus`: Redis pub/sub (at most once) or Redis Streams (at
  least once: :meth:`BusMessage.ack`, claimed again after ``claim_idle``);
* :class:`NatsBus`: core NATS (at most once) or JetStream (at least once,
  redelivered after ``ack_wait``, de-duplicated by ``msg_id``).
"""

from __future__ import annotations

from .._hub import tokens_match as tokens_match
from ._base import Bus as Bus
from ._base import BusMessage as BusMessage
from ._base import Subscription as Subscription
from ._connect import connect as connect
from ._memory import MemoryBus as MemoryBus
from ._memory import MemorySubscription as MemorySubscription
from ._nats import NatsBus as NatsBus
from ._nats import NatsState as NatsState
from ._nats import NatsStateName as NatsStateName
from ._nats import NatsStatistics as NatsStatistics
from ._nats import NatsSubscription as NatsSubscription
from ._nats import open_nats_bus as open_nats_bus
from ._redis import RedisBus as RedisBus
from ._redis import RedisBusStatistics as RedisBusStatistics
from ._redis import RedisMode as RedisMode
from ._redis import RedisModeName as RedisModeName
from ._redis import RedisState as RedisState
from ._redis import RedisSubscription as RedisSubscription
from ._redis import open_redis_bus as open_redis_bus

__all__ = [
    "Bus",
    "BusMessage",
    "MemoryBus",
    "MemorySubscription",
    "NatsBus",
    "NatsState",
    "NatsStateName",
    "NatsStatistics",
    "NatsSubscription",
    "RedisBus",
    "RedisBusStatistics",
    "RedisMode",
    "RedisModeName",
    "RedisState",
    "RedisSubscription",
    "Subscription",
    "connect",
    "open_nats_bus",
    "open_redis_bus",
    "tokens_match",
]
