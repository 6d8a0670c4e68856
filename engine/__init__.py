"""A Trio structured-concurrency service framework.

Supervision trees with restart strategies and stall watchdogs, a runtime with
graceful shutdown, and periodic cycles whose deadlines always fire. Everything
public is re-exported here; the implementation lives in private modules.
"""

from __future__ import annotations

from ._backoff import Backoff as Backoff
from ._batch import Batch as Batch
from ._batch import BatchStatistics as BatchStatistics
from ._batch import Bridge as Bridge
from ._batch import BridgeName as BridgeName
from ._batch import map_batch as map_batch
from ._batch import run_batch as run_batch
from ._breaker import BreakerStatistics as BreakerStatistics
from ._breaker import CircuitBreaker as CircuitBreaker
from ._breaker import CircuitOpen as CircuitOpen
from ._breaker import Permit as Permit
from ._breaker_circuit import CircuitState as CircuitState
from ._bridgestats import BridgeStatistics as BridgeStatistics
from ._bridgestats import bridge_statistics as bridge_statistics
from ._channels import ChannelStatistics as ChannelStatistics
from ._channels import Overflow as Overflow
from ._channels import OverflowName as OverflowName
from ._channels import ReceiveChannel as ReceiveChannel
from ._channels import SendChannel as SendChannel
from ._channels import open_channel as open_channel
from ._consumers import Consumers as Consumers
from ._consumers import ConsumerStatistics as ConsumerStatistics
from ._consumers import OnError as OnError
from ._consumers import OnErrorName as OnErrorName
from ._consumers import consume as consume
from ._counters import Tally as Tally
from ._counters import counter_metric as counter_metric
from ._counters import gauge_metric as gauge_metric
from ._counters import metric_source as metric_source
from ._dask_runner import DaskRunner as DaskRunner
from ._dask_runner import DaskRunnerStatistics as DaskRunnerStatistics
from ._drain import ChildShutdown as ChildShutdown
from ._drain import ShutdownReport as ShutdownReport
from ._exceptions import ChildStalled as ChildStalled
from ._exceptions import ChildStartError as ChildStartError
from ._exceptions import EngineError as EngineError
from ._exceptions import FailureRecord as FailureRecord
from ._exceptions import ForcedShutdown as ForcedShutdown
from ._exceptions import RestartIntensityExceeded as RestartIntensityExceeded
from ._exceptions import SerializationError as SerializationError
from ._exceptions import SubscriberDisconnected as SubscriberDisconnected
from ._exceptions import SupervisorError as SupervisorError
from ._exceptions import WorkerCrashed as WorkerCrashed
from ._health import HasHealth as HasHealth
from ._health import SourceHealth as SourceHealth
from ._hub import Hub as Hub
from ._hub import HubOverflow as HubOverflow
from ._hub import HubOverflowName as HubOverflowName
from ._hub import HubStatistics as HubStatistics
from ._hub import Subscription as Subscription
from ._hub import SubscriptionStatistics as SubscriptionStatistics
from ._logging import configure_logging as configure_logging
from ._loopwatch import LoopStall as LoopStall
from ._loopwatch import LoopStatistics as LoopStatistics
from ._loopwatch import LoopWatch as LoopWatch
from ._loopwatch import open_loop_watch as open_loop_watch
from ._metrics import HasStatistics as HasStatistics
from ._ops import OpsServer as OpsServer
from ._ops import serve_ops as serve_ops
from ._outcome import Outcome as Outcome
from ._outcome import Status as Status
from ._periodic import Cycle as Cycle
from ._periodic import CycleStatistics as CycleStatistics
from ._periodic import OverrunPolicy as OverrunPolicy
from ._periodic import OverrunPolicyName as OverrunPolicyName
from ._periodic import every as every
from ._processes import ProcessPool as ProcessPool
from ._processes import ProcessPoolStatistics as ProcessPoolStatistics
from ._processes import WorkerStart as WorkerStart
from ._processes import WorkerStartName as WorkerStartName
from ._processes import open_process_pool as open_process_pool
from ._processes import to_process as to_process
from ._restarts import Restart as Restart
from ._restarts import RestartName as RestartName
from ._restarts import Strategy as Strategy
from ._restarts import StrategyName as StrategyName
from ._retry import Retrying as Retrying
from ._retry import RetryStatistics as RetryStatistics
from ._retry import retry as retry
from ._retry_http import transient_http_error as transient_http_error
from ._runner import BatchRunner as BatchRunner
from ._runtime import Shutdown as Shutdown
from ._runtime import current_shutdown as current_shutdown
from ._runtime import run as run
from ._statistics import ChildState as ChildState
from ._statistics import ChildStatistics as ChildStatistics
from ._statistics import SupervisorStatistics as SupervisorStatistics
from ._stopping import current_stop as current_stop
from ._supervisor import Supervisor as Supervisor
from ._supervisor import open_supervisor as open_supervisor
from ._threads import ThreadIterator as ThreadIterator
from ._threads import iterate_in_thread as iterate_in_thread
from ._threads import to_thread as to_thread
from ._watchdog import heartbeat as heartbeat

__all__ = [
    "Backoff",
    "Batch",
    "BatchRunner",
    "BatchStatistics",
    "BreakerStatistics",
    "Bridge",
    "BridgeName",
    "BridgeStatistics",
    "ChannelStatistics",
    "ChildShutdown",
    "ChildStalled",
    "ChildStartError",
    "ChildState",
    "ChildStatistics",
    "CircuitBreaker",
    "CircuitOpen",
    "CircuitState",
    "ConsumerStatistics",
    "Consumers",
    "Cycle",
    "CycleStatistics",
    "DaskRunner",
    "DaskRunnerStatistics",
    "EngineError",
    "FailureRecord",
    "ForcedShutdown",
    "HasHealth",
    "HasStatistics",
    "Hub",
    "HubOverflow",
    "HubOverflowName",
    "HubStatistics",
    "LoopStall",
    "LoopStatistics",
    "LoopWatch",
    "OnError",
    "OnErrorName",
    "OpsServer",
    "Outcome",
    "Overflow",
    "OverflowName",
    "OverrunPolicy",
    "OverrunPolicyName",
    "Permit",
    "ProcessPool",
    "ProcessPoolStatistics",
    "ReceiveChannel",
    "Restart",
    "RestartIntensityExceeded",
    "RestartName",
    "RetryStatistics",
    "Retrying",
    "SendChannel",
    "SerializationError",
    "Shutdown",
    "ShutdownReport",
    "SourceHealth",
    "Status",
    "Strategy",
    "StrategyName",
    "SubscriberDisconnected",
    "Subscription",
    "SubscriptionStatistics",
    "Supervisor",
    "SupervisorError",
    "SupervisorStatistics",
    "Tally",
    "ThreadIterator",
    "WorkerCrashed",
    "WorkerStart",
    "WorkerStartName",
    "bridge_statistics",
    "configure_logging",
    "consume",
    "counter_metric",
    "current_shutdown",
    "current_stop",
    "every",
    "gauge_metric",
    "heartbeat",
    "iterate_in_thread",
    "map_batch",
    "metric_source",
    "open_channel",
    "open_loop_watch",
    "open_process_pool",
    "open_supervisor",
    "retry",
    "run",
    "run_batch",
    "serve_ops",
    "to_process",
    "to_thread",
    "transient_http_error",
]
