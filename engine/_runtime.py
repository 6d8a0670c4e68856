"""``engine.run``: trio plus SIGINT/SIGTERM handling and a graceful stop.

The first stop signal does not cancel anything: it *requests* a stop through
the run's :class:`Shutdown`, which the service's code watches. The work then
has ``grace_period`` seconds to finish what it has in flight and return.
Only when the grace expires, or a second signal arrives, does the runtime
cancel ``main`` and raise :class:`~engine.ForcedShutdown`.
"""

from __future__ import annotations

import inspect
import logging
import math
import signal as signal_module
import threading
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any, TypeVar, TypeVarTuple, Unpack

import attrs
import trio

from ._exceptions import ForcedShutdown
from ._runlocal import run_local
from ._validation import check_count, check_duration, check_name

__all__ = ["Shutdown", "current_shutdown", "run"]

logger = logging.getLogger("engine.runtime")

T = TypeVar("T")
PosArgsT = TypeVarTuple("PosArgsT")

STOP_SIGNALS = (signal_module.SIGINT, signal_module.SIGTERM)
DEFAULT_GRACE_PERIOD = 10.0


@attrs.define(eq=False)
class Shutdown:
    """The stop request of one trio run: what work watches to stop on its own.

    Get the run's instance with :func:`current_shutdown`. Long-running work
    stops taking new items once :attr:`requested` is true (or
    :meth:`wait` returns), finishes what it has in flight, and returns.

    All methods must be called from the trio thread of the run; from a worker
    thread use ``trio.from_thread.run_sync(shutdown.request, reason)``.

    Attributes:
        reason: why the stop was requested, or ``None`` while it was not.
        signal: the number of the signal that requested it, if one did.
        requested_at: ``trio.current_time()`` of the request, or ``None``.
        force_reason: why the stop was forced, or ``None`` while it was not.
    """

    reason: str | None = attrs.field(default=None, init=False)
    signal: int | None = attrs.field(default=None, init=False)
    requested_at: float | None = attrs.field(default=None, init=False)
    force_reason: str | None = attrs.field(default=None, init=False)
    _requested: trio.Event = attrs.field(factory=trio.Event, init=False, repr=False)
    _forced: trio.Event = attrs.field(factory=trio.Event, init=False, repr=False)

    @property
    def requested(self) -> bool:
        """Whether a stop has been requested (cheap; poll it between items)."""
        return self._requested.is_set()

    @property
    def forced(self) -> bool:
        """Whether the stop has been forced, so ``main`` is being cancelled."""
        return self._forced.is_set()

    async def wait(self) -> None:
        """Return once a stop has been requested (at once if it already was).

        It always checkpoints, like every async function of trio.
        """
        await self._requested.wait()

    def request(self, reason: str, *, signal: int | None = None) -> None:
        """Ask the work of this run to stop gracefully.

        The first request wins; later ones change nothing. Under
        :func:`engine.run` the request starts the grace period.

        Args:
            reason: why, in words, for the logs (``"received SIGTERM"``).
            signal: the number of the signal behind the request, if any.

        Raises:
            ValueError: ``reason`` is not a non-empty string.
            TypeError: ``signal`` is not an int.
        """
        check_name("reason", reason)
        if signal is not None:
            check_count("signal", signal, minimum=1)
        if self.requested:
            return
        self.reason = reason
        self.signal = signal
        self.requested_at = trio.current_time()
        self._requested.set()

    def force(self, reason: str) -> None:
        """Stop at once: :func:`engine.run` cancels ``main`` without more grace.

        Requests the stop first if nobody had. The first call wins.

        Args:
            reason: why the stop is forced, in words.

        Raises:
            ValueError: ``reason`` is not a non-empty string.
        """
        check_name("reason", reason)
        self.request(reason)
        if self.forced:
            return
        self.force_reason = reason
        self._forced.set()

    async def wait_forced(self) -> None:
        """Return once the stop has been forced (the runtime's cancel trigger)."""
        await self._forced.wait()


_SHUTDOWN: trio.lowlevel.RunVar[Shutdown] = trio.lowlevel.RunVar("engine_shutdown")


def current_shutdown() -> Shutdown:
    """The :class:`Shutdown` of the current trio run, created on first use.

    :func:`engine.run` signals through this same object, and code running
    under plain ``trio.run`` or pytest-trio can use it (and trigger it with
    :meth:`Shutdown.request`) the same way.

    Returns:
        The run's shutdown signal.

    Raises:
        RuntimeError: called outside a trio run.
    """
    return run_local(_SHUTDOWN, Shutdown)


