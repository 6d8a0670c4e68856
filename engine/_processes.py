"""The process bridge: CPU-bound calls in worker processes, killed on cancel.

Built on trio-parallel, which kills only the worker running a cancelled call
and reaps it. On top, this module adds what a service needs to trust it: a
pool owned by an ``async with`` block (so no worker outlives it), a typed
error saying how a worker died, errors that say whether an argument or a
result could not be pickled, and counters.

Arguments and results are pickled here, not inside trio-parallel, so that a
pickling failure is attributed to the right side of the call.
"""

from __future__ import annotations

import enum
import logging
import math
import os
import pickle
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, Literal, TypeVar, TypeVarTuple

import attrs
import trio
import trio_parallel

from ._board import Board, CallSlot
from ._bridgestats import tally
from ._exceptions import SerializationError, WorkerCrashed
from ._validation import check_choice, check_count, check_duration
from ._virtual import real_work_in_flight

logger = logging.getLogger("engine.processes")

T = TypeVar("T")
PosArgsT = TypeVarTuple("PosArgsT")


class WorkerStart(enum.StrEnum):
    """How worker processes are started (see :mod:`multiprocessing`)."""

    SPAWN = "spawn"
    """A fresh interpreter for each worker: the safest, and the slowest to start."""
    FORKSERVER = "forkserver"
    """Forked from a clean server process started once."""
    FORK = "fork"
    """Forked from this process, threads and locks and all: quick, and unsafe with threads."""


# The enum's values again as a Literal (a type checker cannot derive one from
# the other; tests/test_quality.py holds the two equal). Every option enum is
# declared with this shape.
WorkerStartName = Literal["spawn", "forkserver", "fork"]
"""The values of :class:`WorkerStart`, as the strings ``open_process_pool`` also accepts."""


_WORKER_TYPES = {
    WorkerStart.SPAWN: trio_parallel.WorkerType.SPAWN,
    WorkerStart.FORKSERVER: trio_parallel.WorkerType.FORKSERVER,
    WorkerStart.FORK: trio_parallel.WorkerType.FORK,
}


class _ResultNotPicklable(Exception):
    """Raised in the worker when a result cannot be pickled (private)."""


