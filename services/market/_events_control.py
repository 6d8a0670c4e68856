"""Frames that are not market data: what a stream connection says about itself.

A stream connection carries two such frames besides the stream messages:

* a reply to a request sent on it (``SUBSCRIBE``, ``LIST_SUBSCRIPTIONS``...):
  ``{"result": null, "id": 1}``, or ``{"error": {"code": 2, "msg": ...}, "id": 1}``;
* ``serverShutdown``, sent before the server goes down for maintenance:
  ``{"e": "serverShutdown", "E": ...}``, or on a combined stream
  ``{"stream": "!serverShutdown", "data": {...}}``.

Decoding one raises a :class:`ControlFrame`, never returns an event, so the
path every market message takes has no test for them. The hierarchy::

    ValueError
     └── MalformedMessage        not a stream message of a known kind
          └── ControlFrame       not market data, but not malformed either
               ├── SubscriptionReply
               └── ServerShutdown

A ``ControlFrame`` is a ``MalformedMessage`` so that a reader which does not
know control frames counts them as it counts any frame that is not a stream
message; one that does catches ``ControlFrame`` first.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

from ._events_wire import Int64


class MalformedMessage(ValueError):
    """A frame that is not a Binance stream message of a known kind."""


class ControlFrame(MalformedMessage):
    """A frame about the connection, not market data: count it apart from malformed ones."""


class SubscriptionReply(ControlFrame):
    """A reply to a request sent on the stream connection.

    Attributes:
        id: the request's id (an integer, a string, or ``None``).
        result: the request's result (``None`` for a successful
            ``SUBSCRIBE`` or ``UNSUBSCRIBE``; a list of names for
            ``LIST_SUBSCRIPTIONS``), or ``None`` with an error.
        error: the server's error text (``"code 2: Invalid request: ..."``),
            or ``None`` when the request succeeded.
    """

    def __init__(self, id: int | str | None, result: Any = None, error: str | None = None) -> None:
        shown = f"error {error}" if error is not None else f"result {result!r:.80}"
        super().__init__(f"reply to request {id!r}: {shown}")
        self.id = id
        self.result = result
        self.error = error

    def __reduce__(self) -> tuple[Any, ...]:
        return type(self), (self.id, self.result, self.error)


class ServerShutdown(ControlFrame):
    """The server is about to shut down: open a new connection now.

    Attributes:
        time: the event time (``E``), in milliseconds since the epoch.
    """

    def __init__(self, time: int) -> None:
        super().__init__(f"the server announced its shutdown at {time}")
        self.time = time

    def __reduce__(self) -> tuple[Any, ...]:
        return type(self), (self.time,)


SHUTDOWN_STREAM = "!serverShutdown"
"""The stream name a combined stream gives ``serverShutdown``."""


class _Error(msgspec.Struct, frozen=True, gc=False):
    code: int
    msg: str


class _Shutdown(msgspec.Struct, frozen=True, gc=False):
    e: Literal["serverShutdown"]
    E: Int64


# Everything a frame that is not a stream message may be: which members it
# has tells which it is. Only frames that fail as a stream message come here.
class _Other(msgspec.Struct, frozen=True, gc=False):
    id: Int64 | str | msgspec.UnsetType | None = msgspec.UNSET
    result: Any = msgspec.UNSET
    error: _Error | msgspec.UnsetType = msgspec.UNSET
    # Binance's documented error form without the "error" wrapper.
    code: int | msgspec.UnsetType = msgspec.UNSET
    msg: str | msgspec.UnsetType = msgspec.UNSET
    e: str | msgspec.UnsetType = msgspec.UNSET
    E: Int64 | msgspec.UnsetType = msgspec.UNSET


_OTHER = msgspec.json.Decoder(_Other)
_SHUTDOWN = msgspec.json.Decoder(_Shutdown)
# A request id is a 64-bit integer or a string of at most 36 characters.
_MAX_ID = 36


def shutdown_from(data: msgspec.Raw | bytes | str) -> ServerShutdown:
    """The :class:`ServerShutdown` in a ``!serverShutdown`` stream's ``data``.

    Raises:
        msgspec.DecodeError, msgspec.ValidationError: ``data`` is not one.
    """
    return ServerShutdown(_SHUTDOWN.decode(data).E)


def control_from(frame: str | bytes, why: Exception) -> MalformedMessage:
    """What a frame that is not a stream message is: a control frame, or malformed.

    Args:
        frame: the frame, which failed to decode as a stream message.
        why: that failure, named in a malformed frame's message.
    """
    try:
        other = _OTHER.decode(frame)
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError):
        return MalformedMessage(str(why))
    if other.e == "serverShutdown" and not isinstance(other.E, msgspec.UnsetType):
        return ServerShutdown(other.E)
    ident = other.id
    if isinstance(ident, msgspec.UnsetType) or (isinstance(ident, str) and len(ident) > _MAX_ID):
        return MalformedMessage(str(why))
    if not isinstance(other.error, msgspec.UnsetType):
        return SubscriptionReply(ident, error=f"code {other.error.code}: {other.error.msg}")
    if not isinstance(other.msg, msgspec.UnsetType):
        code = "?" if isinstance(other.code, msgspec.UnsetType) else other.code
        return SubscriptionReply(ident, error=f"code {code}: {other.msg}")
    if other.result is not msgspec.UNSET:
        return SubscriptionReply(ident, other.result)
    return MalformedMessage(str(why))
