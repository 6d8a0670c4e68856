"""``engine.bus.connect(url)``: one way to pick a bus, by URL.

The scheme picks the adapter; the query string carries the adapter's own
options (``?mode=streams``, ``?stream=NAME``), which are taken off before the
rest of the URL, credentials included, goes to the client library. Nothing
here logs a URL; errors show it with its secrets masked.
"""

from __future__ import annotations

import urllib.parse
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

from .._logging import redact_url
from ._base import Bus
from ._memory import MemoryBus

__all__ = ["connect"]

# The options each scheme takes in its query string, with their types.
_REDIS_OPTIONS: dict[str, Callable[[str], Any]] = {
    "mode": str,
    "name": str,
    "prefix": str,
    "stream": str,
    "group": str,
    "maxlen": int,
    "claim_idle": float,
}
_NATS_OPTIONS: dict[str, Callable[[str], Any]] = {
    "stream": str,
    "subjects": lambda text: tuple(s for s in text.split(",") if s),
    "name": str,
    "ack_wait": float,
    "duplicate_window": float,
    "fetch_batch": int,
}
_SCHEMES = ("memory", "redis", "rediss", "nats", "tls")


def connect(url: str) -> AbstractAsyncContextManager[Bus]:
    """Open the bus a URL names, for the length of an ``async with`` block.

    ============================================  ==========================================
    URL                                           bus
    ============================================  ==========================================
    ``memory://``                                 :class:`MemoryBus`, in this process
    ``redis://[:password@]host:port/db``          Redis pub/sub: at most once
    ``redis://host:port?mode=streams&group=g``    Redis Streams: at least once, acked
    ``rediss://…``                                either, over TLS
    ``nats://[user:password@]host:port``          core NATS: at most once
    ``nats://host:port?stream=NAME``              NATS JetStream: at least once, acked
    ``tls://…``                                   either, over TLS
    ============================================  ==========================================

    Redis takes ``mode``, ``prefix``, ``stream``, ``group``, ``maxlen`` and
    ``claim_idle`` in the query; NATS takes ``stream``, ``subjects``
    (comma-separated), ``ack_wait``, ``duplicate_window`` and
    ``fetch_batch``; both take ``name``. See ``docs/bus.md``.

    Raises:
        TypeError: ``url`` is not a string.
        ValueError: at call time, for an unknown scheme, an unknown option
            or a bad value; the message shows the URL with its secrets masked.
    """
    if not isinstance(url, str):
        raise TypeError(f"url must be a string, got {type(url).__name__}")
    shown = redact_url(url)
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in _SCHEMES:
        schemes = ", ".join(f"{s}://" for s in _SCHEMES)
        raise ValueError(f"bus url must start with one of {schemes}, got {shown!r}")
    if parts.scheme == "memory":
        if parts.query or parts.path.strip("/") or parts.fragment:
            raise ValueError(f"a memory:// bus takes no path or options, got {shown!r}")
        return _memory(parts.hostname or "bus")
    if parts.scheme in ("redis", "rediss"):
        from ._redis import open_redis_bus

        options, rest = _options(parts, _REDIS_OPTIONS, shown)
        return open_redis_bus(rest, **options)
    from ._nats import open_nats_bus

    options, rest = _options(parts, _NATS_OPTIONS, shown)
    return open_nats_bus(rest, **options)


def _options(
    parts: urllib.parse.SplitResult, accepted: dict[str, Callable[[str], Any]], shown: str
) -> tuple[dict[str, Any], str]:
    """The adapter's options taken from the query, and the URL without them."""
    options: dict[str, Any] = {}
    rest: list[tuple[str, str]] = []
    for key, value in urllib.parse.parse_qsl(parts.query, keep_blank_values=True):
        if key in options:
            raise ValueError(f"bus url gives option {key!r} twice: {shown!r}")
        convert = accepted.get(key)
        if convert is None:
            if parts.scheme == "rediss":
                rest.append((key, value))  # redis-py's ssl_* settings, passed through
                continue
            known = ", ".join(sorted(accepted))
            raise ValueError(f"bus url has an unknown option {key!r} (known: {known}): {shown!r}")
        try:
            options[key] = convert(value)
        except ValueError:
            raise ValueError(f"bus url option {key}={value!r} is not valid: {shown!r}") from None
    url = urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(rest)))
    return options, url


@asynccontextmanager
async def _memory(name: str) -> AsyncIterator[Bus]:
    bus = MemoryBus(name)
    try:
        yield bus
    finally:
        await bus.aclose()
