"""How each item of a batch ends: :class:`Outcome`, and the one place outcomes are recorded."""

from __future__ import annotations

import collections
import enum
import operator
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Generic, TypeVar

import attrs

from ._bridgestats import tally
from ._channels import ReceiveChannel, SendChannel, open_channel
from ._runner import Rows

T = TypeVar("T")
R = TypeVar("R")


class Status(enum.StrEnum):
    """How one item of a batch ended."""

    OK = "ok"
    """The function returned; ``value`` holds the result."""
    ERROR = "error"
    """The function raised (or the item or result could not be pickled)."""
    TIMEOUT = "timeout"
    """Its deadline fired; ``error`` is a ``trio.TooSlowError``."""
    CRASHED = "crashed"
    """Its worker process died running it; ``error`` is a ``WorkerCrashed``."""
    CANCELLED = "cancelled"
    """The batch was cancelled before it finished."""


@attrs.frozen
class Outcome(Generic[T, R]):
    """The one outcome of one item.

    Attributes:
        index: the item's position in the input.
        item: the item.
        status: see :class:`Status`.
        value: the result, when ``status`` is ``ok``.
        error: the exception, for ``error``, ``timeout`` and ``crashed``.
        queued: seconds from the batch's start until a worker took the item
            (its last attempt).
        ran: seconds the item ran, measured where it ran (0 if it never did).
        attempts: 2 when a call it had started in failed (timed out, or its
            worker died), so that it ran again; always 1 with ``at_most_once``.
    """

    index: int
    item: T
    status: Status
    value: R | None = None
    error: BaseException | None = None
    queued: float = 0.0
    ran: float = 0.0
    attempts: int = 1

    @property
    def ok(self) -> bool:
        """Whether the function returned a value."""
        return self.status is Status.OK

    def unwrap(self) -> R:
        """The value, or raise the error (``trio.Cancelled`` is never stored here).

        Raises:
            BaseException: the item's error; for ``cancelled``, ``trio.TooSlowError``
                would mislead, so a ``RuntimeError`` says it was cancelled.
        """
        if self.status is Status.OK:
            return self.value  # type: ignore[return-value]  # set whenever status is OK
        if self.error is not None:
            raise self.error
        raise RuntimeError(f"item {self.index} was cancelled before it finished")


# attrs' __init__ for a frozen class sets each field through a bound
# ``object.__setattr__``; writing the slots directly is quicker, and a batch
# makes its outcomes by the thousand while its caller waits (docs/batch.md,
# "Why the outcomes are made in bulk"). test_batch checks that both ways
# make equal outcomes.
_OUTCOME_SLOTS = tuple(getattr(Outcome, field.name).__set__ for field in attrs.fields(Outcome))


def ok_outcomes_in_bulk(
    indices: Sequence[int],
    items: Sequence[T],
    values: Sequence[Any],
    ran: Sequence[float],
    queued: Sequence[float],
    attempts: Sequence[int],
) -> list[Outcome[T, Any]]:
    """The ``ok`` outcomes of rows ``(index, value, ran)``, made without attrs' ``__init__``.

    Each equals ``Outcome(index, items[index], Status.OK, value, None,
    queued[index], ran, attempts[index])``.
    """
    set_index, set_item, set_status, set_value, set_error, set_queued, set_ran, set_attempts = (
        _OUTCOME_SLOTS
    )
    new, ok = object.__new__, Status.OK
    made: list[Outcome[T, Any]] = []
    for index, value, took in zip(indices, values, ran, strict=True):
        outcome = new(Outcome)
        set_index(outcome, index)
        set_item(outcome, items[index])
        set_status(outcome, ok)
        set_value(outcome, value)
        set_error(outcome, None)
        set_queued(outcome, queued[index])
        set_ran(outcome, took)
        set_attempts(outcome, attempts[index])
        made.append(outcome)
    return made


_status_of = operator.attrgetter("status")


