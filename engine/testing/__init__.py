"""What users of the engine need to test their own services.

* :class:`Stopwatch`: exact elapsed trio time, for virtual-clock assertions.
* :class:`Scripted` with :class:`Finish`, :class:`Fail` and :class:`Hang`:
  an async fake whose calls take scripted (virtual) time and are recorded.
* :class:`VirtualBridge`: a ``map_batch`` bridge whose items take declared
  virtual time, so item deadlines are tested in milliseconds.
* :class:`Snapshot` and :func:`find_leaks`: threads and child processes left
  behind; :func:`assert_no_task_leaks`: tasks left behind.

The pytest plugin (``engine.testing._plugin``, loaded through its entry point)
adds the fixtures ``leak_check`` and ``no_task_leaks`` and the ini options
``engine_leak_check`` and ``engine_leak_grace``; see ``docs/testing.md``.
This package does not import pytest.
"""

from __future__ import annotations

from ._bridge import VirtualBridge as VirtualBridge
from ._clock import Stopwatch as Stopwatch
from ._leaks import LeakedProcess as LeakedProcess
from ._leaks import LeakedThread as LeakedThread
from ._leaks import Leaks as Leaks
from ._leaks import Snapshot as Snapshot
from ._leaks import find_leaks as find_leaks
from ._scripted import CallRecord as CallRecord
from ._scripted import CallStatus as CallStatus
from ._scripted import Fail as Fail
from ._scripted import Finish as Finish
from ._scripted import Hang as Hang
from ._scripted import Scripted as Scripted
from ._scripted import Step as Step
from ._tasks import assert_no_task_leaks as assert_no_task_leaks

__all__ = [
    "CallRecord",
    "CallStatus",
    "Fail",
    "Finish",
    "Hang",
    "LeakedProcess",
    "LeakedThread",
    "Leaks",
    "Scripted",
    "Snapshot",
    "Step",
    "Stopwatch",
    "VirtualBridge",
    "assert_no_task_leaks",
    "find_leaks",
]
