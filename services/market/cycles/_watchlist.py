"""The watchlist cycle: 24h quotes over REST under three nested deadlines.

Every limit is a trio cancel scope, which always fires at a checkpoint and
takes everything under it down with it, so a request that never answers
cannot hold the cycle, nor the cycle the watchlist:

- each HTTP request runs under ``request_deadline``;
- each batch (its request, and the per-symbol requests of a split batch)
  under ``batch_deadline``, counted from when the batch gets a slot;
- each cycle under ``cycle_deadline``, the :class:`engine.Cycle` deadline.

A cut request or batch fails only its own symbols; the others, in flight or
queued, carry on. Quotes are stored as each answer arrives, so a cycle that
is cut still keeps what it got, and ``last_update`` advances for exactly the
symbols that answered.

Transient request errors are tried again (:class:`engine.Retrying`) within
the batch deadline. Each symbol has a circuit (:class:`engine.CircuitBreaker`
keyed by symbol): a symbol that keeps failing on its own account is left out
of the requests while its circuit is open, then tried alone once per
cooldown, so it stops costing a request per cycle.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Hashable, Iterator
from typing import TYPE_CHECKING, NoReturn

import attrs
import httpx
import trio

import engine
from engine.lowlevel import attach_statistics, describe_error

from ._config import WatchlistConfig
from ._quotes import (
    INVALID_SYMBOL,
    TICKER_PATH,
    DatasetUpdate,
    MalformedResponse,
    Quote,
    decode_error,
    decode_quotes,
    symbols_param,
)

if TYPE_CHECKING:
    from ..store import FailureRecorder

logger = logging.getLogger("market.cycles.watchlist")

ClientFactory = Callable[[], httpx.AsyncClient]
"""Makes the HTTP client a run of the watchlist uses (and closes)."""

# Answers that say "too many requests": the exchange throttles the caller, not
# a symbol, so they neither split a batch nor count against a symbol.
_RATE_LIMITED = frozenset({418, 429})

# Closing the client's connections is bounded, and shielded so a
# cancelled run still closes its sockets instead of leaking them.
_CLOSE_GRACE = 1.0


def _utc(seconds: float) -> str:
    """Wall-clock seconds since the epoch as ``2023-11-14T22:13:20Z``."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


def default_client() -> httpx.AsyncClient:
    """The HTTP client the watchlist uses unless given a ``client_factory``."""
    return httpx.AsyncClient(headers={"user-agent": "trio-engine-market"}, timeout=None)


class NothingFetched(Exception):
    """A watchlist cycle ran to its end but no symbol answered."""


@attrs.frozen
class CycleReport:
    """What one finished watchlist cycle fetched and what it could not.

    Attributes:
        number: 1 for the first cycle, counting every finished cycle.
        started_at: ``trio.current_time()`` when it started.
        duration: seconds it took (``cycle_deadline`` if it was cut).
        outcome: ``"ok"`` (it ran to the end, whatever each symbol's fate;
            if no symbol answered, the run then raises :class:`NothingFetched`
            so that the engine's cycle counts a failure and /health warns),
            ``"timeout"`` (cut by the cycle deadline) or ``"error"`` (it
            raised; a bug, logged by the cycle).
        ok: the symbols that answered, in watchlist order.
        failed: the symbols that did not, in watchlist order, each with the
            reason (``"request deadline of 2 s expired"``, ``"rejected by
            the exchange: Invalid symbol. (code -1121)"``, ...).
    """

    number: int
    started_at: float
    duration: float
    outcome: str
    ok: tuple[str, ...]
    failed: dict[str, str]


