"""The market service's REST API (``/api``), mounted on the ops server.

See ``docs/api.md`` for the endpoints and their shapes.
"""

from __future__ import annotations

from ._app import build_api as build_api

__all__ = ["build_api"]
