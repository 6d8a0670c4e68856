"""The fetcher: fills a candle store from an exchange's REST klines, Binance format.

Incremental: it asks the store what it already covers and requests only the
rest. Each page is written (with the range it covers) as soon as it is
parsed, so an error later in a fill loses nothing already stored and the
next fill resumes where this one stopped. Only closed candles are stored:
the candle still in progress at the exchange's time is left out, with the
coverage ending before it, so the next fill fetches it once it has closed.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import attrs
import httpx
import numpy as np
import trio

from ._model import (
    Candles,
    CandleStore,
    DateRange,
    check_symbol,
    check_timeframe,
    missing_ranges,
)

KLINES_PATH = "/api/v3/klines"
TIME_PATH = "/api/v3/time"
# Binance's request weights (spot REST, 2024): klines 2 whatever the limit, time 1.
KLINES_WEIGHT = 2
TIME_WEIGHT = 1
USED_WEIGHT_HEADER = "X-MBX-USED-WEIGHT-1M"
_WINDOW_S = 60.0
# What to wait after a 429/418 that names no Retry-After.
_DEFAULT_RETRY_AFTER_S = 60.0
_MAX_PAGE = 1000


class CandleFetchError(Exception):
    """The fetcher could not fill a range; what it stored before the error stays stored."""


class KlinesUnavailable(CandleFetchError):
    """The exchange answered with an error status, or the connection failed."""


class MalformedKlines(CandleFetchError):
    """The exchange's klines body is not what Binance's format promises; nothing of it is stored."""


class RateLimited(CandleFetchError):
    """The exchange kept answering 429/418 after every wait it asked for."""


@attrs.frozen
class FetcherStatistics:
    """What a :class:`CandleFetcher` has done so far.

    Attributes:
        requests: HTTP requests sent (klines and server time, retries included).
        candles_stored: bars written to the store.
        ranges_fetched: missing ranges requested.
        ranges_skipped: covered ranges inside requested date ranges, not asked for again.
        rate_limit_waits: waits for the weight budget or an exchange's Retry-After.
        rate_limit_wait_seconds: seconds spent in those waits.
    """

    requests: int = 0
    candles_stored: int = 0
    ranges_fetched: int = 0
    ranges_skipped: int = 0
    rate_limit_waits: int = 0
    rate_limit_wait_seconds: float = 0.0


def _check_budget(instance: FetcherConfig, attribute: attrs.Attribute[Any], value: int) -> None:
    if not isinstance(value, int) or value < KLINES_WEIGHT:
        raise ValueError(f"{attribute.name} must be an int >= {KLINES_WEIGHT}, got {value!r}")


def _check_page(instance: FetcherConfig, attribute: attrs.Attribute[Any], value: int) -> None:
    if not isinstance(value, int) or not 1 <= value <= _MAX_PAGE:
        raise ValueError(f"page_size must be an int in 1..{_MAX_PAGE}, got {value!r}")


def _check_retries(instance: FetcherConfig, attribute: attrs.Attribute[Any], value: int) -> None:
    if not isinstance(value, int) or value < 0:
        raise ValueError(f"max_rate_limit_retries must be an int >= 0, got {value!r}")


@attrs.frozen
class FetcherConfig:
    """How a :class:`CandleFetcher` paces itself.

    Args:
        weight_budget: request weight it may use per minute (Binance allows
            6,000 on spot; the default leaves room for the rest of the service).
            The exchange's ``X-MBX-USED-WEIGHT-1M`` header, when present,
            counts too: a request waits for the next minute rather than pass it.
        page_size: bars per request (Binance's ``limit``, 1..1000).
        max_rate_limit_retries: 429/418 answers in a row, each waited out for
            its ``Retry-After``, before :class:`RateLimited` is raised.

    Raises:
        ValueError: a setting is out of range, named in the message.
    """

    weight_budget: int = attrs.field(default=1200, validator=_check_budget)
    page_size: int = attrs.field(default=_MAX_PAGE, validator=_check_page)
    max_rate_limit_retries: int = attrs.field(default=5, validator=_check_retries)


@attrs.define
class _WeightWindow:
    """Request weight used in the current minute, shared by every fill of one fetcher."""

    budget: int
    started: float = -math.inf
    used: int = 0

    def _roll(self) -> None:
        now = trio.current_time()
        if now - self.started >= _WINDOW_S:
            self.started, self.used = now, 0

    def wait_s(self, weight: int) -> float:
        """Seconds until ``weight`` fits (0 when it fits now, and then it is taken)."""
        self._roll()
        if self.used + weight <= self.budget:
            self.used += weight
            return 0.0
        return self.started + _WINDOW_S - trio.current_time()

    def observe(self, used: int) -> None:
        """The exchange's own count for the window, when it says one."""
        self.used = max(self.used, used)


class CandleFetcher:
    """Fills a :class:`CandleStore` from ``GET /api/v3/klines`` (Binance format).

    Usually opened with :func:`open_candle_fetcher`, which owns the HTTP client.

    Args:
        store: where the candles go, and what says which ranges are covered.
        client: an :class:`httpx.AsyncClient` whose ``base_url`` is the
            exchange's REST root (``http://127.0.0.1:9000``); not closed here.
        config: pacing; :class:`FetcherConfig` defaults when omitted.
    """

    def __init__(
        self, store: CandleStore, client: httpx.AsyncClient, config: FetcherConfig | None = None
    ) -> None:
        self.store = store
        self.config = config if config is not None else FetcherConfig()
        self._client = client
        self._window = _WeightWindow(self.config.weight_budget)
        self._stats = FetcherStatistics()

    def statistics(self) -> FetcherStatistics:
        """Counts since the fetcher was made."""
        return self._stats

    def _count(self, **deltas: float) -> None:
        now = attrs.asdict(self._stats)
        self._stats = FetcherStatistics(**{k: now[k] + deltas.get(k, 0) for k in now})

    async def fill(self, symbol: str, timeframe: str, date_range: DateRange) -> int:
        """Fetch and store ``symbol``'s closed ``timeframe`` bars in ``date_range`` not yet stored.

        Returns:
            The number of bars stored by this call.

        Raises:
            ValueError: a bad symbol or timeframe.
            KlinesUnavailable: an error status or a failed connection.
            MalformedKlines: a body that is not Binance klines.
            RateLimited: 429/418 past ``max_rate_limit_retries`` waits.
        """
        check_symbol(symbol)
        timeframe_ms = check_timeframe(timeframe)
        now = await self._server_time()
        return await self._fill(symbol, timeframe, timeframe_ms, date_range, now)

    async def fill_many(
        self, symbols: Iterable[str], timeframe: str, date_range: DateRange, *, concurrency: int = 4
    ) -> dict[str, int]:
        """:meth:`fill` for each symbol, ``concurrency`` at a time, under one weight budget.

        The exchange's time is asked once for all of them.

        Returns:
            Bars stored per symbol.

        Raises:
            ValueError: ``concurrency`` < 1, or a bad symbol or timeframe.
            ExceptionGroup: of the errors :meth:`fill` raises; the other
                symbols' fills are cancelled, what they stored stays.
        """
        return await self._fill_all(symbols, timeframe, date_range, concurrency, None, None)

    async def fill_each(
        self,
        symbols: Iterable[str],
        timeframe: str,
        date_range: DateRange,
        *,
        concurrency: int = 4,
        on_filled: Callable[[int], object] | None = None,
    ) -> dict[str, CandleFetchError]:
        """:meth:`fill` for each symbol, each on its own: one that fails does not stop the rest.

        This is the shape of a scan's ``fill`` (``services.market.scans.Fill``):
        a symbol the exchange gives no candles for ends that symbol's scan with
        the error, and the other symbols are scanned.

        Args:
            symbols: the symbols to fill.
            timeframe: one of :data:`TIMEFRAMES`.
            date_range: the bars wanted.
            concurrency: symbols fetched at once.
            on_filled: called with the number of symbols done so far, after each.

        Returns:
            The symbols that could not be filled, with why (every symbol, with
            the same error, when the exchange's time cannot be had).

        Raises:
            ValueError: ``concurrency`` < 1, or a bad symbol or timeframe.
        """
        failed: dict[str, CandleFetchError] = {}
        names = [check_symbol(symbol) for symbol in symbols]
        try:
            await self._fill_all(names, timeframe, date_range, concurrency, failed, on_filled)
        except CandleFetchError as exc:
            return dict.fromkeys(names, exc)
        return failed

    async def _fill_all(
        self,
        symbols: Iterable[str],
        timeframe: str,
        date_range: DateRange,
        concurrency: int,
        failed: dict[str, CandleFetchError] | None,
        on_filled: Callable[[int], object] | None,
    ) -> dict[str, int]:
        if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
            raise ValueError(f"concurrency must be an int >= 1, got {concurrency!r}")
        names = [check_symbol(symbol) for symbol in symbols]
        timeframe_ms = check_timeframe(timeframe)
        now = await self._server_time()
        limiter = trio.CapacityLimiter(concurrency)
        stored: dict[str, int] = {}

        async def one(symbol: str) -> None:
            async with limiter:
                try:
                    stored[symbol] = await self._fill(
                        symbol, timeframe, timeframe_ms, date_range, now
                    )
                except CandleFetchError as exc:
                    if failed is None:
                        raise
                    failed[symbol] = exc
            if on_filled is not None:
                on_filled(len(stored) + (len(failed) if failed is not None else 0))

        async with trio.open_nursery() as nursery:
            for symbol in names:
                nursery.start_soon(one, symbol)
        return {symbol: stored[symbol] for symbol in names if symbol in stored}

    async def _fill(
        self, symbol: str, timeframe: str, timeframe_ms: int, date_range: DateRange, now: int
    ) -> int:
        # Bars that open before the current bar's open have closed by ``now``.
        upper = min(date_range.end_ms(), now // timeframe_ms * timeframe_ms)
        start = -(-date_range.start_ms() // timeframe_ms) * timeframe_ms
        if start >= upper:
            return 0
        covered = await self.store.covered_async(symbol, timeframe)
        gaps, skipped = missing_ranges(start, upper, covered)
        self._count(ranges_skipped=skipped, ranges_fetched=len(gaps))
        stored = 0
        for gap in gaps:
            stored += await self._fill_gap(symbol, timeframe, timeframe_ms, gap)
        return stored

    async def _fill_gap(
        self, symbol: str, timeframe: str, timeframe_ms: int, gap: tuple[int, int]
    ) -> int:
        cursor, end = gap
        stored = 0
        while cursor < end:
            params = {
                "symbol": symbol,
                "interval": timeframe,
                "startTime": cursor,
                "endTime": end - 1,
                "limit": self.config.page_size,
            }
            body = await self._get(KLINES_PATH, params, KLINES_WEIGHT)
            rows = _parse_klines(body, symbol, timeframe, timeframe_ms, cursor, end)
            # A short page holds every bar up to ``end``; a full one up to its last bar.
            full = len(rows) >= self.config.page_size
            covers_end = int(rows[-1, 0]) + timeframe_ms if full else end
            candles = Candles.from_rows(rows)
            stored += await self.store.write_async(
                symbol, timeframe, candles, covers=(cursor, covers_end)
            )
            self._count(candles_stored=len(candles))
            cursor = covers_end
        return stored

    async def _server_time(self) -> int:
        body = await self._get(TIME_PATH, {}, TIME_WEIGHT)
        server_time = body.get("serverTime") if isinstance(body, dict) else None
        if not isinstance(server_time, int) or isinstance(server_time, bool) or server_time < 0:
            raise MalformedKlines(f"{TIME_PATH} answered {body!r}, not {{'serverTime': <ms>}}")
        return server_time

    async def _get(self, path: str, params: dict[str, Any], weight: int) -> Any:
        """One request within the weight budget, waiting out 429/418 for their Retry-After."""
        for _ in range(self.config.max_rate_limit_retries + 1):
            while (wait := self._window.wait_s(weight)) > 0:
                await self._wait(wait)
            self._count(requests=1)
            try:
                response = await self._client.get(path, params=params)
            except httpx.TransportError as exc:
                raise KlinesUnavailable(f"GET {path} {_describe(params)} failed: {exc!r}") from exc
            self._observe(response)
            if response.status_code in (418, 429):
                await self._wait(_retry_after(response))
                continue
            if response.status_code != 200:
                raise KlinesUnavailable(
                    f"GET {path} {_describe(params)} answered {response.status_code}: "
                    f"{response.text[:200]!r}"
                )
            try:
                return response.json()
            except ValueError as exc:
                raise MalformedKlines(
                    f"GET {path} {_describe(params)} answered a body that is not JSON: "
                    f"{response.text[:200]!r}"
                ) from exc
        raise RateLimited(
            f"GET {path} {_describe(params)}: still rate-limited after "
            f"{self.config.max_rate_limit_retries} waits"
        )

    def _observe(self, response: httpx.Response) -> None:
        used = response.headers.get(USED_WEIGHT_HEADER)
        if used is not None and used.isdigit():
            self._window.observe(int(used))

    async def _wait(self, seconds: float) -> None:
        self._count(rate_limit_waits=1, rate_limit_wait_seconds=seconds)
        await trio.sleep(seconds)


def _retry_after(response: httpx.Response) -> float:
    text = response.headers.get("Retry-After", "")
    try:
        seconds = float(text)
    except ValueError:
        return _DEFAULT_RETRY_AFTER_S
    return seconds if math.isfinite(seconds) and seconds >= 0 else _DEFAULT_RETRY_AFTER_S


def _describe(params: dict[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in params.items())


def _parse_klines(
    body: object, symbol: str, timeframe: str, timeframe_ms: int, start: int, end: int
) -> np.ndarray[Any, np.dtype[np.float64]]:
    """Rows ``(open_time, open, high, low, close, volume)`` of a klines body, checked.

    Raises:
        MalformedKlines: the body is not a list of klines rows, a value does
            not parse, a bar is off the timeframe's grid or outside
            ``[start, end)``, the bars are not in order, or prices disagree.
    """
    where = f"{symbol} {timeframe} klines from {start}"
    if not isinstance(body, list):
        raise MalformedKlines(f"{where}: expected a list of rows, got {type(body).__name__}")
    table = _well_formed(body)
    if table is None:
        # Something is off: find the first bad row, and say what is wrong with it.
        table = np.empty((len(body), 6), dtype=np.float64)
        for i, row in enumerate(body):
            table[i] = _parse_row(row, f"{where}, row {i}")
    if len(table) == 0:
        return table
    opens = table[:, 0]
    problem = None
    if np.any(opens % timeframe_ms != 0):
        problem = f"an open time off the {timeframe} grid"
    elif np.any(np.diff(opens) <= 0):
        problem = "open times not strictly increasing"
    elif opens[0] < start or opens[-1] >= end:
        problem = f"an open time outside [{start}, {end})"
    elif np.any(table[:, 3] > np.minimum(table[:, 1], table[:, 4])) or np.any(
        table[:, 2] < np.maximum(table[:, 1], table[:, 4])
    ):
        problem = "a low above the open or close, or a high below them"
    if problem is not None:
        raise MalformedKlines(f"{where}: {problem}")
    return table


def _well_formed(body: list[Any]) -> np.ndarray[Any, np.dtype[np.float64]] | None:
    """The rows as a table, at numpy's speed, if every one is as :func:`_parse_row` wants.

    ``None`` when any row is not: the caller then parses row by row, for the message.
    """
    if not all(
        type(row) is list and len(row) >= 6 and type(row[0]) is int and row[0] >= 0 for row in body
    ):
        return None
    cells = [row[1:6] for row in body]
    if not all(type(text) is str for values in cells for text in values):
        return None
    try:
        prices = np.array(cells, dtype=np.float64).reshape(len(body), 5)
    except ValueError:
        return None
    if not np.all(np.isfinite(prices)) or np.any(prices < 0):
        return None
    table = np.empty((len(body), 6), dtype=np.float64)
    table[:, 0] = [row[0] for row in body]
    table[:, 1:] = prices
    return table


def _parse_row(row: object, where: str) -> Sequence[float]:
    if not isinstance(row, list) or len(row) < 6:
        raise MalformedKlines(f"{where}: expected a list of at least 6 fields, got {row!r}")
    open_time = row[0]
    if not isinstance(open_time, int) or isinstance(open_time, bool) or open_time < 0:
        raise MalformedKlines(f"{where}: open time {open_time!r} is not a whole number of ms")
    values: list[float] = [float(open_time)]
    for name, text in zip(("open", "high", "low", "close", "volume"), row[1:6], strict=True):
        try:
            value = float(text) if isinstance(text, str) else math.nan
        except ValueError:
            value = math.nan
        if not math.isfinite(value) or value < 0:
            raise MalformedKlines(f"{where}: {name} {text!r} is not a non-negative decimal string")
        values.append(value)
    return values


@asynccontextmanager
async def open_candle_fetcher(
    store: CandleStore,
    base_url: str,
    config: FetcherConfig | None = None,
    *,
    transport: httpx.AsyncBaseTransport | None = None,
) -> AsyncIterator[CandleFetcher]:
    """A :class:`CandleFetcher` with its own HTTP client, closed when the block exits.

    Args:
        store: where the candles go.
        base_url: the exchange's REST root, such as ``"https://api.binance.com"``
            or a simulator's ``address.rest_url``.
        config: pacing; :class:`FetcherConfig` defaults when omitted.
        transport: an httpx transport to use instead of the network (tests).

    Yields:
        The fetcher.
    """
    async with httpx.AsyncClient(base_url=base_url, transport=transport) as client:
        yield CandleFetcher(store, client, config)
