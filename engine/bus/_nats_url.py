"""NATS server URLs: checked before use, and shown only with their secrets masked."""

from __future__ import annotations

import json
from urllib.parse import urlsplit

import attrs
import trio

from .._logging import redact_url

# Seconds a tls:// server gets to connect and send its INFO line (nats-py's connect timeout).
INFO_TIMEOUT = 2.0

_SCHEMES = ("nats", "tls", "ws", "wss")
_DEFAULT_PORT = 4222


@attrs.frozen
class NatsURL:
    """A checked NATS URL.

    Attributes:
        url: the URL as given, credentials included; never shown (no repr).
        redacted: the same URL with any ``user:password@`` or ``token@``
            replaced by ``***@``: the only form that reaches a log line, a
            repr or statistics.
        scheme: ``nats``, ``tls``, ``ws`` or ``wss``.
        host: the server's host.
        port: the server's port (4222 when the URL names none).
    """

    url: str = attrs.field(repr=False)
    redacted: str
    scheme: str
    host: str
    port: int

    @classmethod
    def parse(cls, url: str) -> NatsURL:
        """Check ``url`` and build its redacted form.

        Raises:
            TypeError: ``url`` is not a string.
            ValueError: not a ``nats://``, ``tls://``, ``ws://`` or ``wss://``
                URL with a host and a valid port; the message shows the URL
                with its credentials masked.
        """
        if not isinstance(url, str):
            raise TypeError(f"url must be a string, got {type(url).__name__}")
        redacted = redact_url(url)
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError:
            # urllib's own message may quote part of a password: not chained.
            raise ValueError(f"url {redacted!r} is not a valid URL (bad host or port)") from None
        if parts.scheme not in _SCHEMES:
            schemes = ", ".join(f"{s}://" for s in _SCHEMES)
            raise ValueError(f"url {redacted!r} must start with one of {schemes}")
        if not parts.hostname:
            raise ValueError(f"url {redacted!r} has no host")
        if port == 0:
            raise ValueError(f"url {redacted!r} has port 0")
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            raise ValueError(f"url {redacted!r}: a NATS URL has no path, query or fragment")
        return cls(
            url=url,
            redacted=redacted,
            scheme=parts.scheme,
            host=parts.hostname,
            port=port or _DEFAULT_PORT,
        )


async def require_tls(url: NatsURL) -> None:
    """Check that the server at ``url`` requires TLS, before nats-py sends it anything.

    nats-py upgrades to TLS only when the server's INFO line asks for it, so
    a ``tls://`` URL alone would not keep credentials off a plaintext
    connection. This reads the INFO line on a connection of its own.

    Raises:
        trio.BrokenResourceError: the server cannot be reached, or does not
            require TLS.
    """
    line = b""
    with trio.move_on_after(INFO_TIMEOUT) as waited:
        try:
            stream = await trio.open_tcp_stream(url.host, url.port)
        except OSError as exc:
            raise trio.BrokenResourceError(
                f"cannot connect to NATS at {url.redacted}: {exc}"
            ) from exc
        async with stream:
            while b"\r\n" not in line and len(line) < 65536:
                chunk = await stream.receive_some(4096)
                if not chunk:
                    break
                line += chunk
    if waited.cancelled_caught:
        raise trio.BrokenResourceError(
            f"NATS at {url.redacted} sent no INFO line within {INFO_TIMEOUT:g} s"
        )
    head, _, body = line.partition(b" ")
    try:
        info = json.loads(body.split(b"\r\n", 1)[0]) if head == b"INFO" else {}
    except ValueError:
        info = {}
    if not info.get("tls_required"):
        raise trio.BrokenResourceError(
            f"NATS at {url.redacted} does not require TLS: not connecting to a tls:// URL "
            "in the clear"
        )
