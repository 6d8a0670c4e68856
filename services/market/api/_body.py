"""Request bodies read under a size cap: refused on what is declared, then on what arrives."""

from __future__ import annotations

from contextlib import aclosing

from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request

# The connection is not reused after a refused body: the rest of it may still be coming.
_CLOSE = {"connection": "close"}


async def read_body(request: Request, limit: int) -> bytes:
    """The request's body, refused with 413 as soon as it is known to exceed ``limit`` bytes.

    A ``Content-Length`` over ``limit`` is refused before a byte of the body
    is read. Otherwise the body is read as it arrives, chunked transfer
    included, and refused once the bytes received pass ``limit``: at most
    ``limit`` plus one received chunk is ever held.

    Args:
        request: the request whose body to read (not read before).
        limit: the most bytes accepted.

    Returns:
        The whole body.

    Raises:
        HTTPException: 413 past ``limit``; 408 when the body did not all
            arrive (the client closed the connection, or stayed silent past
            the server's read timeout and was cut off).
    """
    declared = request.headers.get("content-length")
    if declared is not None and _over(declared, limit):
        raise HTTPException(413, _too_large(limit), headers=_CLOSE)
    body = bytearray()
    try:
        async with aclosing(request.stream()) as chunks:
            async for chunk in chunks:
                body += chunk
                if len(body) > limit:
                    raise HTTPException(413, _too_large(limit), headers=_CLOSE)
    except ClientDisconnect:
        message = f"the body ended after {len(body)} bytes: the connection closed or stalled"
        raise HTTPException(408, message, headers=_CLOSE) from None
    return bytes(body)


def _over(declared: str, limit: int) -> bool:
    # The server has checked the header already; whatever is not a plain
    # number is left to the running cap.
    text = declared.strip().lstrip("0")
    if not (text.isascii() and text.isdigit()):
        return False
    return len(text) > len(str(limit)) or int(text) > limit


def _too_large(limit: int) -> str:
    return f"the body must be at most {limit} bytes"
