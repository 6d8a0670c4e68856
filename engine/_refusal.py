"""Refusing a connection so that the client reads the answer (private).

Closing a socket with unread data resets the connection, and the reset can
reach the client before it has read the answer. So after the answer, what
the client sends is read and dropped, for a moment and a bounded amount, or
until the client closes.
"""

from __future__ import annotations

import trio

REFUSAL_LINGER = 1.0
"""Seconds a refused connection is read from after its answer, at most."""
REFUSAL_DRAIN = 65_536
"""Bytes read and dropped from a refused connection, at most."""


async def refuse(stream: trio.abc.HalfCloseableStream, answer: bytes) -> None:
    """Send ``answer`` and end our side, then drop what the client sends.

    Never raises for a client that went away; returns within
    :data:`REFUSAL_LINGER` seconds.
    """
    with trio.move_on_after(REFUSAL_LINGER):
        try:
            await stream.send_all(answer)
            await stream.send_eof()
            dropped = 0
            while dropped < REFUSAL_DRAIN:
                data = await stream.receive_some(REFUSAL_DRAIN)
                if not data:
                    return
                dropped += len(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return
