"""``python -m services.market scan``: one scan from the command line.

It runs the service's scan path in this process (its own worker pool, the
simulated universe), shows a progress bar on stderr, and prints the matches
as a table, or as JSON with ``--json``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence

import msgspec
import trio
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

import engine

from ._settings import Setting, add_settings
from .scans import (
    DEFAULT_UNIVERSE,
    FormulaError,
    ScanConfig,
    ScanRun,
    Scans,
    SimulatedKlines,
    parse_formula,
)

_SETTINGS = (
    Setting("formula", None, None, None, "the condition symbols must meet", required=True),
    Setting("symbols", int, str(DEFAULT_UNIVERSE), None, "how many symbols the universe holds"),
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
    Setting("limit", int, "50", None, "matches shown"),
    Setting("json", None, None, None, "print JSON instead of a table", switch=True),
)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m services.market scan",
        description="Scan the simulated universe with a formula, e.g. "
        "'rsi14 < 30 and macd_hist > 0 and close > sma50' (see docs/formulas.md).",
    )
    add_settings(parser, _SETTINGS, os.environ)
    return parser


def main(argv: Sequence[str]) -> int:
    """Run the ``scan`` command; the exit status (2 for bad input)."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        formula = parse_formula(args.formula)
        config = ScanConfig(
            symbols=args.symbols, workers=args.workers, item_deadline=args.deadline, seed=args.seed
        )
        anchor = args.epoch_ms if args.epoch_ms is not None else int(time.time() * 1000)
        klines = SimulatedKlines(anchor_ms=anchor, seed=args.seed)
        if args.limit < 1:
            raise ValueError(f"--limit must be >= 1, got {args.limit}")
    except FormulaError as exc:
        print(f"python -m services.market scan: error: --formula:\n{exc}", file=sys.stderr)
        return 2
    except ValueError as exc:
        parser.error(str(exc))
    stderr = Console(stderr=True)
    try:
        scan = engine.run(_scan, Scans(config, klines), formula.text, stderr, grace_period=5)
    except engine.ForcedShutdown as exc:
        stderr.print(f"scan stopped: {exc}")
        return exc.exit_status
    if args.json:
        body = {
            "scan": scan.summary(),
            "matches": scan.matches()[: args.limit],
            "errors": scan.errors()[: args.limit],
        }
        sys.stdout.buffer.write(msgspec.json.format(msgspec.json.encode(body)) + b"\n")
    else:
        _table(scan, args.limit)
    return 0 if scan.summary().status == "done" else 1


async def _scan(scans: Scans, formula: str, console: Console) -> ScanRun:
    columns = (
        TextColumn("scanning"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("symbols"),
        TimeElapsedColumn(),
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(scans.run)
        with Progress(*columns, console=console, transient=True) as progress:
            bar = progress.add_task("scan", total=len(scans.symbols))
            scan = scans.start(
                formula, on_progress=lambda done, _: progress.update(bar, completed=done)
            )
            nursery.start_soon(_cancel_on_stop, scan)
            await scan.wait()
        nursery.cancel_scope.cancel()
    return scan


async def _cancel_on_stop(scan: ScanRun) -> None:
    # Ctrl-C asks for a stop: the scan ends with what it has, and the table shows it.
    await engine.current_shutdown().wait()
    scan.cancel()


def _table(scan: ScanRun, limit: int) -> None:
    summary = scan.summary()
    console = Console()
    matches = scan.matches()
    table = Table(title=f"{summary.formula}: {summary.matched} of {summary.total} symbols")
    table.add_column("symbol")
    table.add_column("close", justify="right")
    names = sorted(matches[0].values) if matches else []
    for name in names:
        if name != "close":
            table.add_column(name, justify="right")
    for result in matches[:limit]:
        cells = [f"{result.values[n]:.6g}" for n in names if n != "close"]
        table.add_row(result.symbol, f"{result.close:.6g}", *cells)
    console.print(table)
    note = f"{summary.completed} scanned in {summary.elapsed:.2f} s, {summary.failed} failed"
    if summary.matched > limit:
        note += f"; {summary.matched - limit} more matches not shown (--limit)"
    console.print(note)
    for error in scan.errors()[:limit]:
        console.print(f"  {error.symbol}: {error.status}: {error.error}")
