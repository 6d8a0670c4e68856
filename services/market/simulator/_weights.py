"""Request weight, as Binance counts it: a budget per minute, spent by each REST call.

Binance gives every REST endpoint a weight and each client a budget of weight
per minute (6,000 on ``api/v3``). Every answer carries
``X-MBX-USED-WEIGHT-1M``, the weight used in the current minute; a request
past the budget is answered 429 with ``Retry-After`` (seconds to the next
minute) and code -1003. The simulator does the same, per simulator rather
than per IP, so a client that ignores the limit is refused here as it would
be there.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping

import attrs

#: Binance's request-weight budget per minute on ``api/v3``.
DEFAULT_WEIGHT_LIMIT = 6_000


def ticker_weight(query: Mapping[str, str]) -> int:
    """``/api/v3/ticker/24hr``: 2 for one symbol, by count for a list, 80 for all."""
    if "symbol" in query:
        return 2
    if "symbols" in query:
        count = query["symbols"].count(",") + 1
        return 2 if count <= 20 else 40 if count <= 100 else 80
    return 80


@attrs.define
class RequestWeights:
    """The weight used in the current minute, against a budget (private).

    Attributes:
        limit: weight allowed per minute.
        clock: wall-clock seconds (minutes are the clock's, as Binance's are).
    """

    limit: int
    clock: Callable[[], float] = time.time
    _minute: int = -1
    used: int = 0

    def take(self, weight: int) -> float | None:
        """Spend ``weight``; ``None`` if it fits, else seconds until the next minute.

        A refused request spends nothing, as Binance counts only what it answers.
        """
        now = self.clock()
        minute = int(now // 60)
        if minute != self._minute:
            self._minute, self.used = minute, 0
        if self.used + weight > self.limit:
            return max(1.0, math.ceil((minute + 1) * 60 - now))
        self.used += weight
        return None
