"""JSON responses encoded by msgspec (attrs values, NaN as null, one pass)."""

from __future__ import annotations

from collections.abc import Mapping

import msgspec
from starlette.responses import Response

_ENCODER = msgspec.json.Encoder()


class JSON(Response):
    """A JSON response of anything msgspec encodes: attrs values, dicts, lists."""

    media_type = "application/json"

    def __init__(
        self, content: object, status_code: int = 200, headers: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(content, status_code, headers)

    def render(self, content: object) -> bytes:
        return _ENCODER.encode(content)
