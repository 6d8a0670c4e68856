"""What services built on the engine use to look like the engine, like ``trio.lowlevel``.

Most programs need only the names in :mod:`engine`. These are for code that
extends the engine's ways to its own parts: argument checks that fail early
with the engine's wording, the one form every ``last_error`` field uses, the
name the engine gives a callable in logs and statistics, listing a
component's statistics under the supervised child that runs it, and what a
:class:`engine.BatchRunner` of your own is handed and returns.
"""

from __future__ import annotations

from ._names import callable_name as callable_name
from ._names import describe_error as describe_error
from ._runner import Call as Call
from ._runner import ChunkReport as ChunkReport
from ._runner import Finished as Finished
from ._schedule import chunk_deadline as chunk_deadline
from ._schedule import may_start as may_start
from ._validation import check_choice as check_choice
from ._validation import check_count as check_count
from ._validation import check_duration as check_duration
from ._validation import check_name as check_name
from ._watchdog import StatisticsSource as StatisticsSource
from ._watchdog import attach_statistics as attach_statistics

__all__ = [
    "Call",
    "ChunkReport",
    "Finished",
    "StatisticsSource",
    "attach_statistics",
    "callable_name",
    "check_choice",
    "check_count",
    "check_duration",
    "check_name",
    "chunk_deadline",
    "describe_error",
    "may_start",
]
