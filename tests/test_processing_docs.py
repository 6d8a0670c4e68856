"""docs/processing.md: its example runs and prints what the page shows."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "processing.md"
EXAMPLE = ROOT / "docs" / "examples" / "processing_engine.py"


def _shown_output() -> list[str]:
    section = PAGE.read_text().split("## The example", 1)[1]
    block = re.search(r"```text\n(.*?)```", section, re.DOTALL)
    assert block is not None, "no output block under 'The example'"
    return block[1].splitlines()


@pytest.mark.subprocess
def test_the_example_prints_what_the_page_shows() -> None:
    result = subprocess.run(
        [sys.executable, str(EXAMPLE)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == _shown_output()


def test_the_page_links_lead_to_files_and_headings_that_exist() -> None:
    text = PAGE.read_text()
    anchors = {
        re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        for heading in re.findall(r"^#+ (.+)$", text, re.MULTILINE)
    }
    links = re.findall(r"\]\(([^)#\s]*)(?:#([^)\s]+))?\)", text)
    assert links
    for target, anchor in links:
        if target:
            assert (PAGE.parent / target).exists(), target
        elif anchor:
            assert anchor in anchors, anchor
