"""The observer's live feed: one snapshot per tick, fanned out to bounded viewers.

The ops server's ``/ui`` page (``_observer_app.py``) shows the supervision
tree live. What it costs the service is decided here:

* the snapshot is built once per tick (``interval``, half a second by
  default), encoded once, and shared by every viewer; with no viewer the
  sampler waits on an event and builds nothing;
* each viewer holds at most one snapshot not yet sent. A viewer whose
  connection cannot keep up has its older snapshot replaced by the newer one
  and the replaced one counted as dropped; the sampler never waits for a
  viewer;
* at most ``max_viewers`` viewers at once; the excess is refused.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import attrs
import trio

from ._counters import counter_metric, gauge_metric, metric_source
from ._validation import check_count, check_finite_duration


@metric_source(label=None)
@attrs.frozen
class ObserverStatistics:
    """A snapshot of the observer's feed.

    Attributes:
        interval: seconds between snapshots.
        viewers: viewers connected now.
        max_viewers: the bound on viewers at once.
        ticks: snapshots built so far.
        dropped: snapshots replaced before a slow viewer was sent them, all
            viewers together.
        refused: viewers refused for being past ``max_viewers``.
    """

    interval: float
    viewers: int = attrs.field(metadata=gauge_metric("Observer pages streaming now"))
    max_viewers: int
    ticks: int = attrs.field(metadata=counter_metric("Observer snapshots built"))
    dropped: int = attrs.field(
        metadata=counter_metric("Observer snapshots replaced before a slow viewer took them")
    )
    refused: int = attrs.field(metadata=counter_metric("Observer viewers refused at the bound"))


class TooManyViewers(Exception):
    """Raised by :meth:`Observer.viewer` when ``max_viewers`` are connected."""


@attrs.define(eq=False)
class Viewer:
    """One connected page: the latest snapshot it has not been sent yet, at most one.

    Attributes:
        dropped: snapshots replaced by a newer one before this viewer took them.
        sent: snapshots this viewer took.
    """

    dropped: int = 0
    sent: int = 0
    _pending: bytes | None = None
    _ready: trio.Event = attrs.field(factory=trio.Event)
    _closed: bool = False

    def offer(self, snapshot: bytes) -> bool:
        """Hold ``snapshot`` for the viewer; never waits.

        Returns:
            ``False`` when it replaced a snapshot the viewer had not taken
            (that one is counted as dropped).
        """
        replaced = self._pending is not None
        if replaced:
            self.dropped += 1
        self._pending = snapshot
        self._ready.set()
        return not replaced

    def close(self) -> None:
        """End the feed: :meth:`next` raises once the pending snapshot is taken."""
        self._closed = True
        self._ready.set()

    async def next(self) -> bytes:
        """Wait for the next snapshot and take it.

        Raises:
            trio.EndOfChannel: the feed was closed (the server is stopping).
        """
        await self._ready.wait()
        snapshot = self._pending
        if snapshot is None:
            raise trio.EndOfChannel("the observer's feed was closed")
        self._pending = None
        self._ready = trio.Event()
        self.sent += 1
        return snapshot


@attrs.define(eq=False)
class Observer:
    """Samples ``build()`` every ``interval`` seconds while at least one viewer is connected.

    Args:
        build: returns one encoded snapshot; called in the trio thread, once
            per tick, and once for each viewer as it connects (so a page
            has something to show at once).
        interval: seconds between snapshots.
        max_viewers: viewers at once; the excess is refused.
    """

    build: Callable[[], bytes]
    interval: float = attrs.field(default=0.5)
    max_viewers: int = attrs.field(default=16)
    ticks: int = attrs.field(default=0, init=False)
    refused: int = attrs.field(default=0, init=False)
    _viewers: set[Viewer] = attrs.field(factory=set, init=False)
    _dropped_gone: int = attrs.field(default=0, init=False)
    _wanted: trio.Event = attrs.field(factory=trio.Event, init=False)
    _closed: bool = attrs.field(default=False, init=False)

    def __attrs_post_init__(self) -> None:
        check_finite_duration("interval", self.interval)
        check_count("max_viewers", self.max_viewers, minimum=1)

    @contextmanager
    def viewer(self) -> Iterator[Viewer]:
        """Connect a viewer for the ``with`` block, with a first snapshot already offered.

        Raises:
            TooManyViewers: ``max_viewers`` are connected already, or the
                feed is closed.
        """
        if self._closed:
            raise TooManyViewers("the server is stopping")
        if len(self._viewers) >= self.max_viewers:
            self.refused += 1
            raise TooManyViewers(f"{self.max_viewers} viewers are connected already")
        viewer = Viewer()
        viewer.offer(self.build())
        self._viewers.add(viewer)
        self._wanted.set()
        try:
            yield viewer
        finally:
            self._viewers.discard(viewer)
            self._dropped_gone += viewer.dropped
            if not self._viewers:
                self._wanted = trio.Event()

    def close(self) -> None:
        """End every viewer's feed and refuse new viewers: the server is stopping."""
        self._closed = True
        for viewer in self._viewers:
            viewer.close()

    async def run(self) -> None:
        """Sample until cancelled: one snapshot per tick while anyone is viewing."""
        while True:
            await self._wanted.wait()
            next_tick = trio.current_time() + self.interval
            while self._viewers:
                await trio.sleep_until(next_tick)
                next_tick = max(next_tick + self.interval, trio.current_time())
                self.tick()

    def tick(self) -> None:
        """Build one snapshot and offer it to every viewer."""
        if not self._viewers:
            return
        snapshot = self.build()
        self.ticks += 1
        for viewer in self._viewers:
            viewer.offer(snapshot)

    def statistics(self) -> ObserverStatistics:
        """The feed's counters now."""
        dropped = self._dropped_gone + sum(v.dropped for v in self._viewers)
        return ObserverStatistics(
            interval=self.interval,
            viewers=len(self._viewers),
            max_viewers=self.max_viewers,
            ticks=self.ticks,
            dropped=dropped,
            refused=self.refused,
        )


def snapshot(status: bytes, *, clock: float, wall: float | None = None) -> bytes:
    """One snapshot of the feed: a ``/status`` body with the moment it was taken.

    ``clock`` is ``trio.current_time()`` and ``wall`` the Unix time at the
    same moment, so the page can turn the snapshot's trio times into clock
    times.
    """
    wall = time.time() if wall is None else wall
    return f'{{"clock":{clock!r},"wall":{wall!r},"status":'.encode() + status + b"}"


def frame(snapshot: bytes, *, dropped: int) -> bytes:
    """One server-sent event: a snapshot and the viewer's count of dropped ones."""
    return b'data: {"dropped":%d,"snapshot":%s}\n\n' % (dropped, snapshot)
