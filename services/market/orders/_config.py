"""The order log's settings and counters."""

from __future__ import annotations

import enum
import os
from collections.abc import Callable
from typing import Any

import attrs

import engine
from engine.lowlevel import check_choice, check_count, check_duration


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


# Keyword-only, so that given fields (no default) may follow counted ones.
@attrs.frozen(kw_only=True)
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
        refusals: times the path was found naming something other than a
            regular file (a FIFO, a directory, a device), which is never
            opened; counted once until the path names a file, or nothing, again.
        refused: what the path names now if it is not a regular file
            (``"a FIFO"``), else ``""``.
        file_threads: threads the log's file-system calls hold now, closes
            included, at most ``FILE_THREADS`` (4); a call hung on a dead
            mount keeps its thread after the follower was cancelled, so a
            value that stays up points at the file system.
        unclosed_files: descriptors of files no longer followed whose close
            could not start yet, because hung calls held every thread; the
            next close that gets a thread closes them.

    On /metrics, counts that only grow are counters (``lines`` is
    ``engine_order_log_lines_total``, ``bytes_read`` is
    ``engine_order_log_read_bytes_total``), the rest gauges with their unit
    in the name (``position`` is ``engine_order_log_position_bytes``).
    """

    path: str
    following: bool = attrs.field(
        default=False, metadata=engine.gauge_metric("1 while a file is open")
    )
    lines: int = attrs.field(
        default=0, metadata=engine.counter_metric("Non-blank lines read, valid or not")
    )
    orders: int = attrs.field(default=0, metadata=engine.counter_metric("Orders published"))
    messages: int = attrs.field(default=0, metadata=engine.counter_metric("Bus messages published"))
    malformed: int = attrs.field(
        default=0, metadata=engine.counter_metric("Lines that were not a valid order-status line")
    )
    malformed_samples: tuple[str, ...]
    truncations: int = attrs.field(
        default=0, metadata=engine.counter_metric("Times the file was found truncated")
    )
    rotations: int = attrs.field(
        default=0, metadata=engine.counter_metric("Times the path was found naming a new file")
    )
    bytes_read: int = attrs.field(
        default=0,
        metadata=engine.counter_metric("Bytes of the files accounted for", name="read_bytes"),
    )
    position: int = attrs.field(
        metadata=engine.gauge_metric(
            "Bytes of the current file accounted for", name="position_bytes"
        )
    )
    lag_bytes: int = attrs.field(
        metadata=engine.gauge_metric("Bytes of the current file not accounted for yet")
    )
    pending_bytes: int = attrs.field(
        metadata=engine.gauge_metric("Bytes of a last line waiting for its newline")
    )
    chunks_in_processes: int = attrs.field(
        default=0, metadata=engine.counter_metric("Regions read and parsed by worker processes")
    )
    slices_in_loop: int = attrs.field(
        default=0, metadata=engine.counter_metric("Slices parsed in the event loop")
    )
    worker_failures: int = attrs.field(
        default=0,
        metadata=engine.counter_metric("Regions a worker could not parse, parsed here instead"),
    )
    refusals: int = attrs.field(
        default=0,
        metadata=engine.counter_metric("Times the path was found naming no regular file"),
    )
    refused: str
    file_threads: int = attrs.field(
        metadata=engine.gauge_metric("Threads the file-system calls hold now, hung ones included")
    )
    unclosed_files: int = attrs.field(
        metadata=engine.gauge_metric("Descriptors given up whose close could not start yet")
    )
