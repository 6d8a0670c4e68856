"""The order log: follow a Hyperliquid-style order-status log, publish its orders.

``OrderLog(config, bus).follow`` is a supervised child: it looks at the file
as it grows, has worker processes read and parse a backlog (never more
regions in flight than workers), parses small increments in the event loop
(never holding it more than a few ms), and publishes every order on
``orders.<coin>``. See ``docs/orders.md``.
"""

from __future__ import annotations

from ._config import OrderLogConfig as OrderLogConfig
from ._config import OrderLogStatistics as OrderLogStatistics
from ._config import PublishMode as PublishMode
from ._config import StartAt as StartAt
from ._log import OrderLog as OrderLog
from ._records import ORDER_KIND as ORDER_KIND
from ._records import Order as Order
from ._records import OrderState as OrderState
from ._records import decode_order as decode_order
from ._records import parse_chunk as parse_chunk
from ._records import state_of as state_of

__all__ = [
    "ORDER_KIND",
    "Order",
    "OrderLog",
    "OrderLogConfig",
    "OrderLogStatistics",
    "OrderState",
    "PublishMode",
    "StartAt",
    "decode_order",
    "parse_chunk",
    "state_of",
]