class Recorder(Generic[T, R]):
    """A batch's outcomes: each item's one outcome, kept, counted and sent to its reader.

    The running batch writes when a worker took each item (``queued``) and
    how many times it ran (``attempts``); every outcome, however it ends,
    goes through :meth:`record`.
    """

    def __init__(self, items: list[T], on_progress: Callable[[int, int], object] | None) -> None:
        self.items = items
        self.queued = [0.0] * len(items)
        self.attempts = [1] * len(items)
        self.counts: collections.Counter[Status] = collections.Counter()
        self._results: list[Outcome[T, R] | None] = [None] * len(items)
        self._ended = 0
        self._on_progress = on_progress
        self._tallied: collections.Counter[Status] = collections.Counter()
        self._send: SendChannel[Outcome[T, R]]
        self.receive: ReceiveChannel[Outcome[T, R]]
        self._send, self.receive = open_channel(max(1, len(items)))

    @property
    def missing(self) -> int:
        """Items with no outcome yet."""
        return len(self._results) - self._ended

    def results(self) -> list[Outcome[T, R]]:
        """Every outcome, in input order.

        Raises:
            RuntimeError: some item has no outcome yet (the batch still runs).
        """
        if self.missing:
            raise RuntimeError(
                f"the batch is still running: {self.missing} items have no outcome yet"
            )
        return list(self._results)  # type: ignore[arg-type]  # none is None any more

    def rows(self, rows: Rows, start: int, end: int) -> None:
        """Record the items ``start:end`` of a call's finished rows: ``ok``, or ``error``."""
        made = ok_outcomes_in_bulk(
            rows.indices[start:end],
            self.items,
            rows.values[start:end],
            rows.ran[start:end],
            self.queued,
            self.attempts,
        )
        failed = 0
        for position, error in rows.errors.items():
            if start <= position < end:
                # Few, if any: made as OK above, corrected here.
                made[position - start] = attrs.evolve(
                    made[position - start], status=Status.ERROR, error=error
                )
                failed += 1
        self.record(made, counts={Status.OK: len(made) - failed, Status.ERROR: failed})

    def end(
        self, index: int, status: Status, *, error: BaseException | None = None, ran: float = 0.0
    ) -> None:
        """Record that item ``index`` ended without a value: ``status`` says how."""
        outcome: Outcome[T, R] = Outcome(
            index,
            self.items[index],
            status,
            None,
            error,
            self.queued[index],
            ran,
            self.attempts[index],
        )
        self.record((outcome,))

    def cancel_the_rest(self) -> None:
        """Record every item with no outcome yet as ``cancelled``."""
        if self.missing:
            for index, result in enumerate(self._results):
                if result is None:
                    self.end(index, Status.CANCELLED)

    def record(
        self, made: Sequence[Outcome[T, R]], *, counts: Mapping[Status, int] | None = None
    ) -> None:
        """Keep, count and send outcomes; call the progress callback after each completed one.

        ``counts``, how many of ``made`` have each status, spares counting
        them one by one where the caller knows.
        """
        if self._on_progress is None:
            self._keep(made, counts)
            return
        for outcome in made:
            self._keep((outcome,), None)
            if outcome.status is not Status.CANCELLED:
                self._on_progress(self._ended - self.counts[Status.CANCELLED], len(self.items))

    def _keep(self, made: Sequence[Outcome[T, R]], counts: Mapping[Status, int] | None) -> None:
        results = self._results
        for outcome in made:
            if results[outcome.index] is not None:
                raise AssertionError(f"engine bug: item {outcome.index} of a batch finished twice")
            results[outcome.index] = outcome
        self.counts.update(counts if counts is not None else map(_status_of, made))
        self._ended += len(made)
        self._send.send_batch_nowait(made)

    def flush_tally(self) -> None:
        """Add the outcomes since the last flush to the run-wide counters."""
        # The run-wide counters take one update per call, not one per item.
        counters = tally()
        for status, count in self.counts.items():
            if count != self._tallied[status]:
                counters.count_batch_outcome(str(status), count - self._tallied[status])
                self._tallied[status] = count

    def close(self) -> None:
        """No more outcomes: the reader's ``async for`` ends once it has them all."""
        self._send.close()
