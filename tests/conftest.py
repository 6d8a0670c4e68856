"""Fixtures shared by the bridge and batch tests."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

import engine


@pytest.fixture
async def pool() -> AsyncIterator[engine.ProcessPool]:
    """A warm pool of two worker processes, closed (and reaped) after the test."""
    async with engine.open_process_pool(2) as opened:
        await opened.warm()
        yield opened
