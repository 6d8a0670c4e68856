"""Redis URLs checked before they reach redis-py, and shown without their password."""

from __future__ import annotations

import urllib.parse

import attrs

from .._logging import redact_url

_SCHEMES = ("redis", "rediss")
_DEFAULT_PORT = 6379


@attrs.frozen
class RedisAddress:
    """Where a Redis server is, parsed from ``redis://[[user]:password@]host[:port][/db]``.

    The password is kept out of ``repr`` and :attr:`display`; only
    :meth:`engine.bus._redis.open_redis_bus` hands it to redis-py.

    Attributes:
        url: the URL as given, password included (never logged).
        tls: whether the scheme is ``rediss`` (TLS, negotiated by redis-py).
        host: the server's host name or address.
        port: its TCP port.
        db: the database number.
    """

    url: str = attrs.field(repr=False)
    tls: bool
    host: str
    port: int
    db: int

    @property
    def display(self) -> str:
        """The URL without credentials or query: safe for logs, errors and statistics."""
        scheme = "rediss" if self.tls else "redis"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{host}:{self.port}/{self.db}"


def parse_redis_url(url: str) -> RedisAddress:
    """Check a ``redis://`` or ``rediss://`` URL and split it.

    Args:
        url: ``redis://[[user]:password@]host[:port][/db]``; ``rediss://``
            for TLS, with redis-py's ``ssl_*`` query options passed through.

    Returns:
        The parsed :class:`RedisAddress`.

    Raises:
        TypeError: ``url`` is not a string.
        ValueError: another scheme, no host, a bad port or database number;
            the message shows the URL with its password masked.
    """
    if not isinstance(url, str):
        raise TypeError(f"url must be a string, got {type(url).__name__}")
    # Shown without its user information or its query (rediss:// may carry
    # a password there): only where it points.
    shown = redact_url(url.split("?", 1)[0].split("#", 1)[0])
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in _SCHEMES:
        raise ValueError(f"url must start with redis:// or rediss://, got {shown!r}")
    if not parts.hostname:
        raise ValueError(f"url names no host: {shown!r}")
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"url has a bad port (1-65535): {shown!r}") from None
    if port == 0:
        raise ValueError(f"url has a bad port (1-65535): {shown!r}")
    path = parts.path.strip("/")
    if path and not (path.isascii() and path.isdigit()):
        raise ValueError(f"url's database must be a number, got {path!r} in {shown!r}")
    if parts.fragment:
        raise ValueError(f"url must not have a fragment: {shown!r}")
    if parts.query and parts.scheme == "redis":
        raise ValueError(f"url options are only passed through for rediss://, got {shown!r}")
    return RedisAddress(
        url=url,
        tls=parts.scheme == "rediss",
        host=parts.hostname,
        port=_DEFAULT_PORT if port is None else port,
        db=int(path) if path else 0,
    )
