"""What an HTTP error says about retrying it: ``Retry-After``, and whether it is transient."""

from __future__ import annotations

import datetime
import email.utils
import math
import time
from collections.abc import Callable

import httpx

RETRY_AFTER_STATUSES = frozenset({429, 503})
"""The answers whose ``Retry-After`` header a retry honours."""

TRANSIENT_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})
"""HTTP statuses that say "not now" rather than "never"."""


def retry_after_seconds(
    exc: BaseException, wall_clock: Callable[[], float] | None = None
) -> float | None:
    """The wait an ``httpx.HTTPStatusError`` for a 429 or 503 answer asks for, or ``None``.

    ``Retry-After`` is either a number of seconds or an HTTP date; a date is
    turned into seconds from ``wall_clock()``. A date in the past asks for no
    wait (0). A header that is neither, or any other error, gives ``None``.

    Args:
        exc: the error an attempt raised.
        wall_clock: seconds since the epoch; ``time.time`` if ``None``.
    """
    if not isinstance(exc, httpx.HTTPStatusError):
        return None
    response = exc.response
    if response.status_code not in RETRY_AFTER_STATUSES:
        return None
    value = response.headers.get("retry-after")
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:  # "-0000": no zone given; HTTP dates are GMT
        when = when.replace(tzinfo=datetime.UTC)
    now = (time.time if wall_clock is None else wall_clock)()
    seconds = when.timestamp() - now
    return max(0.0, seconds) if math.isfinite(seconds) else None


def transient_http_error(exc: Exception) -> bool:
    """Whether an httpx error is worth another attempt: a ``retry_on=`` predicate.

    True for transport failures that say nothing about the request itself
    (timeouts, connection errors, a connection dropped mid-answer) and for
    an ``httpx.HTTPStatusError`` whose status is in :data:`TRANSIENT_STATUSES`
    (call ``response.raise_for_status()`` inside the attempt to get one).
    False for everything else, such as a 400 or 404 answer or a bad URL.
    """
    if isinstance(exc, httpx.HTTPStatusError):
        return exc.response.status_code in TRANSIENT_STATUSES
    return isinstance(exc, httpx.TimeoutException | httpx.NetworkError | httpx.RemoteProtocolError)
