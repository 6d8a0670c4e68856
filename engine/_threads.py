"""The thread bridges: one call in a thread, and a blocking source drained by a thread.

A blocking call inside an async task freezes the event loop, and with it
everything the process serves, ``/health`` included. Blocking calls belong
in threads, and a thread must never be able to hold the service hostage:
the caller can always be cancelled, and a thread left behind is counted,
never silently waited for.
"""

from __future__ import annotations

import collections
import contextvars
import inspect
import logging
import threading
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Generic, TypeVar, TypeVarTuple

import attrs
import trio

from ._asyncwith import async_with_only
from ._bridgestats import tally
from ._validation import check_count, check_duration
from ._virtual import real_work_in_flight
from ._watchdog import current_run

logger = logging.getLogger("engine.threads")

T = TypeVar("T")
PosArgsT = TypeVarTuple("PosArgsT")

# How long, in real seconds, the end of an iterate_in_thread block waits for a
# thread blocked inside the source's next() before abandoning it.
_ITERATOR_STOP_WAIT = 1.0


@attrs.define
class _Call:
    started: bool = False  # the thread has begun fn
    cancelled: bool = False  # the caller was cancelled
    done: bool = False
    abandoned: bool = False


async def to_thread(
    fn: Callable[[*PosArgsT], T],
    *args: *PosArgsT,
    abandon_on_cancel: bool = True,
    limiter: trio.CapacityLimiter | None = None,
) -> T:
    """Run the blocking ``fn(*args)`` in a worker thread and return its result.

    Context variables travel with the call, so ``engine.heartbeat()`` works
    inside ``fn``. Worker threads are daemon threads: a thread still running
    never keeps the interpreter from exiting.

    Cancellation:
        With ``abandon_on_cancel=True`` (the default), cancelling the caller
        returns control at once: ``trio.Cancelled`` is raised while the
        thread runs on to the end of ``fn``, whose result is then dropped.
        Such a thread is counted in :func:`engine.bridge_statistics` as
        abandoned (and as running, until it ends). With ``False`` the caller
        waits for ``fn`` to return, as ``trio.to_thread.run_sync`` does.

    Args:
        fn: a synchronous function.
        *args: its positional arguments.
        abandon_on_cancel: see Cancellation.
        limiter: caps concurrent threads; trio's default limiter (40) if omitted.

    Returns:
        What ``fn`` returned; whatever it raised is raised here.
    """
    counters = tally()
    counters.thread_calls += 1
    call = _Call()

    def abandon() -> None:  # under counters.lock
        call.abandoned = True
        counters.threads_abandoned += 1
        counters.threads_abandoned_running += 1

    def run() -> T:
        with counters.lock:
            call.started = True
            if call.cancelled:  # the caller gave up before this thread began
                abandon()
        try:
            return fn(*args)
        finally:
            with counters.lock:
                call.done = True
                if call.abandoned:
                    counters.threads_abandoned_running -= 1

    try:
        with real_work_in_flight():
            return await trio.to_thread.run_sync(
                run, abandon_on_cancel=abandon_on_cancel, limiter=limiter
            )
    except trio.Cancelled:
        with counters.lock:
            call.cancelled = True
            # A call cancelled while it waited for its limiter never starts a
            # thread: nothing is abandoned. One whose thread has yet to begin
            # counts itself when it does.
            if call.started and not call.done:
                abandon()
        raise


class ThreadIterator(Generic[T]):
    """The async iterator that :func:`iterate_in_thread` yields.

    ``async for item in it`` takes one item at a time;
    :meth:`receive_batch` takes everything that has arrived (up to
    ``max_batch``) in one call.
    """

    def __init__(self, pump: _Pump[T]) -> None:
        self._pump = pump
        self._pending: collections.deque[T] = collections.deque()

    def __aiter__(self) -> AsyncIterator[T]:
        return self

    async def __anext__(self) -> T:
        if not self._pending:
            try:
                self._pending.extend(await self._pump.take())
            except trio.EndOfChannel:
                raise StopAsyncIteration from None
        else:
            await trio.lowlevel.checkpoint()
        return self._pending.popleft()

    async def receive_batch(self) -> list[T]:
        """Every item that has arrived, up to ``max_batch``; waits for at least one.

        Raises:
            trio.EndOfChannel: the source is exhausted.
            BaseException: whatever the source raised, once its items are consumed.
        """
        if self._pending:
            await trio.lowlevel.checkpoint()
            batch = list(self._pending)
            self._pending.clear()
            return batch
        return await self._pump.take()


