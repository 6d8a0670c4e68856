"""``python -m services.market scan``: one scan from the command line.

It runs the service's scan path in this process: an embedded exchange
simulator listing the universe, a candle store filled from the simulator's
REST klines by the fetcher, and its own worker pool reading the store. It
shows progress on stderr and prints the matches as a table, or as JSON with
``--json``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import os
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence

import msgspec
import trio
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

import engine

from ._candle_source import open_simulated_exchange
from ._settings import Setting, add_settings
from .candles import TIMEFRAME_MS, TIMEFRAMES, DateRange, SqliteCandleStore
from .scans import (
    DEFAULT_UNIVERSE,
    FormulaError,
    ScanConfig,
    ScanRun,
    Scans,
    parse_formula,
)


def _date(text: str) -> datetime.date:
    try:
        return datetime.date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a date like 2024-01-31, got {text!r}") from None


def _parameters(text: str) -> dict[str, int]:
    parameters: dict[str, int] = {}
    for pair in filter(None, (p.strip() for p in text.split(","))):
        name, equals, value = pair.partition("=")
        try:
            parameters[name.strip()] = int(value)
        except ValueError:
            equals = ""
        if not equals or not name.strip():
            raise argparse.ArgumentTypeError(
                f"must be name=integer pairs like period=14, got {pair!r}"
            )
    return parameters


_SETTINGS = (
    Setting("formula", None, None, None, "the condition symbols must meet", required=True),
    Setting("symbols", int, str(DEFAULT_UNIVERSE), None, "how many symbols the universe holds"),
    Setting("timeframe", None, "1d", None, "the bars' length", choices=TIMEFRAMES),
    Setting(
        "start",
        _date,
        None,
        None,
        "the first day scanned (UTC, inclusive)",
        unset="the last --bars bars before now",
    ),
    Setting("end", _date, None, None, "the last day scanned (UTC, inclusive)", unset="now"),
    Setting("bars", int, "250", None, "bars scanned when no --start is given"),
    Setting("params", _parameters, None, None, "the formula's parameters: period=14,slow=50"),
    Setting("workers", int, None, "MARKET_SCAN_WORKERS", "worker processes", unset="one per CPU"),
    Setting("deadline", float, "60", None, "seconds one symbol may take once a worker has it"),
    Setting("seed", int, "0", None, "the simulator's seed"),
    Setting(
        "epoch_ms",
        int,
        None,
        None,
        "the simulated market's 'now' in ms since the epoch; "
        "fixing it makes the results reproducible",
        unset="the clock",
    ),
    Setting(
        "candles",
        None,
        None,
        None,
        "a SQLite file to keep the fetched candles in (one file per seed and --epoch-ms)",
        unset="a temporary file",
    ),
    Setting("limit", int, "50", None, "matches shown"),
    Setting(
        "in_range",
        None,
        None,
        None,
        "show every symbol where the formula holds at some bar of the range, "
        "not only at the last bar",
        switch=True,
    ),
    Setting("json", None, None, None, "print JSON instead of a table", switch=True),
)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m services.market scan",
        description="Scan the simulated universe with a formula, e.g. "
        "'rsi14 < 30 and macd_hist > 0 and close > sma50' (see docs/scans.md).",
    )
    add_settings(parser, _SETTINGS, os.environ)
    return parser


def _date_range(
    start: datetime.date | None, end: datetime.date | None, now_ms: int
) -> DateRange | None:
    if start is None:
        if end is not None:
            raise ValueError("--end needs --start")
        return None
    if end is None:
        return DateRange(start, datetime.datetime.fromtimestamp(now_ms / 1000, datetime.UTC))
    return DateRange(start, end)


def main(argv: Sequence[str]) -> int:
    """Run the ``scan`` command; the exit status (2 for bad input)."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        formula = parse_formula(args.formula).bind(args.params or {})
        config = ScanConfig(
            symbols=args.symbols,
            workers=args.workers,
            item_deadline=args.deadline,
            seed=args.seed,
            timeframe=args.timeframe,
            bars=args.bars,
        )
        anchor = args.epoch_ms if args.epoch_ms is not None else int(time.time() * 1000)
        date_range = _date_range(args.start, args.end, anchor)
        if args.limit < 1:
            raise ValueError(f"--limit must be >= 1, got {args.limit}")
    except FormulaError as exc:
        print(f"python -m services.market scan: error: --formula:\n{exc}", file=sys.stderr)
        return 2
    except ValueError as exc:
        parser.error(str(exc))
    stderr = Console(stderr=True)
    with _store_path(args.candles) as path:
        store = SqliteCandleStore(path)
        try:
            scan = engine.run(
                _scan, config, store, anchor, formula.text, date_range, stderr, grace_period=5
            )
        except engine.ForcedShutdown as exc:
            stderr.print(f"scan stopped: {exc}")
            return exc.exit_status
        finally:
            store.close()
    if args.json:
        shown = scan.matches_in_range() if args.in_range else scan.matches()
        body = {
            "scan": scan.summary(),
            "matches": shown[: args.limit],
            "errors": scan.errors()[: args.limit],
        }
        sys.stdout.buffer.write(msgspec.json.format(msgspec.json.encode(body)) + b"\n")
    else:
        _table(scan, args.limit, in_range=args.in_range)
    return 0 if scan.summary().status == "done" else 1


