"""``engine.current_stop()``: the stop request that the calling code obeys.

A supervised child is asked to stop by its supervisor's
:meth:`~engine.Supervisor.shutdown`, one child at a time, in reverse start
order; code outside any supervised child obeys the run's own
:func:`engine.current_shutdown`. Both are :class:`~engine.Shutdown` objects,
so the same code stops the same way in either place.
"""

from __future__ import annotations

from ._runtime import Shutdown, current_shutdown
from ._watchdog import current_run

__all__ = ["child_stop", "current_stop"]


def current_stop() -> Shutdown:
    """The stop request the calling code should obey.

    Inside a supervised child: the child's own, requested when its
    supervisor's :meth:`~engine.Supervisor.shutdown` reaches it (later
    children are stopped first) and forced just before the child is
    cancelled at the end of its ``shutdown`` budget. Calling this marks the
    child as one that drains: a child that never asked for its stop request
    could not act on it, so its supervisor cancels it at once instead of
    waiting out its budget (as Erlang/OTP kills a worker that does not trap
    exits).

    Outside any supervised child: the run's :func:`engine.current_shutdown`.

    A source stops reading once :attr:`~engine.Shutdown.requested` is true
    (or :meth:`~engine.Shutdown.wait` returns); a consumer empties what is
    queued for it into its sink; then each returns.

    Raises:
        RuntimeError: called outside a trio run.
    """
    stop = child_stop()
    return current_shutdown() if stop is None else stop


def child_stop() -> Shutdown | None:
    """The current supervised child's stop request (marked watched), or ``None`` outside one.

    The engine's own parts (consumer groups, the broadcast) drain on this
    only: outside a supervisor nobody orders the stop, so they keep the
    behaviour they have there.
    """
    run = current_run.get()
    if run is None:
        return None
    run.stop_watched = True
    return run.stop
