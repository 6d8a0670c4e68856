"""Retry an async call with exponential backoff and full jitter, bounded by attempts.

There is no ``timeout=``: the enclosing cancel scope bounds the whole loop.
A deadline around :meth:`Retrying.call` cancels the attempt in progress (or
the wait between two) and no further attempt is made. When the attempts run
out the last error is raised as it is, with a note saying how many attempts
were made; it is never swallowed.
"""

from __future__ import annotations

import logging
import math
import random
import re
from collections.abc import Awaitable, Callable
from typing import TypeVar, TypeVarTuple, cast

import attrs
import trio

from ._backoff import Backoff
from ._counters import Tally, counter_metric, gauge_metric, metric_source
from ._logging import redact
from ._names import callable_name, describe_error
from ._retry_http import retry_after_seconds
from ._validation import check_count, check_duration, check_name

logger = logging.getLogger("engine.retry")

T = TypeVar("T")
PosArgsT = TypeVarTuple("PosArgsT")

ErrorPredicate = Callable[[Exception], bool]
"""Says whether an exception is worth another attempt (or counts as a failure)."""

ErrorFilter = type[Exception] | tuple[type[Exception], ...] | ErrorPredicate
"""Exception types, or a predicate on the exception: what ``retry_on=`` takes."""


def to_predicate(name: str, value: ErrorFilter) -> ErrorPredicate:
    """``value`` as a predicate: exception types become an ``isinstance`` check.

    Only :class:`Exception` subclasses are accepted: ``trio.Cancelled`` and
    ``KeyboardInterrupt`` are never retried nor counted.

    Raises:
        TypeError: ``value`` is neither a predicate nor Exception types; the
            message names ``name``.
    """
    if isinstance(value, type | tuple):
        types: tuple[object, ...] = value if isinstance(value, tuple) else (value,)
        if not types or not all(isinstance(t, type) and issubclass(t, Exception) for t in types):
            raise TypeError(f"{name} must be Exception types or a predicate, got {value!r}")
        checked = cast(tuple[type[Exception], ...], types)
        return lambda exc: isinstance(exc, checked)
    if not callable(value):
        raise TypeError(f"{name} must be Exception types or a predicate, got {value!r}")
    return value


def _attempts(instance: object, attribute: attrs.Attribute[int], value: int) -> None:
    check_count(attribute.name, value, minimum=1)


def _seconds_or_zero(instance: object, attribute: attrs.Attribute[float], value: float) -> None:
    check_duration(attribute.name, value, allow_zero=True)


def _backoff(instance: object, attribute: attrs.Attribute[Backoff], value: Backoff) -> None:
    if not isinstance(value, Backoff):
        raise TypeError(f"backoff must be an engine.Backoff, got {value!r}")


def _name(instance: object, attribute: attrs.Attribute[str], value: str) -> None:
    check_name(attribute.name, value)


DEFAULT_BACKOFF = Backoff(initial=0.1, maximum=10.0, jitter=0.0)
"""Caps of 0.1, 0.2, 0.4 ... 10 s; full jitter picks each wait below its cap."""


@metric_source(label="retry")
@attrs.frozen(kw_only=True)
class RetryStatistics:
    """What a :class:`Retrying` has done, for /status and /metrics.

    Attributes:
        name: its name.
        attempts_limit: the attempts each call may make.
        calls: calls started.
        attempts: attempts made, first ones included.
        retries: attempts after the first (``attempts - calls`` once all ended).
        successes: calls that returned.
        exhausted: calls that raised after their last attempt.
        refused: calls that raised an error ``retry_on`` did not accept.
        retry_after_waits: waits the server set with ``Retry-After``.
        waited: seconds spent waiting between attempts, in total.
        last_error: ``"Type: message"`` of the latest failed attempt.
    """

    name: str
    attempts_limit: int = attrs.field(
        metadata=gauge_metric("Attempts each call may make", name="attempts_limit")
    )
    calls: int = attrs.field(default=0, metadata=counter_metric("Calls started"))
    attempts: int = attrs.field(default=0, metadata=counter_metric("Attempts made"))
    retries: int = attrs.field(default=0, metadata=counter_metric("Attempts after the first"))
    successes: int = attrs.field(default=0, metadata=counter_metric("Calls that returned"))
    exhausted: int = attrs.field(
        default=0, metadata=counter_metric("Calls that raised after their last attempt")
    )
    refused: int = attrs.field(
        default=0, metadata=counter_metric("Calls that raised an error not worth retrying")
    )
    retry_after_waits: int = attrs.field(
        default=0, metadata=counter_metric("Waits set by the server's Retry-After")
    )
    waited: float = attrs.field(
        default=0.0,
        metadata=counter_metric("Seconds waited between attempts", name="waited_seconds"),
    )
    last_error: str | None = None


