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
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from typing import NoReturn

import attrs
import httpx
import trio

import engine
from engine.lowlevel import describe_error

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

logger = logging.getLogger("market.cycles.watchlist")

ClientFactory = Callable[[], httpx.AsyncClient]
"""Makes the HTTP client a run of the watchlist uses (and closes)."""

# Closing the client's connections is bounded, and shielded so a
# cancelled run still closes its sockets instead of leaking them.
_CLOSE_GRACE = 1.0


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
            the exchange rejected a symbol in them.
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


class _Counters(engine.Tally[WatchlistStatistics]):
    """The counters behind :meth:`Watchlist.statistics`."""


@attrs.define(eq=False)
class _Attempt:
    """One cycle in progress: each symbol's fate, decided once."""

    started: float
    deadline: float
    ok: set[str] = attrs.Factory(set)
    failed: dict[str, str] = attrs.Factory(dict)

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
    ``concurrency`` batches at a time. If the exchange rejects a batch
    because one of its symbols is unknown (HTTP 400, code -1121), the batch
    asks for each of its symbols alone, so only the bad one fails. Whatever
    happens to a symbol is recorded for it (:meth:`failures`); nothing is
    fatal to the cycle, and the next cycle tries every symbol again.

    Args:
        config: the settings.
        client_factory: makes the ``httpx.AsyncClient`` for a run (inject an
            ``httpx.MockTransport`` in tests). Its timeouts are turned off:
            the deadlines govern.
        wall_clock: seconds since the epoch, for ``updated_at`` and
            ``last_update``; ``time.time`` unless a test pins it.
    """

    def __init__(
        self,
        config: WatchlistConfig,
        *,
        client_factory: ClientFactory | None = None,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        if not isinstance(config, WatchlistConfig):
            raise TypeError(f"config must be a WatchlistConfig, got {config!r}")
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

    def statistics(self) -> WatchlistStatistics:
        """A frozen snapshot of the counters."""
        return self._counters.snapshot(
            name=self.config.name,
            symbols=len(self.config.symbols),
            running=self._client is not None,
            last_update=self.last_update()["watchlist"].updated_at,
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
        size = self.config.batch_size
        batches = [list(symbols[i : i + size]) for i in range(0, len(symbols), size)]
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
            self._fail(attempt, symbols, f"batch deadline of {deadline:g} s expired")
        engine.heartbeat()

    async def _request(
        self, client: httpx.AsyncClient, symbols: list[str], attempt: _Attempt, *, split: bool
    ) -> None:
        deadline = self.config.request_deadline
        url = self.config.base_url + TICKER_PATH
        response: httpx.Response | None = None
        with trio.move_on_after(deadline):
            try:
                response = await client.get(url, params={"symbols": symbols_param(symbols)})
            except httpx.HTTPError as exc:
                self._counters.request_errors += 1
                self._fail(attempt, symbols, f"request failed: {describe_error(exc)}")
                return
        if response is None:
            self._counters.request_timeouts += 1
            self._fail(attempt, symbols, f"request deadline of {deadline:g} s expired")
            return
        if response.status_code == 200:
            self._store(response.content, symbols, attempt)
            return
        code, message = decode_error(response.content)
        if response.status_code == 400 and code == INVALID_SYMBOL:
            if split and len(symbols) > 1:
                # One unlisted symbol spoils the whole request: ask for each
                # alone (one after the other, within the batch deadline) so
                # only the bad one fails.
                self._counters.split_batches += 1
                for symbol in symbols:
                    await self._request(client, [symbol], attempt, split=False)
                return
            self._counters.rejected_symbols += len(symbols)
            self._fail(attempt, symbols, f"rejected by the exchange: {message} (code {code})")
            return
        self._counters.request_errors += 1
        detail = message if code is None else f"{message} (code {code})"
        self._fail(attempt, symbols, f"HTTP {response.status_code}: {detail}")

    def _store(self, body: bytes, symbols: list[str], attempt: _Attempt) -> None:
        try:
            quotes = decode_quotes(body, self._wall_clock())
        except MalformedResponse as exc:
            self._counters.malformed_responses += 1
            self._fail(attempt, symbols, f"malformed response: {exc}")
            return
        for symbol in symbols:
            quote = quotes.get(symbol)
            if quote is None:
                self._fail(attempt, [symbol], "missing from the exchange's answer")
            elif not attempt.decided(symbol):
                self._quotes[symbol] = quote
                attempt.ok.add(symbol)

    def _fail(self, attempt: _Attempt, symbols: list[str], reason: str) -> None:
        for symbol in symbols:
            if not attempt.decided(symbol):
                attempt.failed[symbol] = reason
                self._counters.last_error = f"{symbol}: {reason}"

    def _finish(self, attempt: _Attempt, exc: BaseException | None) -> None:
        """Record a cycle that ended: ran through, hit its deadline, or raised."""
        now = trio.current_time()
        counters = self._counters
        symbols = self.config.symbols
        if exc is None:
            outcome = "ok"
        elif now >= attempt.deadline:
            outcome = "timeout"
            counters.cycle_timeouts += 1
            reason = f"cycle deadline of {self.config.cycle_deadline:g} s expired"
            self._fail(attempt, list(symbols), reason)
            counters.last_error = reason
        elif isinstance(exc, Exception):
            outcome = "error"
            counters.cycle_errors += 1
            self._fail(attempt, list(symbols), f"cycle failed: {describe_error(exc)}")
        else:
            return  # cancelled from outside: not a finished cycle
        counters.cycles += 1
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