def run(
    main: Callable[[Unpack[PosArgsT]], Awaitable[T]],
    *args: *PosArgsT,
    grace_period: float = DEFAULT_GRACE_PERIOD,
    handle_signals: bool = True,
) -> T:
    """Run ``main(*args)`` under trio until it returns, stopping gracefully on a signal.

    The first SIGINT or SIGTERM requests a stop through
    :func:`current_shutdown`; ``main`` then has ``grace_period`` seconds to
    return on its own. A second signal, or the grace expiring, cancels
    ``main`` at once. ``run`` starts no threads or processes of its own.

    Args:
        main: the async function to run.
        *args: positional arguments for ``main``.
        grace_period: seconds ``main`` may take to return after a stop was
            requested; ``0`` cancels at once, ``math.inf`` waits for ever
            (only a second signal or :meth:`Shutdown.force` then cancels).
        handle_signals: install SIGINT/SIGTERM handlers for the run. Signals
            can only be received in the main thread; pass ``False`` to run
            elsewhere (stops can still be requested through the
            :class:`Shutdown`).

    Returns:
        What ``main`` returned, whether or not a stop was requested.

    Raises:
        ForcedShutdown: the runtime had to cancel ``main``; its
            ``exit_status`` is ``128 + signal`` for ``sys.exit``.
        TypeError: ``main`` is not callable, or ``grace_period`` not a number.
        ValueError: ``grace_period`` is negative or NaN.
        RuntimeError: ``handle_signals`` is true outside the main thread.
        BaseException: whatever ``main`` raised, unchanged (groups stay groups).
    """
    _check_main(main)
    grace = check_duration("grace_period", grace_period, allow_zero=True)
    if handle_signals and threading.current_thread() is not threading.main_thread():
        raise RuntimeError(
            "engine.run(handle_signals=True) must be called from the main thread, the "
            "only one that can receive signals; pass handle_signals=False elsewhere"
        )
    return trio.run(_run_root, main, args, grace, handle_signals)


def _check_main(main: object) -> None:
    if inspect.iscoroutine(main):
        main.close()  # so the mistake does not also warn "never awaited"
        raise TypeError(f"main must be an async function, got {main!r}: pass main, not main()")
    if not callable(main):
        raise TypeError(f"main must be an async function, got {main!r}")


async def _run_root(
    main: Callable[..., Awaitable[T]],
    args: tuple[Any, ...],
    grace_period: float,
    handle_signals: bool,
) -> T:
    if not handle_signals:
        return await _serve_main(main, args, grace_period)
    with _stop_signal_handlers(current_shutdown()):
        return await _serve_main(main, args, grace_period)


async def _serve_main(
    main: Callable[..., Awaitable[T]],
    args: tuple[Any, ...],
    grace_period: float,
) -> T:
    """Run ``main`` until it returns, cancelling it when the stop is forced.

    Main's own outcome is captured and re-raised outside the nursery, so its
    exceptions are not wrapped in an extra group.
    """
    shutdown = current_shutdown()
    main_scope = trio.CancelScope()
    error: BaseException | None = None
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_expire_grace, shutdown, grace_period)
        nursery.start_soon(_cancel_when_forced, shutdown, main_scope)
        try:
            with main_scope:
                result = await main(*args)
        except BaseException as exc:  # re-raised below, outside the nursery
            error = exc
        finally:
            nursery.cancel_scope.cancel()
    if error is not None:
        try:
            raise error
        finally:
            del error  # break the frame <-> traceback cycle
    if main_scope.cancelled_caught:
        raise ForcedShutdown(
            f"{shutdown.force_reason} (stop requested: {shutdown.reason})", shutdown.signal
        )
    return result


async def _expire_grace(shutdown: Shutdown, grace_period: float) -> None:
    await shutdown.wait()
    requested_at = shutdown.requested_at
    assert requested_at is not None  # set before the event
    limit = "no time limit" if math.isinf(grace_period) else f"{grace_period:g} s"
    logger.info("stop requested (%s); main has %s to finish", shutdown.reason, limit)
    # From the request, not from now: a request made before the run still counts.
    await trio.sleep_until(requested_at + grace_period)
    shutdown.force(f"grace period of {grace_period:g} s expired")


async def _cancel_when_forced(shutdown: Shutdown, main_scope: trio.CancelScope) -> None:
    await shutdown.wait_forced()
    logger.warning("stop forced (%s); cancelling main", shutdown.force_reason)
    main_scope.cancel()


@attrs.define(eq=False)
class StopSignals:
    """What SIGINT/SIGTERM do in a run: the first requests a stop, the next forces it.

    Signals are counted, not requests: when code already requested the stop,
    the first signal still leaves it graceful and only a second one forces it.
    """

    shutdown: Shutdown
    received: int = 0

    def on_signal(self, signum: int) -> None:
        self.received += 1
        name = signal_module.Signals(signum).name
        if self.received == 1:
            if self.shutdown.requested:
                logger.info("received %s; a stop was already requested", name)
            self.shutdown.request(f"received {name}", signal=signum)
        elif not self.shutdown.forced:
            self.shutdown.force(f"received {name} while stopping")
        else:
            logger.info("received %s; the stop is already forced", name)


@contextmanager
def _stop_signal_handlers(shutdown: Shutdown) -> Iterator[None]:
    """Route SIGINT/SIGTERM to :class:`StopSignals` while the block runs.

    Not ``trio.open_signal_receiver``: it coalesces repeats of one signal
    that arrive while the loop is busy (a second SIGTERM would be lost), and
    it re-raises signals still pending when it closes, which for a SIGTERM
    racing main's return kills the process instead of exiting 0.
    """
    token = trio.lowlevel.current_trio_token()
    stop_signals = StopSignals(shutdown)

    def handler(signum: int, frame: FrameType | None) -> None:
        # run_sync_soon is safe in a signal handler; each signal is queued, none merged.
        token.run_sync_soon(stop_signals.on_signal, signum)

    originals: dict[int, Any] = {}
    try:
        for stop_signal in STOP_SIGNALS:
            originals[stop_signal] = signal_module.signal(stop_signal, handler)
        yield
    finally:
        for signum, original in originals.items():
            signal_module.signal(signum, original)
