"""The embedded store: one SQLite file (WAL), every call in a worker thread.

:func:`open_database` opens the file; each part of the service that keeps
data there migrates its own tables (:meth:`Database.migrate`, or
:func:`migrate_sqlite` on a connection of its own). The first
part is the watchlist's failure history (:func:`open_failure_history`).
See ``docs/watchlist.md``, "Failure history".
"""

from __future__ import annotations

from ._failures import KINDS as KINDS
from ._failures import FailureHistory as FailureHistory
from ._failures import FailureHistoryStatistics as FailureHistoryStatistics
from ._failures import FailureRecord as FailureRecord
from ._failures import FailureRecorder as FailureRecorder
from ._failures import open_failure_history as open_failure_history
from ._sqlite import Database as Database
from ._sqlite import migrate_sqlite as migrate_sqlite
from ._sqlite import open_database as open_database
from ._sqlite import pending_migrations as pending_migrations

__all__ = [
    "KINDS",
    "Database",
    "FailureHistory",
    "FailureHistoryStatistics",
    "FailureRecord",
    "FailureRecorder",
    "migrate_sqlite",
    "open_database",
    "open_failure_history",
    "pending_migrations",
]