# Keyword-only, so that given fields (no default) may follow counted ones.
@attrs.frozen(kw_only=True)
class WatchlistStatistics:
    """The watchlist's counters, for /status and /metrics.

    Counters are totals since the watchlist was built; ``symbols_ok`` and
    ``symbols_failed`` describe the latest finished cycle.

    Attributes:
        name: the cycle's name.
        symbols: symbols on the watchlist.
        running: whether :meth:`Watchlist.run` is running.
        cycles: cycles finished, including cut ones.
        cycle_timeouts: cycles cut by the cycle deadline.
        cycle_errors: cycles that raised (bugs; the cycle logs them).
        batch_timeouts: batches cut by the batch deadline.
        request_timeouts: requests cut by the request deadline.
        request_errors: requests that failed otherwise: connection errors
            and HTTP errors other than a rejected symbol.
        malformed_responses: 200 answers that were not valid tickers.
        rejected_symbols: symbol fetches the exchange answered with
            "Invalid symbol" (code -1121).
        split_batches: batches fetched again one symbol at a time because
            the exchange refused them (a rejected symbol, an HTTP error
            other than a rate limit).
        retries: requests tried again after a transient error.
        skipped_symbols: symbol fetches left out because the symbol's
            circuit was open.
        circuits: symbols by the state of their circuit: ``closed``,
            ``open`` (left out of the requests), ``half_open`` (to be tried
            alone by the next cycle, or being tried).
        circuit_states: each symbol's circuit state.
        next_tries: each symbol whose circuit is open, and when (wall-clock
            seconds since the epoch) it will be tried again.
        symbols_ok: symbols that answered in the latest finished cycle.
        symbols_failed: symbols that did not.
        last_update: wall-clock seconds since the epoch of the latest quote.
        last_error: ``"SYMBOL: reason"`` of the latest failure, or the
            latest cycle timeout.
    """

    name: str
    symbols: int = attrs.field(metadata=engine.gauge_metric("Symbols on the watchlist"))
    running: bool = attrs.field(metadata=engine.gauge_metric("1 while the cycle runs"))
    cycles: int = attrs.field(
        default=0, metadata=engine.counter_metric("Cycles finished, including cut ones")
    )
    cycle_timeouts: int = attrs.field(
        default=0, metadata=engine.counter_metric("Cycles cut by the cycle deadline")
    )
    cycle_errors: int = attrs.field(default=0, metadata=engine.counter_metric("Cycles that raised"))
    batch_timeouts: int = attrs.field(
        default=0, metadata=engine.counter_metric("Batches cut by the batch deadline")
    )
    request_timeouts: int = attrs.field(
        default=0, metadata=engine.counter_metric("Requests cut by the request deadline")
    )
    request_errors: int = attrs.field(
        default=0, metadata=engine.counter_metric("Requests that failed otherwise")
    )
    malformed_responses: int = attrs.field(
        default=0, metadata=engine.counter_metric("Answers that were not valid tickers")
    )
    rejected_symbols: int = attrs.field(
        default=0, metadata=engine.counter_metric("Symbol fetches the exchange rejected")
    )
    split_batches: int = attrs.field(
        default=0, metadata=engine.counter_metric("Batches fetched again symbol by symbol")
    )
    skipped_symbols: int = attrs.field(
        default=0, metadata=engine.counter_metric("Symbol fetches left out: circuit open")
    )
    symbols_ok: int = attrs.field(
        default=0, metadata=engine.gauge_metric("Symbols that answered in the latest cycle")
    )
    symbols_failed: int = attrs.field(
        default=0, metadata=engine.gauge_metric("Symbols that did not answer in the latest cycle")
    )
    last_update: float | None = attrs.field(
        metadata=engine.gauge_metric(
            "When the latest quote came, in seconds since the epoch",
            name="last_update_timestamp_seconds",
        )
    )
    last_error: str | None = None
    retries: int = attrs.field(
        metadata=engine.counter_metric("Requests tried again after a transient error")
    )
    circuits: dict[str, int] = attrs.field(
        metadata=engine.gauge_metric("Symbols by the state of their circuit", label="state")
    )
    circuit_states: dict[str, str]
    next_tries: dict[str, float]


class _Counters(engine.Tally[WatchlistStatistics]):
    """The counters behind :meth:`Watchlist.statistics`."""


@attrs.define(eq=False)
class _Attempt:
    """One cycle in progress: each symbol's fate, decided once."""

    started: float
    deadline: float
    ok: set[str] = attrs.Factory(set)
    failed: dict[str, str] = attrs.Factory(dict)
    # Each symbol's leave from its circuit, and the failures that were the
    # symbol's own (not a cut, a rate limit or a dead connection).
    permits: dict[str, engine.Permit] = attrs.Factory(dict)
    blamed: set[str] = attrs.Factory(set)
    # Failures that were a deadline expiring, and symbols left out (circuit open).
    timeouts: set[str] = attrs.Factory(set)
    skipped: set[str] = attrs.Factory(set)

    def decided(self, symbol: str) -> bool:
        return symbol in self.ok or symbol in self.failed