class _Tally(Tally[RetryStatistics]):
    """The counters behind :meth:`Retrying.statistics`."""


@attrs.define(eq=False)
class Retrying:
    """A retry policy that keeps statistics: call :meth:`call` as often as you like.

    Attempt ``n`` (from 0) that fails with an error ``retry_on`` accepts is
    followed, after a wait, by attempt ``n + 1``, up to ``attempts`` in all.
    The wait is drawn uniformly from ``[0, cap)`` (*full jitter*), where
    ``cap = backoff.delay(n, rng)``; with ``full_jitter=False`` it is the cap
    itself. If the error carries a ``Retry-After`` (an
    ``httpx.HTTPStatusError`` for a 429 or 503 answer with that header, in
    seconds or as an HTTP date), the wait is what the server asked for,
    capped at ``max_retry_after``.

    Args:
        attempts: attempts per call, >= 1 (1 means no retry).
        backoff: the caps of the waits; its ``seed`` makes the jitter
            reproducible, as tests want.
        retry_on: exception types, or a predicate on the exception, saying
            which errors are worth another attempt. Others are raised at once.
        full_jitter: draw each wait below its cap (default) or wait the cap.
        max_retry_after: the longest wait a ``Retry-After`` may impose, in
            seconds; 0 ignores the header.
        name: the name in logs and statistics.
        wall_clock: seconds since the epoch, to read an HTTP-date
            ``Retry-After``; ``time.time`` unless a test pins it.

    Raises:
        TypeError, ValueError: for a bad setting; the message names it.
    """

    attempts: int = attrs.field(default=3, kw_only=True, validator=_attempts)
    backoff: Backoff = attrs.field(default=DEFAULT_BACKOFF, kw_only=True, validator=_backoff)
    retry_on: ErrorFilter = attrs.field(default=Exception, kw_only=True)
    full_jitter: bool = attrs.field(default=True, kw_only=True)
    max_retry_after: float = attrs.field(default=60.0, kw_only=True, validator=_seconds_or_zero)
    name: str = attrs.field(default="retry", kw_only=True, validator=_name)
    wall_clock: Callable[[], float] | None = attrs.field(default=None, kw_only=True)
    _accepts: ErrorPredicate = attrs.field(init=False, repr=False)
    _rng: random.Random = attrs.field(init=False, repr=False)
    _tally: _Tally = attrs.field(init=False, repr=False, factory=_Tally)

    def __attrs_post_init__(self) -> None:
        self._accepts = to_predicate("retry_on", self.retry_on)
        self._rng = self.backoff.new_random()

    def statistics(self) -> RetryStatistics:
        """A frozen snapshot of the counters."""
        return self._tally.snapshot(name=self.name, attempts_limit=self.attempts)

    async def call(self, fn: Callable[[*PosArgsT], Awaitable[T]], *args: *PosArgsT) -> T:
        """``await fn(*args)``, again after each failure ``retry_on`` accepts.

        Cancellation:
            The enclosing cancel scope bounds the whole loop: cancelling it
            cancels the attempt in progress, or the wait between two, and
            ``trio.Cancelled`` propagates; no further attempt is made.

        Returns:
            What the first successful attempt returned.

        Raises:
            Exception: the error of the last attempt, unchanged, with a note
                (``add_note``) saying how many attempts were made; or at once
                an error ``retry_on`` does not accept.
        """
        tally = self._tally
        tally.calls += 1
        attempt = 0
        while True:
            tally.attempts += 1
            if attempt:
                tally.retries += 1
            try:
                result = await fn(*args)
            except Exception as exc:
                tally.last_error = _described(exc)
                if not self._accepts(exc):
                    tally.refused += 1
                    raise
                if attempt + 1 >= self.attempts:
                    tally.exhausted += 1
                    exc.add_note(f"{self.name}: gave up after {attempt + 1} attempt(s)")
                    raise
                error = exc
            else:
                tally.successes += 1
                return result
            # Outside the except block, so a cancel during the wait does not
            # carry the attempt's error as its context.
            await self._wait(attempt, error, callable_name(fn))
            attempt += 1

    async def _wait(self, attempt: int, exc: Exception, what: str) -> None:
        delay, asked = self.delay(attempt, exc)
        self._tally.retry_after_waits += asked
        logger.info(
            "%s: attempt %d of %s failed (%s); next in %.3f s%s",
            self.name,
            attempt + 1,
            what,
            _described(exc),
            delay,
            " (Retry-After)" if asked else "",
        )
        started = trio.current_time()
        try:
            await trio.sleep(delay)
        finally:
            self._tally.waited += trio.current_time() - started

    def delay(self, attempt: int, exc: Exception) -> tuple[float, bool]:
        """The wait after failed attempt ``attempt`` (from 0), and whether the server set it.

        Draws from the policy's random generator, so each call moves the
        jitter sequence on.
        """
        if self.max_retry_after > 0:
            asked = retry_after_seconds(exc, self.wall_clock)
            if asked is not None:
                return min(asked, self.max_retry_after), True
        cap = self.backoff.delay(attempt, self._rng)
        wait = self._rng.random() * cap if self.full_jitter else cap
        return (wait if math.isfinite(wait) else self.backoff.maximum), False


