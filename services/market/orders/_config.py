"""The order log's settings and counters."""

from __future__ import annotations

import enum
import os
from collections.abc import Callable
from typing import Any

import attrs

from engine._validation import check_choice, check_count, check_duration


class PublishMode(enum.StrEnum):
    """How orders become bus messages.

    ``batch`` (the default) makes a backlog of a million lines a few thousand
    messages, which the bus and its WebSocket clients can carry at the
    parser's speed; ``order`` costs a bus message per line, and the bus,
    not the parser, then sets the pace (``docs/orders.md`` has the figures).
    """

    BATCH = "batch"
    """One message per coin per parsed chunk: a JSON array of its orders, in log order."""
    ORDER = "order"
    """One message per order on ``orders.<coin>``; id ``<oid>:<status>:<time>``."""


class StartAt(enum.StrEnum):
    """Where following starts in the file found at start-up."""

    BEGINNING = "beginning"
    """Read the whole file, then follow it."""
    END = "end"
    """Skip what is there, follow what is added (a rotated-in file is read from 0)."""


def _path(value: str | os.PathLike[str]) -> str:
    path = os.fspath(value)
    if not isinstance(path, str) or not path:
        raise ValueError(f"path must name a file, got {value!r}")
    return path


def _duration(instance: object, attribute: attrs.Attribute[float], value: float) -> None:
    check_duration(attribute.name, value)


def _count(minimum: int) -> Callable[[object, attrs.Attribute[int], int], None]:
    def check(instance: object, attribute: attrs.Attribute[int], value: int) -> None:
        check_count(attribute.name, value, minimum=minimum)

    return check


def _start(value: str) -> StartAt:
    return check_choice("start", value, StartAt)


def _publish_mode(value: str) -> PublishMode:
    return check_choice("publish", value, PublishMode)


def _workers(instance: object, attribute: attrs.Attribute[Any], value: int | None) -> None:
    if value is not None:
        check_count("workers", value)


@attrs.frozen
class OrderLogConfig:
    """Which log to follow, and how.

    Attributes:
        path: the log file (a Hyperliquid node's ``node_order_statuses``
            file, or the simulator's).
        poll_interval: seconds between looks at a file that has not grown.
        max_block_bytes: the most bytes read at once for the event loop
            (at least ``max_line_bytes + 1``, whatever this says), and the
            most a worker process is given at once (>= 4096).
        history: orders kept for :meth:`OrderLog.recent` (>= 0).
        start: ``"beginning"`` (default) or ``"end"``; see :class:`StartAt`.
        publish: ``"batch"`` (default) or ``"order"``; see :class:`PublishMode`.
        workers: worker processes that read and parse a backlog (256 KiB or
            more), never more regions at once than this; ``None`` (default):
            the pool's size; 0: parse everything in the event loop.
        max_line_bytes: a line still without its newline past this many
            bytes is dropped as malformed (it bounds the memory a runaway
            line can take).

    Raises:
        TypeError, ValueError: a bad setting, named in the message.
    """

    path: str = attrs.field(converter=_path)
    poll_interval: float = attrs.field(default=0.1, validator=_duration)
    max_block_bytes: int = attrs.field(default=4 << 20, validator=_count(4096))
    history: int = attrs.field(default=1000, validator=_count(0))
    start: StartAt = attrs.field(default=StartAt.BEGINNING, converter=_start)
    publish: PublishMode = attrs.field(default=PublishMode.BATCH, converter=_publish_mode)
    workers: int | None = attrs.field(default=None, validator=_workers)
    max_line_bytes: int = attrs.field(default=1 << 20, validator=_count(1))


@attrs.frozen
class OrderLogStatistics:
    """The order log's counters, for /status and /metrics.

    Attributes:
        path: the file followed.
        following: whether a file is open now.
        lines: non-blank lines read (valid or not).
        orders: orders published.
        messages: bus messages published (one per order, or per coin per chunk).
        malformed: lines that were not a valid order-status line, including
            unfinished lines dropped at a truncation or rotation and lines
            longer than ``max_line_bytes``.
        malformed_samples: the latest of them, shortened, with the reason.
        truncations: times the file was found shorter than what was seen.
        rotations: times the path was found to name a new file.
        bytes_read: bytes of the files accounted for (whole lines, and
            over-long ones dropped), across files.
        position: bytes of the current file accounted for so far.
        lag_bytes: bytes of the current file not accounted for yet, when
            last looked at (an unfinished last line included).
        pending_bytes: the start of a line waiting for its newline.
        chunks_in_processes: regions read and parsed by worker processes.
        slices_in_loop: slices parsed in the event loop.
        worker_failures: regions a worker could not parse (it died, or its
            file could not be reopened), parsed in the event loop instead.
    """

    path: str
    following: bool
    lines: int
    orders: int
    messages: int
    malformed: int
    malformed_samples: tuple[str, ...]
    truncations: int
    rotations: int
    bytes_read: int
    position: int
    lag_bytes: int
    pending_bytes: int
    chunks_in_processes: int
    slices_in_loop: int
    worker_failures: int