class Watchlist:
    """Fetches 24h quotes for a watchlist every ``interval``, under nested deadlines.

    Run it as a supervised child, with the config's ``stall_after``::

        watchlist = Watchlist(WatchlistConfig(rest_url, symbols))
        await supervisor.start(
            watchlist.run, name="watchlist", stall_after=watchlist.config.stall_after
        )

    Each cycle splits the watchlist into batches of ``batch_size`` and
    fetches each batch with one ``GET /api/v3/ticker/24hr?symbols=[...]``,
    ``concurrency`` batches at a time. If the exchange refuses a batch (one
    of its symbols is unknown: HTTP 400, code -1121; or another HTTP error
    that is not a rate limit), the batch asks for each of its symbols alone,
    so only the bad one fails. Transient errors are tried again first.
    Whatever happens to a symbol is recorded for it (:meth:`failures`);
    nothing is fatal to the cycle.

    A symbol that fails on its own account ``breaker_threshold`` times
    within ``breaker_window`` has its circuit opened: it is left out of the
    requests for ``breaker_cooldown``, then asked alone (one probe); an
    answer closes the circuit, a failure opens it again. :meth:`statistics`
    shows each symbol's circuit and when open ones are tried next.

    Args:
        config: the settings.
        client_factory: makes the ``httpx.AsyncClient`` for a run (inject an
            ``httpx.MockTransport`` in tests). Its timeouts are turned off:
            the deadlines govern.
        wall_clock: seconds since the epoch, for ``updated_at`` and
            ``last_update``; ``time.time`` unless a test pins it.
        recorder: where each finished cycle's failures go, one per failing
            symbol (kind ``"timeout"`` for an expired deadline, ``"error"``
            otherwise; a symbol left out by its open circuit is not
            recorded again), and each change of a symbol's circuit (kind
            ``"breaker"``, detail ``"closed->open"``), with the cycle's
            number; a :class:`services.market.store.FailureHistory`, say.
    """

    def __init__(
        self,
        config: WatchlistConfig,
        *,
        client_factory: ClientFactory | None = None,
        wall_clock: Callable[[], float] = time.time,
        recorder: FailureRecorder | None = None,
    ) -> None:
        if not isinstance(config, WatchlistConfig):
            raise TypeError(f"config must be a WatchlistConfig, got {config!r}")
        if recorder is not None and not callable(getattr(recorder, "record", None)):
            raise TypeError(f"recorder must have a record() method, got {recorder!r}")
        self._recorder = recorder
        self.config = config
        self._client_factory = client_factory if client_factory is not None else default_client
        self._wall_clock = wall_clock
        self._cycle = engine.Cycle(
            self._refresh,
            interval=config.interval,
            cycle_deadline=config.cycle_deadline,
            name=config.name,
        )
        self._client: httpx.AsyncClient | None = None
        self._quotes: dict[str, Quote] = {}
        self._failures: dict[str, str] = {}
        self._counters = _Counters()
        self._breaker = engine.CircuitBreaker(
            threshold=config.breaker_threshold,
            window=config.breaker_window,
            cooldown=config.breaker_cooldown,
            max_keys=len(config.symbols),
            name=config.name,
            on_transition=None if recorder is None else self._transition,
        )
        self._retrying = engine.Retrying(
            attempts=config.retry_attempts,
            backoff=config.retry_backoff,
            retry_on=engine.transient_http_error,
            max_retry_after=config.batch_deadline,
            name=config.name,
            wall_clock=wall_clock,
        )
        # Each symbol's latest failure of its own, for the reason an open
        # circuit gives.
        self._blame: dict[str, str] = {}
        self._report: CycleReport | None = None
        self._cycle_end = trio.Event()

    @property
    def name(self) -> str:
        """The cycle's name (``config.name``)."""
        return self.config.name

    @property
    def cycle(self) -> engine.Cycle:
        """The :class:`engine.Cycle` underneath, for its grid and deadline statistics."""
        return self._cycle

    def quotes(self) -> dict[str, Quote]:
        """The latest quote of each symbol that has answered at least once, in watchlist order.

        A symbol that stopped answering keeps its last quote; its
        ``updated_at`` says how old it is, and :meth:`failures` says why.
        """
        return {s: self._quotes[s] for s in self.config.symbols if s in self._quotes}

    def failures(self) -> dict[str, str]:
        """The symbols the latest finished cycle could not fetch, with the reason."""
        return dict(self._failures)

    def last_update(self) -> dict[str, DatasetUpdate]:
        """``{"watchlist": DatasetUpdate}``: the latest quote's arrival, overall and per symbol."""
        symbols = {symbol: quote.updated_at for symbol, quote in self.quotes().items()}
        return {"watchlist": DatasetUpdate(max(symbols.values(), default=None), symbols)}

    def last_report(self) -> CycleReport | None:
        """The report of the latest finished cycle, ``None`` before the first."""
        return self._report

    def circuits(self) -> engine.BreakerStatistics:
        """The per-symbol circuits: each symbol's state, and when open ones half-open.

        Times are on the trio clock, as in every engine statistics snapshot;
        :meth:`statistics` has the wall-clock ``next_tries``.
        """
        return self._breaker.statistics()

    def retries(self) -> engine.RetryStatistics:
        """The statistics of the requests' retry policy."""
        return self._retrying.statistics()

    def health(self) -> engine.SourceHealth:
        """What /health lists for the watchlist as a source: its open circuits.

        The state is ``circuits_open`` while some symbol is left out of the
        requests, else ``fetching`` (``stopped`` when not running). The
        detail has ``circuits_open`` and, for each open symbol, when it is
        tried next (``"next try at 2023-11-14T22:14:20Z"``, UTC). Always
        ready: a symbol left out is no reason to stop serving the others.
        """
        next_tries = self.statistics().next_tries
        if next_tries:
            state = "circuits_open"
        else:
            state = "fetching" if self._client is not None else "stopped"
        detail: dict[str, object] = {"circuits_open": len(next_tries)}
        for symbol, when in next_tries.items():
            detail[symbol] = f"next try at {_utc(when)}"
        return engine.SourceHealth(state, ready=True, detail=detail)

    def statistics(self) -> WatchlistStatistics:
        """A frozen snapshot of the counters."""
        circuits = self._breaker.statistics()
        now = self._wall_clock()
        return self._counters.snapshot(
            name=self.config.name,
            symbols=len(self.config.symbols),
            running=self._client is not None,
            last_update=self.last_update()["watchlist"].updated_at,
            retries=self._retrying.statistics().retries,
            circuits=circuits.keys,
            circuit_states=circuits.states,
            next_tries={
                symbol: now + (retry_at - circuits.taken_at)
                for symbol, retry_at in circuits.open_keys().items()
            },
        )

    async def wait_cycle(self) -> CycleReport:
        """Wait for the next cycle to finish (the one running now, if any) and return its report.

        A cycle cancelled from outside (the service stopping, the watchdog)
        does not finish; the wait goes on to the next one.
        """
        await self._cycle_end.wait()
        assert self._report is not None  # set before the event
        return self._report

    async def run(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> NoReturn:
        """Run a cycle every ``interval`` until cancelled.

        Reports ready at once, before the first cycle (which starts at once):
        an exchange that is down must not keep the service from starting; it
        shows as failures and a ``last_update`` that does not advance. The
        client is made here and closed when the run ends, so a restart by
        the supervisor gets a fresh one.

        Cancellation:
            Cancelling the run cuts the cycle in progress; it does not count
            as finished, but the quotes it already received are kept.

        Raises:
            trio.BusyResourceError: if this watchlist is already running.
        """
        if self._client is not None:
            raise trio.BusyResourceError(f"watchlist {self.name!r} is already running")
        client = self._client_factory()
        # Cancel scopes are the only limits: httpx's own timeouts would be a
        # second set that raises instead of cancelling, and its default of
        # 5 s would cut requests the deadlines allow to take longer.
        client.timeout = httpx.Timeout(None)
        self._client = client
        try:
            with attach_statistics(self._breaker):
                await self._cycle.run(task_status=task_status)
        finally:
            self._client = None
            with trio.move_on_after(_CLOSE_GRACE, shield=True):
                await client.aclose()

    # -- one cycle -----------------------------------------------------------

    async def _refresh(self) -> None:
        client = self._client
        assert client is not None  # set by run() for as long as the cycle runs
        # The engine.Cycle's own start time, so the deadline computed here is
        # exactly the one its cancel scope enforces.
        started = self._cycle.statistics().last_started_at
        if started is None:  # pragma: no cover - the cycle sets it before calling us
            started = trio.current_time()
        attempt = _Attempt(started=started, deadline=started + self.config.cycle_deadline)
        symbols = self.config.symbols
        batches = self._batches(attempt)
        pending = iter(batches)
        try:
            async with trio.open_nursery() as nursery:
                for _ in range(min(self.config.concurrency, len(batches))):
                    nursery.start_soon(self._work, client, pending, attempt)
        except BaseException as exc:
            self._finish(attempt, exc)
            raise
        self._finish(attempt, None)
        if symbols and not attempt.ok:
            # Ran to the end with nothing to show: the run failed, so the cycle
            # counts it as a failure and /health warns until one succeeds.
            first = next(iter(attempt.failed.values()), "no answer")
            raise NothingFetched(f"no symbol of {len(symbols)} answered ({first})")

    def _batches(self, attempt: _Attempt) -> list[list[str]]:
        """This cycle's batches: symbols whose circuit is open are left out, probes go alone."""
        for symbol in self.config.symbols:
            try:
                attempt.permits[symbol] = self._breaker.admit(symbol)
            except engine.CircuitOpen:
                self._counters.skipped_symbols += 1
                attempt.skipped.add(symbol)
                latest = self._blame.get(symbol, "no answer")
                attempt.failed[symbol] = f"left out, circuit open (latest failure: {latest})"
        regular = [s for s, permit in attempt.permits.items() if not permit.probe]
        probes = [[s] for s, permit in attempt.permits.items() if permit.probe]
        size = self.config.batch_size
        return [regular[i : i + size] for i in range(0, len(regular), size)] + probes

    async def _work(
        self, client: httpx.AsyncClient, pending: Iterator[list[str]], attempt: _Attempt
    ) -> None:
        # Workers pull batches from one shared iterator: never more than
        # ``concurrency`` requests in flight, and no task per queued batch.
        for batch in pending:
            await self._batch(client, batch, attempt)

    async def _batch(
        self, client: httpx.AsyncClient, symbols: list[str], attempt: _Attempt
    ) -> None:
        deadline = self.config.batch_deadline
        with trio.move_on_after(deadline) as scope:
            await self._request(client, symbols, attempt, split=True)
        if scope.cancelled_caught:
            self._counters.batch_timeouts += 1
            self._fail(attempt, symbols, f"batch deadline of {deadline:g} s expired", timeout=True)
        engine.heartbeat()

    async def _request(
        self, client: httpx.AsyncClient, symbols: list[str], attempt: _Attempt, *, split: bool
    ) -> None:
        alone = len(symbols) == 1
        try:
            response = await self._retrying.call(self._get, client, symbols)
        except trio.TooSlowError:
            self._counters.request_timeouts += 1
            reason = f"request deadline of {self.config.request_deadline:g} s expired"
            self._fail(attempt, symbols, reason, blame=alone, timeout=True)
            return
        except httpx.HTTPStatusError as exc:  # refused, or still failing after the retries
            response = exc.response
        except httpx.HTTPError as exc:
            self._counters.request_errors += 1
            self._fail(attempt, symbols, f"request failed: {describe_error(exc)}")
            return
        if response.status_code == 200:
            self._store(response.content, symbols, attempt)
            return
        if split and not alone and response.status_code not in _RATE_LIMITED:
            # One bad symbol spoils the whole request (Binance rejects it with
            # 400 -1121): ask for each alone, one after the other, within the
            # batch deadline, so the failure lands on the symbol that causes it.
            self._counters.split_batches += 1
            for symbol in symbols:
                await self._request(client, [symbol], attempt, split=False)
            return
        code, message = decode_error(response.content)
        if response.status_code == 400 and code == INVALID_SYMBOL:
            self._counters.rejected_symbols += len(symbols)
            reason = f"rejected by the exchange: {message} (code {code})"
            self._fail(attempt, symbols, reason, blame=alone)
            return
        self._counters.request_errors += 1
        detail = message if code is None else f"{message} (code {code})"
        blame = alone and response.status_code not in _RATE_LIMITED
        self._fail(attempt, symbols, f"HTTP {response.status_code}: {detail}", blame=blame)

    async def _get(self, client: httpx.AsyncClient, symbols: list[str]) -> httpx.Response:
        """One attempt: the request under its deadline; an HTTP error status raises.

        ``transient_http_error`` then says whether it is worth another attempt
        (429, 5xx); :meth:`_request` reads the answer of one that is not.
        """
        url = self.config.base_url + TICKER_PATH
        with trio.fail_after(self.config.request_deadline):
            response = await client.get(url, params={"symbols": symbols_param(symbols)})
        return response.raise_for_status()

    def _store(self, body: bytes, symbols: list[str], attempt: _Attempt) -> None:
        try:
            quotes = decode_quotes(body, self._wall_clock())
        except MalformedResponse as exc:
            self._counters.malformed_responses += 1
            self._fail(attempt, symbols, f"malformed response: {exc}", blame=len(symbols) == 1)
            return
        for symbol in symbols:
            quote = quotes.get(symbol)
            if quote is None:
                self._fail(attempt, [symbol], "missing from the exchange's answer", blame=True)
            elif not attempt.decided(symbol):
                self._quotes[symbol] = quote
                attempt.ok.add(symbol)

    def _fail(
        self,
        attempt: _Attempt,
        symbols: list[str],
        reason: str,
        *,
        blame: bool = False,
        timeout: bool = False,
    ) -> None:
        """Fail the symbols not decided yet; ``blame``: the failure is the symbol's own.

        ``timeout``: the failure is a deadline that expired.
        """
        for symbol in symbols:
            if not attempt.decided(symbol):
                attempt.failed[symbol] = reason
                self._counters.last_error = f"{symbol}: {reason}"
                if blame:
                    attempt.blamed.add(symbol)
                if timeout:
                    attempt.timeouts.add(symbol)

    def _settle(self, attempt: _Attempt) -> None:
        """Tell each symbol's circuit how its fetch went; cuts and cancels are no verdict."""
        for symbol, permit in attempt.permits.items():
            if symbol in attempt.ok:
                permit.succeed()
            elif symbol in attempt.blamed:
                self._blame[symbol] = attempt.failed[symbol]
                permit.fail()
            else:
                permit.release()

    def _finish(self, attempt: _Attempt, exc: BaseException | None) -> None:
        """Record a cycle that ended: ran through, hit its deadline, or raised."""
        self._settle(attempt)
        now = trio.current_time()
        counters = self._counters
        symbols = self.config.symbols
        if exc is None:
            outcome = "ok"
        elif now >= attempt.deadline:
            outcome = "timeout"
            counters.cycle_timeouts += 1
            reason = f"cycle deadline of {self.config.cycle_deadline:g} s expired"
            self._fail(attempt, list(symbols), reason, timeout=True)
            counters.last_error = reason
        elif isinstance(exc, Exception):
            outcome = "error"
            counters.cycle_errors += 1
            self._fail(attempt, list(symbols), f"cycle failed: {describe_error(exc)}")
        else:
            return  # cancelled from outside: not a finished cycle
        counters.cycles += 1
        self._record_failures(attempt, counters.cycles)
        counters.symbols_ok = len(attempt.ok)
        counters.symbols_failed = len(attempt.failed)
        self._log_changes(attempt.failed)
        self._failures = {s: attempt.failed[s] for s in symbols if s in attempt.failed}
        self._report = CycleReport(
            number=counters.cycles,
            started_at=attempt.started,
            duration=min(now, attempt.deadline) - attempt.started,
            outcome=outcome,
            ok=tuple(s for s in symbols if s in attempt.ok),
            failed=dict(self._failures),
        )
        event, self._cycle_end = self._cycle_end, trio.Event()
        event.set()

    def _record_failures(self, attempt: _Attempt, cycle: int) -> None:
        """Give the recorder the finished cycle's failures, in watchlist order."""
        if self._recorder is None:
            return
        for symbol in self.config.symbols:
            reason = attempt.failed.get(symbol)
            if reason is not None and symbol not in attempt.skipped:
                kind = "timeout" if symbol in attempt.timeouts else "error"
                self._recorder.record(cycle, str(symbol), kind, reason)

    def _transition(
        self, key: Hashable, old: engine.CircuitState, new: engine.CircuitState, at: float
    ) -> None:
        """A symbol's circuit changed: record it, in the cycle that is running."""
        if self._recorder is not None:
            cycle = self._counters.cycles + 1
            self._recorder.record(cycle, str(key), "breaker", f"{old.value}->{new.value}")

    def _log_changes(self, failed: dict[str, str]) -> None:
        """Log symbols that started failing (or fail differently) and those that recovered.

        Only changes are logged: a delisted symbol on the watchlist would
        otherwise write the same line every interval.
        """
        new = [f"{s} ({why})" for s, why in failed.items() if self._failures.get(s) != why]
        recovered = [s for s in self._failures if s not in failed]
        if new:
            logger.warning("watchlist %r: failing: %s", self.name, "; ".join(sorted(new)))
        if recovered:
            logger.info("watchlist %r: answering again: %s", self.name, ", ".join(recovered))
