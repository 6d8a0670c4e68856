"""A Trio structured-concurrency service framework.

Supervision trees with restart strategies and stall watchdogs, a runtime with
graceful shutdown, and periodic cycles whose deadlines always fire. Everything
public is re-exported here; the implementation lives in private modules.
"""

from __future__ import annotations

from ._backoff import Backoff as Backoff
from ._exceptions import ChildStalled as ChildStalled
from ._exceptions import ChildStartError as ChildStartError
from ._exceptions import EngineError as EngineError
from ._exceptions import FailureRecord as FailureRecord
from ._exceptions import ForcedShutdown as ForcedShutdown
from ._exceptions import RestartIntensityExceeded as RestartIntensityExceeded
from ._exceptions import SupervisorError as SupervisorError
from ._periodic import Cycle as Cycle
from ._periodic import CycleStatistics as CycleStatistics
from ._periodic import every as every
from ._runtime import Shutdown as Shutdown
from ._runtime import current_shutdown as current_shutdown
from ._runtime import run as run
from ._statistics import ChildState as ChildState
from ._statistics import ChildStatistics as ChildStatistics
from ._statistics import SupervisorStatistics as SupervisorStatistics
from ._supervisor import Supervisor as Supervisor
from ._supervisor import open_supervisor as open_supervisor
from ._watchdog import heartbeat as heartbeat

__all__ = [
    "Backoff",
    "ChildStalled",
    "ChildStartError",
    "ChildState",
    "ChildStatistics",
    "Cycle",
    "CycleStatistics",
    "EngineError",
    "FailureRecord",
    "ForcedShutdown",
    "RestartIntensityExceeded",
    "Shutdown",
    "Supervisor",
    "SupervisorError",
    "SupervisorStatistics",
    "current_shutdown",
    "every",
    "heartbeat",
    "open_supervisor",
    "run",
]
