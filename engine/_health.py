"""What a statistics source says about its own health: /health lists it, /ready heeds it.

A source (anything passed to ``serve_ops(sources=...)``) that also has a
``health()`` method returning a :class:`SourceHealth` is listed by name in
the body of ``/health``, and while it is not ready ``/ready`` answers 503
with the reason: a bus that lost its broker, say. The answer must be cheap
and never wait: it is called on every probe.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol, runtime_checkable

import attrs


@attrs.frozen
class SourceHealth:
    """One source's state, as ``/health`` shows it and ``/ready`` judges it.

    Attributes:
        state: a word for the operator: ``connected``, ``reconnecting``,
            ``serving``, ``closed``.
        ready: whether the service can do its work through this source now;
            ``/ready`` answers 503 while it is false.
        detail: a few more facts shown beside ``state`` (``{"connections": 3}``);
            plain numbers and strings only, and never a secret.
    """

    state: str
    ready: bool = True
    detail: Mapping[str, object] = attrs.field(factory=dict)


@runtime_checkable
class HasHealth(Protocol):
    """A source that can say whether it is healthy (see :class:`SourceHealth`)."""

    def health(self) -> SourceHealth:
        """Its state now; cheap, and never waits."""
        ...