async def retry(
    fn: Callable[[*PosArgsT], Awaitable[T]],
    *args: *PosArgsT,
    attempts: int = 3,
    backoff: Backoff = DEFAULT_BACKOFF,
    retry_on: ErrorFilter = Exception,
    name: str = "retry",
) -> T:
    """``await fn(*args)``, retried with exponential backoff and full jitter.

    Shorthand for ``await Retrying(...).call(fn, *args)``; build the
    :class:`Retrying` yourself to keep its statistics, to disable jitter, or
    to bound ``Retry-After``. Bound the whole loop with a cancel scope::

        with trio.move_on_after(10):
            quote = await engine.retry(fetch, "BTCUSDT", retry_on=httpx.TransportError)

    Cancellation:
        As for :meth:`Retrying.call`: a cancel around it cancels the attempt
        in progress and stops retrying.

    Args:
        fn: the async function to call.
        *args: positional arguments for ``fn``.
        attempts: attempts in all, >= 1.
        backoff: the caps of the waits between attempts.
        retry_on: exception types, or a predicate on the exception.
        name: the name in logs and in the note on the final error.

    Returns:
        What the first successful attempt returned.

    Raises:
        Exception: the last attempt's error, with a note; or at once an error
            ``retry_on`` does not accept.
        TypeError, ValueError: for a bad setting.
    """
    policy = Retrying(attempts=attempts, backoff=backoff, retry_on=retry_on, name=name)
    return await policy.call(fn, *args)


# A URL's query string: where signed requests and some APIs carry secrets.
_QUERY = re.compile(r"(?P<url>\b[a-z][a-z0-9+.-]*://[^\s?#'\"]+)\?[^\s#'\"]*", re.IGNORECASE)


def _described(exc: BaseException) -> str:
    """``describe_error(exc)`` without URLs' query strings or credentials.

    An ``httpx.HTTPStatusError`` names the request's whole URL, which may
    carry an API key or a signature; the description is logged on every
    retry and kept as ``last_error`` for /status.
    """
    text = _QUERY.sub(r"\g<url>?…", describe_error(exc))
    return redact(text)
