"""The engine's pytest plugin, loaded in every session through its entry point.

It only registers two ini options and three fixtures; the work happens in
fixtures that are no-ops unless enabled, so loading it costs nothing beyond
importing the engine.

* ``engine_leak_check`` (bool, default false): check every test for leaked
  threads and child processes (the autouse fixture below).
* ``engine_leak_grace`` (seconds, default 1.0): how long (real time) a
  leftover thread or process gets to finish before it counts as a leak.
* ``leak_check``: request it to check one test when the ini option is off.
* ``no_task_leaks``: async fixture; fails the test if a task it spawned is
  still alive when it returns (see :func:`engine.testing.assert_no_task_leaks`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
import trio

from .._validation import check_duration
from ._leaks import Snapshot, find_leaks
from ._tasks import _tracking

_GRACE = pytest.StashKey[float]()


def pytest_addoption(parser: pytest.Parser) -> None:
    """Register the plugin's ini options."""
    parser.addini(
        "engine_leak_check",
        "fail tests that leave threads or child processes behind",
        type="bool",
        default=False,
    )
    parser.addini(
        "engine_leak_grace",
        "seconds a leftover thread or child process gets to end before it is a leak (1.0)",
        default="1.0",
    )


def pytest_configure(config: pytest.Config) -> None:
    """Validate ``engine_leak_grace`` once, before any test runs."""
    raw = config.getini("engine_leak_grace")
    try:
        grace = check_duration("engine_leak_grace", float(raw), allow_zero=True)
    except (TypeError, ValueError) as exc:
        raise pytest.UsageError(f"engine_leak_grace must be seconds >= 0, got {raw!r}") from exc
    config.stash[_GRACE] = grace


@pytest.fixture(autouse=True)
def _engine_leak_check(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail the test if it left threads or child processes behind (when enabled).

    Autouse and registered by a plugin, so it is set up before the test's
    other function-scoped fixtures and torn down after them, after trio.run
    has returned: what it finds outlived the test and all its fixtures.
    """
    enabled = request.config.getini("engine_leak_check") or "leak_check" in request.fixturenames
    if not enabled:
        yield
        return
    before = Snapshot.take()
    yield
    leaks = find_leaks(before, grace=request.config.stash[_GRACE])
    if leaks:
        pytest.fail(f"{request.node.nodeid} left behind {leaks}", pytrace=False)


@pytest.fixture
def leak_check() -> None:
    """Check this test for leaked threads and child processes.

    Only needed where the ``engine_leak_check`` ini option is off; request
    it with ``@pytest.mark.usefixtures("leak_check")``. The check itself runs
    at teardown, after every other function-scoped fixture: a thread still
    running Python code, or a child process still running, that was not
    there before the test fails it (as an error at teardown). Idle trio
    worker threads, zombies and multiprocessing's resource tracker and
    forkserver do not count. See :func:`engine.testing.find_leaks`.
    """


@pytest.fixture
async def no_task_leaks() -> AsyncIterator[None]:
    """Fail the test if a task it spawned is still alive when it returns.

    Catches tasks the test spawned (directly or through the code it calls)
    into a nursery that outlives it: another fixture's nursery, a service
    object's, or the system nursery. pytest-trio's own ``nursery`` fixture
    is cancelled and drained before this check runs, so tasks left there are
    not reported. Needs pytest-trio.
    """
    with _tracking([_current_test_task()]) as tracker:
        yield
    tracker.check("the test")


def _current_test_task() -> trio.lowlevel.Task:
    # pytest-trio runs the test and each trio fixture as sibling tasks in one
    # nursery and names the test's task "<test 'test_name'>".
    nursery = trio.lowlevel.current_task().parent_nursery
    siblings = [] if nursery is None else nursery.child_tasks
    tests = [task for task in siblings if task.name.startswith("<test ")]
    if len(tests) != 1:
        raise RuntimeError(
            "no_task_leaks could not find the test's task among pytest-trio's tasks "
            f"(found {[task.name for task in siblings]}); it needs pytest-trio >= 0.8"
        )
    return tests[0]
