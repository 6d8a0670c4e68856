"""Prometheus's naming conventions, checked on an exposition text.

The rules are those of ``promtool check metrics`` (its linter, promlint),
restated here because promtool is a Go binary that no Python package ships,
plus one rule of this project: a point in time is a ``_timestamp_seconds``.
"""

from __future__ import annotations

import re

from prometheus_client.parser import text_string_to_metric_families

_SNAKE = re.compile(r"[a-z_][a-z0-9_]*")
_TYPES_IN_NAME = {"counter", "gauge", "histogram", "summary", "untyped"}
# promlint's unit abbreviations, each refused as a whole token of the name.
_ABBREVIATIONS = {"s", "ms", "us", "ns", "sec", "b", "kb", "mb", "gb", "tb", "pb", "m", "h", "d"}
# Units that are not the base unit (seconds, bytes, ...).
_NOT_BASE = {
    "milliseconds",
    "microseconds",
    "nanoseconds",
    "minutes",
    "hours",
    "days",
    "weeks",
    "millis",
    "kilobytes",
    "megabytes",
    "gigabytes",
    "terabytes",
    "petabytes",
    "bits",
    "percent",
}
# Words of a help text that name a unit the family's name must carry too.
_UNIT_WORDS = {"seconds": "seconds", "bytes": "bytes"}


def lint(exposition: str) -> list[str]:
    """Every convention the families of ``exposition`` break, one line each."""
    problems: list[str] = []
    for family in text_string_to_metric_families(exposition):
        problems += [f"{family.name}: {p}" for p in _family_problems(family)]
    return problems


def _family_problems(family: object) -> list[str]:
    name: str = family.name  # type: ignore[attr-defined]  # prometheus_client's Metric
    kind: str = family.type  # type: ignore[attr-defined]
    doc: str = family.documentation  # type: ignore[attr-defined]
    samples = family.samples  # type: ignore[attr-defined]
    problems = []
    if not doc:
        problems.append("no help text")
    if not _SNAKE.fullmatch(name) or ":" in name:
        problems.append("not snake_case")
    tokens = name.split("_")
    if kind == "counter":
        wrong = sorted({s.name for s in samples if not s.name.endswith(("_total", "_created"))})
        if wrong:
            problems.append(f"counter samples without _total: {wrong}")
    else:
        if name.endswith("_total"):
            problems.append(f"a {kind} must not end in _total")
        if kind != "histogram" and name.endswith("_bucket"):
            problems.append("_bucket is for histograms")
        if kind not in ("histogram", "summary") and name.endswith(("_count", "_sum")):
            problems.append("_count and _sum are for histograms and summaries")
    if _TYPES_IN_NAME & set(tokens):
        problems.append("the metric type is in the name")
    if abbreviated := _ABBREVIATIONS & set(tokens):
        problems.append(f"abbreviated units: {sorted(abbreviated)}")
    if not_base := _NOT_BASE & set(tokens):
        problems.append(f"not base units: {sorted(not_base)}")
    if (tokens[-1] == "at" or "timestamp" in tokens or name.endswith("last_update")) and not (
        name.endswith("_timestamp_seconds")
    ):
        problems.append("a point in time must be named ..._timestamp_seconds")
    for word, unit in _UNIT_WORDS.items():
        if re.search(rf"\b{word}\b", doc, re.IGNORECASE) and unit not in tokens:
            problems.append(f"the help text speaks of {word}, the name has no _{unit}")
    return problems
