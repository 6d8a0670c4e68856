"""What becomes of the items of a failed call: a plain decision (private).

A call fails when it runs out of time, its worker dies, or its results
cannot be loaded. By default its items run again so that each gets its own
true outcome: the suspects (the item that hung, crashed the worker or could
not travel, or every item when which is unknown) alone, first in line; the
items whose results died with the worker, next. With ``at_most_once`` no
item that may have run runs again: each ends with the call's failure.
"""

from __future__ import annotations

from collections.abc import Sequence

import attrs
import trio

from ._exceptions import SerializationError, WorkerCrashed
from ._outcome import Status
from ._runner import ChunkReport


@attrs.frozen
class Ending:
    """An item that ends now, without a value."""

    index: int
    status: Status
    error: BaseException | None
    ran: float = 0.0


@attrs.frozen
class Settlement:
    """What becomes of the items of a failed call.

    Attributes:
        ended: the items that end now, in order.
        alone: the items that run again alone, first in line.
        again: the items that run again next, in calls of several.
        another_attempt: whether those running again had run (their
            ``attempts`` go up); a call its worker could not unpickle ran none.
        split: whether this counts as a split chunk in the batch's statistics.
        warning: what to log, if anything.
    """

    ended: tuple[Ending, ...] = ()
    alone: tuple[int, ...] = ()
    again: tuple[int, ...] = ()
    another_attempt: bool = False
    split: bool = False
    warning: str | None = None


def settle_failed_call(
    report: ChunkReport, *, size: int, deadline: float, at_most_once: bool
) -> Settlement:
    """The decision for a call of ``size`` items whose report names items that did not finish."""
    timed_out = tuple(
        Ending(index, Status.TIMEOUT, report.failure, ran) for index, ran in report.timed_out
    )
    if not (report.unknown or report.lost):
        return Settlement(timed_out)
    failure = report.failure
    assert failure is not None
    if size == 1 and report.unknown:
        # Sent alone (not left alone by a cut: that call had a chunk's
        # time), the item had its whole deadline.
        (index,) = report.unknown
        if isinstance(failure, trio.TooSlowError):
            ending = Ending(index, Status.TIMEOUT, failure, deadline)
        elif isinstance(failure, SerializationError):
            ending = Ending(index, Status.ERROR, failure)
        else:
            ending = Ending(index, Status.CRASHED, failure)
        return Settlement((*timed_out, ending))
    if isinstance(failure, SerializationError):
        # The worker could not unpickle the call: no item ran, so each may
        # run again alone, once, even at most once.
        return attrs.evolve(_run_again(report.unknown, failure, ran=False), ended=timed_out)
    if at_most_once:
        return _end_with_the_call(report.unknown, failure, report.lost, deadline, timed_out)
    return attrs.evolve(_run_again(report.unknown, failure, report.lost), ended=timed_out)


def settle_lost_results(
    indices: Sequence[int], ran: Sequence[float], failure: BaseException, *, at_most_once: bool
) -> Settlement:
    """The decision for a call whose results, for items ``indices``, cannot be loaded here.

    Only the items it ran: those it never started (stopped by its clock)
    are back in line already.
    """
    if at_most_once:
        endings = (
            Ending(index, Status.ERROR, failure, took)
            for index, took in zip(indices, ran, strict=True)
        )
        return Settlement(tuple(endings))
    return _run_again(indices, failure)


def _run_again(
    suspects: Sequence[int], failure: BaseException, lost: Sequence[int] = (), *, ran: bool = True
) -> Settlement:
    return Settlement(
        alone=tuple(suspects),
        again=tuple(lost),
        another_attempt=ran,
        split=True,
        warning=(
            f"a call failed ({failure}): {len(suspects)} items run again alone,"
            f" {len(lost)} others again"
        ),
    )


def _end_with_the_call(
    suspects: Sequence[int],
    failure: BaseException,
    lost: Sequence[int],
    deadline: float,
    timed_out: tuple[Ending, ...],
) -> Settlement:
    # At most once: the item the call was running (or, when which is
    # unknown, every item it may have run) ends with the call's failure,
    # and the items whose results died with the worker end ``crashed``.
    ended = list(timed_out)
    if isinstance(failure, trio.TooSlowError):
        # Ended at its own deadline, when the board said which item ran.
        ran = deadline if len(suspects) == 1 else 0.0
        ended += (Ending(index, Status.TIMEOUT, failure, ran) for index in suspects)
    else:
        ended += (Ending(index, Status.CRASHED, failure) for index in suspects)
    if lost:
        error = results_lost(failure, suspects)
        ended += (Ending(index, Status.CRASHED, error) for index in lost)
    return Settlement(
        tuple(ended),
        split=len(suspects) + len(lost) > 1,
        warning=(
            f"a call failed ({failure}): {len(suspects)} items end with it,"
            f" {len(lost)} lost their results; none runs again"
        ),
    )


def results_lost(failure: BaseException, culprits: Sequence[int]) -> WorkerCrashed:
    """The error of an item that ran, in a call whose worker then died or was killed.

    No culprits: every item the call started had returned, and the worker
    died, or was ended, sending the results back.
    """
    which = f"item {culprits[0]}" if len(culprits) == 1 else "a later item"
    if isinstance(failure, WorkerCrashed):
        exit_code, signal = failure.exit_code, failure.signal
        if culprits:
            what = f"{failure.what}, running {which} of its call"
        else:
            what = f"{failure.what}, sending back the results of its call"
    else:
        exit_code = signal = None
        what = (
            f"running {which} of its call, ended at its deadline"
            if culprits
            else "sending back the results of its call, ended at the item deadline"
        )
    return WorkerCrashed(
        f"{what}; this item had run, and its result was lost with the worker",
        exit_code=exit_code,
        signal=signal,
    )