def _describe(value: object, limit: int = 80) -> str:
    qualname = getattr(value, "__qualname__", None)
    if callable(value) and isinstance(qualname, str):
        return f"{getattr(value, '__module__', None) or '?'}.{qualname}"
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def pickle_call(fn: Callable[..., object], args: tuple[object, ...]) -> bytes:
    """``(fn, args)`` as bytes, or :class:`SerializationError` naming what failed."""
    try:
        return pickle.dumps((fn, args), protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as exc:
        for position, arg in enumerate(args):
            try:
                pickle.dumps(arg, protocol=pickle.HIGHEST_PROTOCOL)
            except Exception:
                raise SerializationError(
                    "argument",
                    f"argument {position} of {_describe(fn)}: {_describe(arg)} ({exc})",
                ) from exc
        raise SerializationError("argument", f"the function {_describe(fn)} ({exc})") from exc


def run_pickled(payload: bytes) -> bytes:
    """Worker side: unpickle ``(fn, args)``, call, pickle the result."""
    fn, args = pickle.loads(payload)
    result = fn(*args)
    try:
        return pickle.dumps(result, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as exc:
        raise _ResultNotPicklable(f"{_describe(result)} ({type(exc).__name__}: {exc})") from None


def crashed(error: trio_parallel.BrokenWorkerError, what: str) -> WorkerCrashed:
    """Translate trio-parallel's error into ours, with the exit code or signal."""
    process = error.args[-1] if error.args else None
    code = getattr(process, "exitcode", None)
    if isinstance(code, int) and code < 0:
        return WorkerCrashed(what, exit_code=None, signal=-code)
    return WorkerCrashed(what, exit_code=code if isinstance(code, int) else None, signal=None)


@attrs.frozen
class _RetireAfter:
    """Retire a worker after ``jobs`` calls; pickled once into each worker."""

    jobs: int
    done: list[int] = attrs.Factory(lambda: [0])

    def __call__(self) -> bool:
        self.done[0] += 1
        return self.done[0] >= self.jobs


@attrs.frozen
class ProcessPoolStatistics:
    """A snapshot of a process pool.

    Attributes:
        workers: the most calls it runs at once.
        busy: calls running (or starting a worker) now.
        idle_workers: started workers waiting for a call.
    """

    workers: int
    busy: int
    idle_workers: int


class ProcessPool:
    """Worker processes owned by an ``async with`` block; see :func:`open_process_pool`."""

    def __init__(self, context: trio_parallel.WorkerContext, workers: int) -> None:
        self._context = context
        self._workers = workers
        self._limiter = trio.CapacityLimiter(workers)
        # trio-parallel takes a limiter too; ours already bounds the calls.
        self._unlimited = trio.CapacityLimiter(math.inf)
        # Where map_batch calls report progress (see _board): one slot per
        # worker, made with the pool's first batch and kept until it closes.
        self._board: Board | None = None
        self._no_board = False  # the system would not give one

    def _progress_board(self) -> Board | None:
        """The pool's progress board, made on first use; ``None`` if the system gives none."""
        if self._board is None and not self._no_board:
            try:
                self._board = Board(self._workers)
            except OSError as exc:
                # Progress and cuts are an optimisation: batches do without them.
                logger.warning("no progress board for this process pool (%s)", exc)
                self._no_board = True
        return self._board

    def _close_board(self) -> None:
        if self._board is not None:
            self._board.close()
            self._board = None

    @property
    def workers(self) -> int:
        """The most calls the pool runs at once."""
        return self._workers

    def statistics(self) -> ProcessPoolStatistics:
        """A frozen snapshot of the pool."""
        return ProcessPoolStatistics(
            workers=self._workers,
            busy=self._limiter.borrowed_tokens,
            idle_workers=self._context.statistics().idle_workers,
        )

    async def run(
        self, fn: Callable[[*PosArgsT], T], *args: *PosArgsT, kill_on_cancel: bool = True
    ) -> T:
        """Run ``fn(*args)`` in a worker process and return its result.

        ``fn``, the arguments and the result must be picklable; ``fn`` must
        be importable by name in the worker (a module-level function).

        Cancellation:
            With ``kill_on_cancel=True`` (the default) cancelling the caller
            kills the worker running the call, reaps it, and raises
            ``trio.Cancelled`` at once; other workers are untouched. With
            ``False`` the caller waits for the call to finish.

        Raises:
            SerializationError: an argument or the result cannot be pickled
                (``direction`` says which).
            WorkerCrashed: the worker died during the call (a signal,
                ``os._exit``, a segfault); it says the exit code or signal.
            BaseException: whatever ``fn`` raised, re-raised here.
        """
        payload = pickle_call(fn, args)
        async with self._limiter:
            result: T = pickle.loads(await self._dispatch(payload, fn, kill_on_cancel))
            return result

    async def _dispatch(
        self, payload: bytes, fn: Callable[..., object], kill_on_cancel: bool
    ) -> bytes:
        """One call with a worker already reserved; the deadline clock may start now."""
        counters = tally()
        counters.process_calls += 1
        try:
            with real_work_in_flight():
                data: bytes = await self._context.run_sync(
                    run_pickled, payload, kill_on_cancel=kill_on_cancel, limiter=self._unlimited
                )
                return data
        except trio.Cancelled:
            if kill_on_cancel:
                counters.workers_killed += 1
            raise
        except trio_parallel.BrokenWorkerError as exc:
            counters.workers_crashed += 1
            raise crashed(exc, f"calling {_describe(fn)}") from exc
        except _ResultNotPicklable as exc:
            raise SerializationError("result", f"of {_describe(fn)}: {exc}") from exc

    async def warm(self) -> None:
        """Start every worker now, so the first calls do not pay for process start-up."""
        async with trio.open_nursery() as nursery:
            for _ in range(self._workers):
                nursery.start_soon(self.run, os.getpid)


@attrs.frozen
class WorkerLease:
    """One of a pool's worker places, held for one batch call (see :func:`lease_worker`).

    Attributes:
        pool: the pool.
        place: the call's slot on the pool's progress board; ``None`` when
            the pool has no board, and the call runs unwatched.
    """

    pool: ProcessPool
    place: CallSlot | None

    async def dispatch(self, payload: bytes, fn: Callable[..., object]) -> bytes:
        """Run a pickled call (see :func:`pickle_call`); cancelling it kills its worker."""
        return await self.pool._dispatch(payload, fn, kill_on_cancel=True)

    async def ensure_idle_worker(self) -> None:
        """Start a worker if none is idle, so the next call's deadline excludes start-up.

        A worker killed at a deadline is replaced by a new process whose
        start (a new interpreter and its imports, with ``spawn``) must not
        count against the next item's deadline. Another caller may still
        take the worker first; then that one call pays for a start, as any
        call to a cold pool does.
        """
        if self.pool._context.statistics().idle_workers == 0:
            await self._start_one()

    async def replace_lost_worker(self) -> None:
        """Start one new worker after one was killed or died, before its place is reused.

        trio-parallel starts a worker only when a call finds none idle, so
        ``idle + 1`` concurrent no-op calls force exactly one start (more
        only if other callers take idle workers meanwhile; extras retire
        after ``idle_timeout``).
        """
        wanted = self.pool._context.statistics().idle_workers + 1
        async with trio.open_nursery() as nursery:
            for _ in range(wanted):
                nursery.start_soon(self._start_one)

    async def _start_one(self) -> None:
        pool = self.pool
        await pool._context.run_sync(os.getpid, kill_on_cancel=True, limiter=pool._unlimited)


@asynccontextmanager
async def lease_worker(pool: ProcessPool) -> AsyncIterator[WorkerLease]:
    """Hold one of ``pool``'s worker places, with a slot on its progress board if it has one."""
    async with pool._limiter:
        # Holding a worker place, so a slot is free: the board has one per worker.
        board = pool._progress_board()
        if board is None:
            yield WorkerLease(pool, None)
            return
        place = CallSlot(board, board.take())
        try:
            yield WorkerLease(pool, place)
        finally:
            board.give_back(place.slot)


def open_process_pool(
    workers: int | None = None,
    *,
    initializer: Callable[[], object] | None = None,
    retire_after: int | None = None,
    idle_timeout: float = 600.0,
    start_method: WorkerStart | WorkerStartName = "spawn",
    grace_period: float = 5.0,
) -> AbstractAsyncContextManager[ProcessPool]:
    """Open a pool of worker processes: ``async with engine.open_process_pool(4) as pool:``.

    Workers start on demand (or all at once with :meth:`ProcessPool.warm`)
    and are shut down, and reaped, when the block ends: none outlives it.

    Args:
        workers: the most calls run at once; defaults to the number of CPUs.
        initializer: called once in each new worker (must be picklable).
        retire_after: replace a worker after this many calls (a leaky
            library, say); ``None`` keeps workers.
        idle_timeout: seconds an idle worker lives before it exits.
        start_method: ``"spawn"`` (default, safest), ``"forkserver"`` or ``"fork"``.
        grace_period: seconds the end of the block waits for workers to exit
            before killing them.

    Raises:
        ValueError: at call time, for a bad number or start method (named).
    """
    count = check_count(
        "workers", workers if workers is not None else (os.cpu_count() or 1), minimum=1
    )
    retire: Callable[[], object] = bool
    if retire_after is not None:
        retire = _RetireAfter(check_count("retire_after", retire_after, minimum=1))
    if initializer is not None and not callable(initializer):
        raise TypeError(f"initializer must be callable, got {initializer!r}")
    method = check_choice("start_method", start_method, WorkerStart)
    return _open_pool(
        count,
        init=initializer if initializer is not None else bool,
        retire=retire,
        idle_timeout=check_duration("idle_timeout", idle_timeout),
        worker_type=_WORKER_TYPES[method],
        grace_period=check_duration("grace_period", grace_period, allow_zero=True),
    )


@asynccontextmanager
async def _open_pool(workers: int, **options: Any) -> AsyncIterator[ProcessPool]:
    body_error: BaseException | None = None
    try:
        async with trio_parallel.open_worker_context(**options) as context:
            pool = ProcessPool(context, workers)
            try:
                yield pool
            except BaseException as exc:
                body_error = exc
                raise
            finally:
                pool._close_board()
    except trio_parallel.BrokenWorkerError as exc:
        if exc is body_error:
            raise
        # Raised by the close: a worker did not exit cleanly, typically because
        # the signal that stops the service (Ctrl-C, or SIGTERM to its process
        # group) reached the workers too. They are gone all the same; what the
        # block itself raised, if anything, is what the caller needs.
        logger.warning("process pool closed with dead workers: %s", exc)
        if body_error is not None:
            raise body_error from None


# -- engine.to_process: a default pool per trio run ------------------------------


@attrs.define
class _DefaultPool:
    ready: trio.Event = attrs.Factory(trio.Event)
    pool: ProcessPool | None = None


_DEFAULT: trio.lowlevel.RunVar[_DefaultPool] = trio.lowlevel.RunVar("engine_default_pool")


async def _keep_default_pool(holder: _DefaultPool) -> None:
    # A system task: it lives until the run's main task ends, then its pool
    # closes and reaps the workers, so none outlives engine.run.
    try:
        async with open_process_pool() as pool:
            holder.pool = pool
            holder.ready.set()
            await trio.sleep_forever()
    except trio_parallel.BrokenWorkerError as exc:  # a worker would not exit cleanly
        logger.warning("default process pool: %s", exc)


async def to_process(
    fn: Callable[[*PosArgsT], T], *args: *PosArgsT, kill_on_cancel: bool = True
) -> T:
    """Run ``fn(*args)`` in a worker process of the run's default pool.

    The default pool has one worker per CPU and closes when the trio run
    ends. Open your own with :func:`open_process_pool` to choose its size,
    initializer or retire policy, or to warm it up.

    Cancellation and errors: as :meth:`ProcessPool.run`.
    """
    pool = await default_pool()
    return await pool.run(fn, *args, kill_on_cancel=kill_on_cancel)


async def default_pool() -> ProcessPool:
    """The run's default pool (see :func:`to_process`), opened on first use."""
    try:
        holder = _DEFAULT.get()
    except LookupError:
        holder = _DefaultPool()
        _DEFAULT.set(holder)
        trio.lowlevel.spawn_system_task(_keep_default_pool, holder, name="engine default pool")
    await holder.ready.wait()
    assert holder.pool is not None
    return holder.pool
