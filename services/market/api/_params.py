"""Request parameters checked by hand-sized rules, with reasons a client can act on."""

from __future__ import annotations

import re

from starlette.requests import Request

# Digits as a client types them: no sign but "-", no spaces, underscores or other scripts' digits,
# and few enough that the conversion costs nothing.
_INTEGER = re.compile(r"-?[0-9]{1,18}")


class BadRequest(Exception):
    """A request the API answers with 400 and this reason."""

    def __init__(self, reason: str, **details: object) -> None:
        super().__init__(reason)
        self.reason = reason
        self.details = details


def limit(request: Request, *, default: int, maximum: int) -> int:
    """The ``limit`` query parameter: an integer in ``1..maximum``."""
    return integer(request, "limit", default=default, minimum=1, maximum=maximum)


def integer(request: Request, name: str, *, default: int, minimum: int, maximum: int) -> int:
    """An integer query parameter within bounds, or its default when absent."""
    raw = request.query_params.get(name)
    if raw is None:
        return default
    value = int(raw) if _INTEGER.fullmatch(raw) else None
    if value is None or not minimum <= value <= maximum:
        raise BadRequest(f"{name} must be an integer from {minimum} to {maximum}, got {raw!r}")
    return value


def only(request: Request, allowed: tuple[str, ...]) -> None:
    """Refuse query parameters the endpoint does not know (a typo is not silently ignored)."""
    unknown = sorted(set(request.query_params) - set(allowed))
    if unknown:
        known = ", ".join(allowed) if allowed else "none"
        raise BadRequest(f"unknown query parameter(s) {', '.join(unknown)}; known: {known}")