@contextlib.contextmanager
def _store_path(path: str | None) -> Iterator[str]:
    if path is not None:
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="market-scan-") as directory:
        yield os.path.join(directory, "candles.sqlite")


async def _scan(
    config: ScanConfig,
    store: SqliteCandleStore,
    anchor: int,
    formula: str,
    date_range: DateRange | None,
    console: Console,
) -> ScanRun:
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("symbols"),
        TimeElapsedColumn(),
    )
    exchange = open_simulated_exchange(
        store, universe=config.symbols, seed=config.seed, anchor_ms=anchor
    )
    async with exchange as fetcher, trio.open_nursery() as nursery:
        with Progress(*columns, console=console, transient=True) as progress:
            bar = progress.add_task("fetching", total=config.symbols)

            def fetched(done: int) -> None:
                progress.update(bar, completed=done)

            def scanned(done: int, total: int) -> None:
                progress.update(bar, description="scanning", completed=done)

            fill = functools.partial(fetcher.fill_each, concurrency=8, on_filled=fetched)
            scans = Scans(config, store, fill=fill, clock=lambda: anchor)
            await nursery.start(scans.run)
            scan = scans.start(formula, date_range=date_range, on_progress=scanned)
            nursery.start_soon(_cancel_on_stop, scan)
            await scan.wait()
        nursery.cancel_scope.cancel()
    return scan


async def _cancel_on_stop(scan: ScanRun) -> None:
    # Ctrl-C asks for a stop: the scan ends with what it has, and the table shows it.
    await engine.current_shutdown().wait()
    scan.cancel()


def _moment(ms: int, timeframe: str) -> str:
    shown = "%Y-%m-%d" if timeframe == "1d" else "%Y-%m-%d %H:%M"
    return datetime.datetime.fromtimestamp(ms / 1000, datetime.UTC).strftime(shown)


def _table(scan: ScanRun, limit: int, *, in_range: bool) -> None:
    summary = scan.summary()
    console = Console()
    frame = summary.timeframe
    first = _moment(summary.start_ms, frame)
    last = _moment(summary.end_ms - TIMEFRAME_MS[frame], frame)
    console.print(summary.formula, markup=False, highlight=False)
    console.print(
        f"  at the last bar ({last}): {summary.matched} of {summary.total} symbols",
        highlight=False,
    )
    console.print(
        f"  from {first} to {last}, {frame} bars: "
        f"{summary.matched_in_range} symbols, on {summary.bars_matched} bars",
        highlight=False,
    )
    matches = scan.matches_in_range() if in_range else scan.matches()
    table = Table()
    table.add_column("symbol")
    table.add_column("close", justify="right")
    if in_range:
        for column in ("bars", "first", "last"):
            table.add_column(column, justify="right")
    names = sorted(matches[0].values) if matches else []
    for name in names:
        if name != "close":
            table.add_column(name, justify="right")
    for result in matches[:limit]:
        cells = [f"{result.values[n]:.6g}" for n in names if n != "close"]
        if in_range:
            shown = _moment(result.matches[0], frame), _moment(result.matches[-1], frame)
            cells[:0] = [str(len(result.matches)), *shown]
        table.add_row(result.symbol, f"{result.close:.6g}", *cells)
    console.print(table)
    note = f"{summary.completed} scanned in {summary.elapsed:.2f} s, {summary.failed} failed"
    count = summary.matched_in_range if in_range else summary.matched
    if count > limit:
        note += f"; {count - limit} more matches not shown (--limit)"
    console.print(note)
    for error in scan.errors()[:limit]:
        console.print(f"  {error.symbol}: {error.status}: {error.error}")