class _Pump(Generic[T]):
    """A thread that moves items from a blocking source into a bounded buffer."""

    def __init__(
        self,
        produce: Callable[[_Pump[T]], None],
        *,
        max_batch: int,
        buffer: int,
        name: str,
    ) -> None:
        self._produce = produce
        self.max_batch = max_batch
        self.buffer = buffer
        self._items: collections.deque[T] = collections.deque()
        self._condition = threading.Condition()
        self.stopping = False
        self._finished = False
        self._error: BaseException | None = None
        self._waiting: trio.Event | None = None
        self._token = trio.lowlevel.current_trio_token()
        # The caller's context variables travel into the thread, as with
        # trio.to_thread: heartbeat() there beats the caller's supervised child.
        context = contextvars.copy_context()
        self._thread = threading.Thread(
            target=context.run, args=(self._main,), name=name, daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    # -- in the thread -------------------------------------------------------

    def _main(self) -> None:
        try:
            self._produce(self)
        except BaseException as exc:
            self._error = exc
        finally:
            with self._condition:
                self._finished = True
                self._wake_locked()

    def put(self, item: T) -> bool:
        """Append ``item``, waiting for room; False once the consumer has left."""
        with self._condition:
            while len(self._items) >= self.buffer and not self.stopping:
                self._condition.wait()
            if self.stopping:
                return False
            self._items.append(item)
            self._wake_locked()
            return True

    def _wake_locked(self) -> None:
        waiting, self._waiting = self._waiting, None
        if waiting is not None:
            self._token.run_sync_soon(waiting.set)

    # -- in trio -------------------------------------------------------------

    async def take(self) -> list[T]:
        while True:
            with self._condition:
                if self._items:
                    count = min(self.max_batch, len(self._items))
                    batch = [self._items.popleft() for _ in range(count)]
                    self._condition.notify()
                    break
                if self._finished:
                    error, self._error = self._error, None
                    if error is not None:
                        raise error
                    raise trio.EndOfChannel
                event = self._waiting = trio.Event()
            await event.wait()
        await trio.lowlevel.checkpoint()
        return batch

    async def stop(self) -> None:
        with self._condition:
            self.stopping = True
            self._condition.notify_all()
        if not self._thread.is_alive():
            return
        # Real time, in a worker thread, shielded: the thread is stopped or
        # given up on within a bound whatever the clock or our cancel state.
        with trio.CancelScope(shield=True), real_work_in_flight():
            await trio.to_thread.run_sync(self._thread.join, _ITERATOR_STOP_WAIT)
        if self._thread.is_alive():
            tally().iterator_threads_abandoned += 1
            logger.warning(
                "thread %r is still blocked in its source after %.1f s; abandoning it "
                "(it is a daemon thread and ends with its source or the process)",
                self._thread.name,
                _ITERATOR_STOP_WAIT,
            )


def iterate_in_thread(
    source: Iterable[T] | Callable[[], Iterable[T]] | None = None,
    *,
    poll: Callable[[float], T | None] | None = None,
    poll_interval: float = 0.1,
    close: Callable[[], object] | None = None,
    max_batch: int = 1000,
    buffer: int = 10_000,
) -> AbstractAsyncContextManager[ThreadIterator[T]]:
    """Drain a blocking source in a thread and iterate it from trio.

    ::

        async with engine.iterate_in_thread(poll=lambda t: pubsub.get_message(timeout=t),
                                            close=pubsub.close) as messages:
            async for message in messages:
                ...

    One thread per block reads the source and hands items over in batches:
    each wakeup of the event loop takes everything that arrived since the
    last one (up to ``max_batch``), so a burst costs one trip through the
    scheduler, not one per item. The buffer between them is bounded: when
    the consumer falls behind, the thread waits (backpressure, no loss).

    Give exactly one of:

    - ``source``: an iterable, or a zero-argument callable returning one
      (called in the thread, so a blocking ``pubsub.listen()`` is created
      there). The thread calls ``next()`` on it.
    - ``poll``: called in the thread as ``poll(poll_interval)``; returns an
      item, or ``None`` when nothing arrived within that many seconds.

    Heartbeats:
        The thread runs with the caller's context variables and calls
        :func:`engine.heartbeat` after every ``poll`` that returns, even
        empty, and after every item a ``source`` yields. Inside a
        supervised child started with ``stall_after``, a quiet source
        therefore keeps the child alive, while a wedged one (a ``poll``
        that never returns, an iterator blocked in ``next()``) lets the
        watchdog cancel it. An iterator that may stay quiet for longer
        than ``stall_after`` belongs in ``poll``.

    Cancellation:
        Leaving the block (normally, by an error or by cancellation) stops
        the thread. A ``poll`` source stops within ``poll_interval``. A
        ``source`` iterator blocked inside ``next()`` cannot be interrupted:
        the bridge waits up to 1 s of real time for it, then abandons the
        daemon thread and counts it (``iterator_threads_abandoned``). Either
        way the source is closed in its own thread when the thread ends
        (``close()`` on a generator, or the ``close`` callable).

    Args:
        source: a blocking iterable or a factory of one.
        poll: a ``get(timeout)``-style function.
        poll_interval: seconds per ``poll`` call; bounds how fast it stops.
        close: called in the thread when it ends, to release the source.
        max_batch: the most items handed over per wakeup; at least 1.
        buffer: the most items waiting between thread and consumer; at least 1.

    Returns:
        An async context manager yielding a :class:`ThreadIterator`.

    Raises:
        ValueError: at call time, for both or neither of ``source`` and
            ``poll``, or a bad number (named).
        TypeError: at call time, for a ``source`` that is neither an
            iterable nor a callable of no arguments, or a ``poll`` or
            ``close`` that is not callable; during iteration, for a
            ``source`` factory that returned something not iterable (a
            ``get``-style function belongs in ``poll``).
    """
    if (source is None) == (poll is None):
        raise ValueError("give exactly one of source (an iterable) and poll (a get(timeout))")
    interval = check_duration("poll_interval", poll_interval)
    batch = check_count("max_batch", max_batch, minimum=1)
    bound = check_count("buffer", buffer, minimum=1)
    if close is not None and not callable(close):
        raise TypeError(f"close must be callable, got {close!r}")
    if poll is not None:
        if not callable(poll):
            raise TypeError(f"poll must be a get(timeout)-style callable, got {poll!r}")
        read = _polling(poll, interval)
    else:
        read = _iterating(_checked_source(source))

    def produce(pump: _Pump[T]) -> None:
        try:
            read(pump)
        finally:
            if close is not None:
                close()

    return async_with_only(
        _pumping(produce, batch, bound),
        call="engine.iterate_in_thread",
        target="items",
        loop="item",
    )


@asynccontextmanager
async def _pumping(
    produce: Callable[[_Pump[T]], None], max_batch: int, buffer: int
) -> AsyncIterator[ThreadIterator[T]]:
    pump: _Pump[T] = _Pump(produce, max_batch=max_batch, buffer=buffer, name="engine iterator")
    pump.start()
    try:
        yield ThreadIterator(pump)
    finally:
        await pump.stop()


_GET_STYLE = "a get(timeout)-style function belongs in poll="


def _checked_source(source: object) -> Callable[[], Iterable[T]]:
    """A zero-argument callable returning ``source``'s iterable, or a ``TypeError`` now."""
    if isinstance(source, Iterable):
        return lambda: source
    if not callable(source):
        raise TypeError(
            f"source must be an iterable or a zero-argument callable returning one, got {source!r}"
        )
    required = _required_parameters(source)
    if required:
        raise TypeError(
            f"source {source!r} is called with no arguments, but it requires"
            f" {', '.join(required)}: {_GET_STYLE}"
        )
    return source  # its result is checked when it is called, in the thread


def _required_parameters(fn: Callable[..., object]) -> list[str]:
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # some builtins have none: judge the result instead
        return []
    empty = inspect.Parameter.empty
    variadic = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    return [
        name
        for name, parameter in signature.parameters.items()
        if parameter.default is empty and parameter.kind not in variadic
    ]


def _beater() -> Callable[[], None]:
    """What beats the caller's supervised child, looked up once per thread."""
    run = current_run.get()
    return run.beat if run is not None else _nothing


def _nothing() -> None:
    pass


def _polling(poll: Callable[[float], T | None], interval: float) -> Callable[[_Pump[T]], None]:
    def read(pump: _Pump[T]) -> None:
        beat = _beater()
        while not pump.stopping:
            item = poll(interval)
            beat()  # even for an empty poll: the source answered
            if item is not None and not pump.put(item):
                return

    return read


def _iterating(factory: Callable[[], Iterable[T]]) -> Callable[[_Pump[T]], None]:
    def read(pump: _Pump[T]) -> None:
        beat = _beater()
        iterable = factory()
        if not isinstance(iterable, Iterable):
            raise TypeError(
                f"source() returned {iterable!r}, which is not iterable: source is an iterable"
                f" or a zero-argument factory of one, and {_GET_STYLE}"
            )
        iterator: Iterator[T] = iter(iterable)
        try:
            for item in iterator:
                beat()
                if not pump.put(item):
                    return
        finally:
            closer = getattr(iterator, "close", None)
            if callable(closer):
                closer()

    return read
