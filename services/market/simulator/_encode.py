"""The one JSON encoder of the simulator: swap it here for msgspec or orjson.

Every message and every REST body goes through :func:`encode`, so it is
the one place to swap for a faster encoder (``docs/simulator.md`` has the
figures). ``JSONEncoder.encode`` would rebuild the stdlib's C encoder on
every call, adding more than half again to each message, so it is built
once; without the C accelerator (other Python implementations) the plain
encoder does the work.
"""

from __future__ import annotations

import json
import json.encoder
from collections.abc import Callable
from typing import Any

_ENCODER = json.JSONEncoder(separators=(",", ":"), check_circular=False)


def _c_encoder() -> Callable[[Any], str] | None:
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is None:
        return None
    # The arguments JSONEncoder.iterencode passes for these settings.
    chunks = make(
        None,  # markers: no circular-reference check
        _ENCODER.default,
        json.encoder.encode_basestring_ascii,
        None,  # indent
        ":",
        ",",
        False,  # sort_keys
        False,  # skipkeys
        True,  # allow_nan
    )

    def encode_fast(value: Any) -> str:
        return "".join(chunks(value, 0))

    return encode_fast


encode: Callable[[Any], str] = _c_encoder() or _ENCODER.encode
"""``value`` as compact JSON text."""
