"""The README tour and the supervision page's example run and show what they claim."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "docs" / "examples"


def _run_example(name: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(EXAMPLES / name)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.subprocess
def test_readme_tour_runs_and_is_quoted_verbatim() -> None:
    source = (EXAMPLES / "tour.py").read_text()
    body = source[source.index("import itertools") :]
    assert body.strip() in (ROOT / "README.md").read_text()
    result = _run_example("tour.py")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "service/watchlist: running, restarts=0, stalls=0"
    assert lines[1] == "service/ticker: running, restarts=0, stalls=0"
    # The hung refresh was cut by the cycle deadline and later runs went on.
    assert "timeouts=1 last_error=TooSlowError: cycle deadline of 0.05 s expired" in lines[2]
    assert lines[3] == "stopped: received SIGTERM"


@pytest.mark.subprocess
def test_supervision_example_runs() -> None:
    result = _run_example("supervision_tree.py")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "indicators: ema and rsi running"
    by_path = {line.split(":")[0]: line for line in lines[1:]}
    # The flaky feed failed twice at startup, was retried, and is now ready.
    assert "state=running ready=True restarts=2" in by_path["market/feed"]
    # The hung watchlist was cancelled by its watchdog at least once.
    assert "stalls=0" not in by_path["market/watchlist"]
    assert "ChildStalled" in by_path["market/watchlist"]
    # The nested supervisor is listed under the child that runs it.
    assert "state=running" in by_path["market/indicators/ema"]
    assert "after cancel: ['stopped', 'stopped', 'stopped']" in lines


@pytest.mark.subprocess
def test_channels_example_accounts_for_every_message() -> None:
    result = _run_example("channels_feed.py")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        # 999 BTC trades (trade 13 failed): 50 queued and delivered, 949 lost.
        "stuck client: subscriber to trades.BTC disconnected: its queue of 50 was full; "
        "949 messages lost",
        "ingest: sent=2000 delivered=2000 dropped=0",
        "processors: processed=1999 errors=1 (ValueError: malformed trade 13)",
        "dashboard: kept the newest 100, dropped the rest",
    ]


@pytest.mark.subprocess
def test_batch_example_gives_one_outcome_per_symbol() -> None:
    result = _run_example("batch_scan.py")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "symbol 13: error (no klines for symbol 13)" in lines
    assert "symbol 77: timeout (item deadline of 1 s expired)" in lines
    assert "outcomes: {'error': 1, 'ok': 598, 'timeout': 1}" in lines
    assert "progress reported: 600 times, last 600" in lines
    assert "oversold symbols: 85" in lines


@pytest.mark.subprocess
def test_bridges_example_keeps_the_loop_live() -> None:
    result = _run_example("bridges_pubsub.py")
    assert result.returncode == 0, result.stderr
    received, live, closed = result.stdout.splitlines()
    assert received.startswith("received 1000 messages, up to ")
    assert int(received.split("up to ")[1].split()[0]) > 1  # batches, not one per wakeup
    assert live == "the loop stayed live: True"
    assert closed == "source closed in its own thread: engine iterator"


@pytest.mark.subprocess
def test_extending_example_prints_what_its_page_shows() -> None:
    page = (ROOT / "docs" / "extending.md").read_text()
    code = page.split("```python\n")[1].split("```")[0]
    assert code in (EXAMPLES / "extending_component.py").read_text()
    shown = page.split("It prints:\n\n```text\n")[1].split("```")[0]
    result = _run_example("extending_component.py")
    assert result.returncode == 0, result.stderr
    assert result.stdout == shown


@pytest.mark.subprocess
def test_graceful_drain_example_prints_what_the_supervision_page_shows() -> None:
    source = (EXAMPLES / "graceful_drain.py").read_text()
    body = source[
        source.index("received: list[int] = []") : source.index('if __name__ == "__main__":')
    ]
    page = (ROOT / "docs" / "supervision.md").read_text()
    assert body.strip() in page
    result = _run_example("graceful_drain.py")
    assert result.returncode == 0, result.stderr
    section = page[page.index("## Graceful shutdown") :]
    shown = section.split("```text\n", 1)[1].split("```", 1)[0]
    assert result.stdout == shown
