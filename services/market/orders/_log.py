"""OrderLog: follow an order-status log and publish its orders on the bus.

The file is parsed on every core, and the event loop never waits on work
it cannot cancel:

* a look at the file (an ``fstat``, in a thread) says how big it is now,
  and whether it was truncated or replaced;
* what is new is cut into regions by offset alone (``_regions.py``): the
  event loop never touches the bytes;
* a backlog's regions are read *and* parsed by worker processes, never more
  regions in flight than ``workers``, and only the encoded messages come
  back; a small increment (a live tail) is read in a thread and parsed in
  the event loop, in slices of a few ms;
* results are published in region order, by a task beside the one that
  dispatches, so workers parse the next regions while this one is published;
* a region whose worker failed (it died, or could not reopen the file) is
  read in a thread and parsed in the event loop instead;
* a truncation or rotation is acted on only between rounds, once every
  region cut from the old file has been read.

Lines without their newline yet are left unread until it arrives; malformed
lines are counted and sampled, never fatal.

Every call that touches the file system (open, stat, read, close) runs in a
thread that is abandoned if the follower is cancelled, through one limiter
of the log's own that closes share too: a hung mount can neither keep the
service from stopping nor take more than :data:`FILE_THREADS` threads with
it, however often the follower is restarted. A path that names something
other than a regular file (a FIFO) is never opened (``_tail.py``).
"""

from __future__ import annotations

import collections
import functools
import logging
import math
import os
import threading
from collections.abc import Awaitable, Callable
from time import perf_counter
from typing import Protocol, TypeVar, TypeVarTuple, runtime_checkable

import attrs
import trio

import engine
from engine.bus import Bus
from engine.lowlevel import check_count

from ._buffers import ResultBuffers
from ._config import OrderLogConfig, OrderLogStatistics, PublishMode, StartAt
from ._history import History
from ._records import Order, ParsedChunk, decode_order, parse_chunk
from ._regions import Lines, ParsedRegion, ParseOptions, Region, parse_region_in_worker
from ._tail import Event, Tail

logger = logging.getLogger("market.orders")

T = TypeVar("T")
Ts = TypeVarTuple("Ts")

# The longest stretch of parsing or publishing in the event loop between two
# checkpoints: well inside the 20 ms a step may take.
SLICE_SECONDS = 0.004
# A backlog at least this big goes to worker processes (when there are
# workers): below it, a dispatch costs more than it saves.
PROCESS_MIN_BYTES = 256 << 10
# A worker's region: big enough that a dispatch's CPU (parent and worker) is
# noise, small enough that a region's objects stay in the CPU's caches while
# it is parsed and that workers share a backlog evenly (docs/orders.md has
# the figures).
REGION_BYTES = 1 << 20
MIN_REGION_BYTES = 64 << 10
_FIRST_SLICE_BYTES = 64 << 10
_MIN_SLICE_BYTES = 4 << 10
_SAMPLES_KEPT = 5
_LOG_EVERY = 100
# Publishing looks at the clock once per this many messages.
_CLOCK_EVERY = 256
# Threads the log's file calls may hold at once, hung ones and closes included:
# a look or a read at a time normally, a few reads when workers fail.
FILE_THREADS = 4
# Real seconds the end of follow() waits for its file to close before
# abandoning the close (a hung file system can block close() too).
CLOSE_WAIT = 1.0


class TailFactory(Protocol):
    """Makes the :class:`Tail` each run of :meth:`OrderLog.follow` uses (``Tail`` by default)."""

    def __call__(self, path: str, *, from_end: bool) -> Tail: ...


@runtime_checkable
class _PublishesNowait(Protocol):
    """A bus that can publish without a checkpoint (``engine.bus.MemoryBus``)."""

    def publish_nowait(self, topic: str, data: bytes, *, msg_id: str | None = None) -> object: ...


class _Slot:
    """One region's place in publishing order; filled once its lines are read or parsed."""

    __slots__ = ("filled", "region", "result")

    def __init__(self, region: Region) -> None:
        self.region = region
        self.filled = trio.Event()
        self.result: ParsedRegion | Lines | None = None


class _Counters(engine.Tally[OrderLogStatistics]):
    """The counters behind :meth:`OrderLog.statistics`."""


class OrderLog:
    """Follows an order-status log and publishes its orders on a bus.

    Args:
        config: what to follow and how.
        bus: where orders go (topic ``orders.<coin>``).
        pool: the worker processes that read and parse backlogs; the run's
            default pool (one worker per CPU) if omitted.
        tail_factory: for tests: makes the object that opens, looks at,
            reads and closes the file in each run of :meth:`follow`, called
            as ``tail_factory(path, from_end=...)``; a fake can play a hung
            file system.
    """

    def __init__(
        self,
        config: OrderLogConfig,
        bus: Bus,
        *,
        pool: engine.ProcessPool | None = None,
        tail_factory: TailFactory = Tail,
    ) -> None:
        self.config = config
        self._bus = bus
        self._pool = pool
        self._nowait = bus.publish_nowait if isinstance(bus, _PublishesNowait) else None
        self._history = History(config.history)
        self._samples: collections.deque[str] = collections.deque(maxlen=_SAMPLES_KEPT)
        batch = config.publish is PublishMode.BATCH
        self._options = ParseOptions(
            batch=batch,
            keep=config.history if batch else 0,
            max_samples=_SAMPLES_KEPT,
            max_line_bytes=config.max_line_bytes,
        )
        self._parse = functools.partial(
            parse_chunk, batch=batch, keep=self._options.keep, max_samples=_SAMPLES_KEPT
        )
        self._counters = _Counters()
        self._position = self._lag = self._pending = 0
        self._refused: str | None = None
        self._files = trio.CapacityLimiter(FILE_THREADS)
        self._tail_factory = tail_factory
        # Descriptors given up by runs of follow whose close has not started
        # yet (every thread was held): the next close that starts closes them.
        self._unclosed: list[int] = []
        self._unclosed_lock = threading.Lock()
        self._slice_bytes = _FIRST_SLICE_BYTES
        self._buffers = ResultBuffers()
        # The last region of the current round that owned a line, as (index,
        # end, pending): its end is where the next round starts.
        self._last_owned: tuple[int, int, int] | None = None
        # The regions of the current round found cut short by a truncation.
        self._cut_short: set[int] = set()

    # -- the public side ---------------------------------------------------------

    def statistics(self) -> OrderLogStatistics:
        """A frozen snapshot of the counters."""
        return self._counters.snapshot(
            path=self.config.path,
            malformed_samples=tuple(self._samples),
            position=self._position,
            lag_bytes=self._lag,
            pending_bytes=self._pending,
            refused=self._refused or "",
            file_threads=self._files.borrowed_tokens,
            unclosed_files=len(self._unclosed),
        )

    def recent(self, limit: int = 100) -> list[Order]:
        """The latest orders published, newest first, at most ``limit`` (and ``history``).

        Raises:
            ValueError: ``limit`` is negative.
        """
        return [decode_order(payload) for payload in self._latest(limit)]

    def recent_json(self, limit: int = 100) -> bytes:
        """:meth:`recent` as a JSON array, without decoding anything (for an HTTP answer)."""
        return b"[" + b",".join(self._latest(limit)) + b"]"

    def _latest(self, limit: int) -> list[bytes]:
        check_count("limit", limit)
        return self._history.latest(limit)

    async def follow(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Follow the file until cancelled: a supervised child.

        Waits (polling) until the path names a regular file, reports ready
        once it is open, then reads, parses and publishes for ever, beating
        :func:`engine.heartbeat` at every look. Each call starts afresh at
        ``config.start`` (a restart re-reads from the beginning by default;
        ``msg_id`` lets an at-least-once bus drop the repeats).

        A path that names something other than a regular file (a FIFO, a
        directory, a device) is not opened: it is waited on as a missing
        file is, logged once and counted (``refusals``, ``refused``).

        A last line still without its newline when this ends is not
        published (``pending_bytes`` shows it): a writer may yet finish it.

        Cancellation:
            Returns within :data:`CLOSE_WAIT` seconds, whatever the file
            system does: a call hung in a thread (a dead network mount) is
            abandoned at once and counted in :func:`engine.bridge_statistics`
            (``threads_abandoned``); the file it holds is closed when it
            returns. Closing the file is waited for :data:`CLOSE_WAIT`
            seconds at most, then abandoned the same way; if it could not
            even start (hung calls held all :data:`FILE_THREADS`), the next
            run's close closes it (``unclosed_files`` counts it meanwhile).

        Raises:
            OSError: the file could not be read (the supervisor restarts it).
        """
        tail = self._tail_factory(self.config.path, from_end=self.config.start is StartAt.END)
        try:
            while not await self._in_thread(tail.open):
                self._note_refusal(tail)
                engine.heartbeat()
                await trio.sleep(self.config.poll_interval)
            self._note_refusal(tail)
            self._position, self._pending = tail.seen, 0
            self._counters.following = True
            logger.info("following %s", self.config.path)
            task_status.started()
            # Room for as many finished regions as are being parsed: the
            # workers need not wait for the publisher to take the last one.
            send, receive = trio.open_memory_channel[_Slot](max(self._workers(), 1))
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._publish_all, receive, name="order log publisher")
                async with send:
                    await self._follow(tail, send)
        finally:
            self._counters.following = False
            self._buffers.close()
            await self._close(tail)

    def _in_thread(self, fn: Callable[[*Ts], T], *args: *Ts) -> Awaitable[T]:
        """``fn(*args)`` in a thread that cancelling the caller abandons, in the log's limiter."""
        return engine.to_thread(fn, *args, abandon_on_cancel=True, limiter=self._files)

    async def _close(self, tail: Tail) -> None:
        """Close the file: in one of the log's threads, shielded (``follow`` is ending), bounded.

        Closes the descriptors earlier runs left unclosed too. Whatever this
        cannot start on within :data:`CLOSE_WAIT` stays in ``_unclosed``.
        """
        fd = tail.detach()  # whatever still uses the file closes it when done
        with self._unclosed_lock:
            if fd is not None:
                self._unclosed.append(fd)
            if not self._unclosed:
                return
        with trio.move_on_after(CLOSE_WAIT, shield=True):
            await self._in_thread(self._close_unclosed, tail)

    def _close_unclosed(self, tail: Tail) -> None:
        """Close every descriptor waiting to be closed (in a thread)."""
        while True:
            with self._unclosed_lock:
                if not self._unclosed:
                    return
                fd = self._unclosed.pop()
            tail.close_descriptor(fd)

    def _note_refusal(self, tail: Tail) -> None:
        """Count and log, once per episode, a path naming something other than a regular file."""
        refused = tail.refused
        if refused is not None and refused != self._refused:
            self._counters.refusals += 1
            logger.warning(
                "%s is %s, not a regular file: not opened; %s",
                self.config.path,
                refused,
                "still following the file it named before"
                if self._counters.following
                else "waiting for a regular file there",
            )
        self._refused = refused

    # -- looking and cutting ---------------------------------------------------------

    async def _follow(self, tail: Tail, send: trio.MemorySendChannel[_Slot]) -> None:
        while True:
            look = await self._in_thread(tail.look)
            self._note_refusal(tail)
            engine.heartbeat()
            if look.event is Event.TRUNCATED:
                self._truncated()
            elif look.event is Event.ROTATED:
                self._counters.rotations += 1
                logger.info("%s was replaced; reading the new file", self.config.path)
                self._drop_pending("unfinished when the file was rotated")
            self._lag = look.size - self._position
            if look.size > tail.seen:
                cut_short = await self._round(tail, look.size, send)
                # Truncated while its regions were read: from the start again,
                # and the next look must not report it a second time.
                tail.seen = 0 if cut_short else look.size
                self._lag = look.size - self._position
            else:
                await trio.sleep(self.config.poll_interval)

    def _truncated(self) -> None:
        self._counters.truncations += 1
        logger.info("%s was truncated; reading it from the start", self.config.path)
        self._drop_pending("unfinished when the file was truncated")

    def _drop_pending(self, why: str) -> None:
        if self._pending:
            self._counters.lines += 1
            self._count_malformed(1, [f"{why}: {self._pending} bytes at {self._position}"])
        self._position = self._pending = 0

    async def _round(self, tail: Tail, size: int, send: trio.MemorySendChannel[_Slot]) -> bool:
        """Cut ``[position, size)`` into regions and see each one read, in order.

        Returns once every region has been read or parsed (not necessarily
        published): only then is the next round's start known, and only then
        may a look replace the file the regions were cut from. Returns
        whether the file was found truncated meanwhile (then it is followed
        from 0 again).
        """
        start = self._position
        workers = self._workers()
        in_processes = workers > 0 and size - start >= PROCESS_MIN_BYTES
        if in_processes:
            share = math.ceil((size - start) / workers)
            step = min(REGION_BYTES, self.config.max_block_bytes, max(MIN_REGION_BYTES, share))
            in_flight = trio.Semaphore(workers)
        else:
            # A block must be able to hold the longest line allowed.
            step = max(self.config.max_block_bytes, self.config.max_line_bytes + 1)
            in_flight = trio.Semaphore(1)  # one read ahead of the parsing
        self._last_owned, self._cut_short = None, set()
        async with trio.open_nursery() as nursery:
            for index, cut in enumerate(range(start, size, step)):
                slot = _Slot(Region(tail.file, cut, min(cut + step, size), size))
                await in_flight.acquire()
                engine.heartbeat()  # a backlog is one round, however long it takes
                await send.send(slot)
                nursery.start_soon(self._fill, slot, index, tail, in_processes, in_flight)
        if self._last_owned is not None:
            _, end, pending = self._last_owned
            self._counters.bytes_read += end - start
        else:  # nothing owned: all of it inside a line being skipped (or cut short)
            end, pending = size, 0
            self._counters.bytes_read += 0 if self._cut_short else size - start
        if self._cut_short:
            # The previous round's unfinished line was finished by region 0,
            # unless that one was cut short; this round's last one never will be.
            if 0 not in self._cut_short:
                self._pending = pending
            self._truncated()
            return True
        self._position, self._pending = end, pending
        return False

    async def _fill(
        self, slot: _Slot, index: int, tail: Tail, in_process: bool, in_flight: trio.Semaphore
    ) -> None:
        try:
            result: ParsedRegion | Lines | None = None
            if in_process:
                result = await self._parse_in_worker(slot.region)
            if result is None:
                result = await self._in_thread(tail.read, slot.region, self.config.max_line_bytes)
        finally:
            in_flight.release()
        lines = result.lines if isinstance(result, ParsedRegion) else result
        if lines.cut_short:
            self._cut_short.add(index)
        elif lines.owned and (self._last_owned is None or self._last_owned[0] < index):
            self._last_owned = (index, lines.end, lines.pending)
        slot.result = result
        slot.filled.set()

    async def _parse_in_worker(self, region: Region) -> ParsedRegion | None:
        """The region parsed by a worker; ``None`` if it could not be (logged, counted)."""
        buffer = self._buffers.take()
        try:
            result = await self._run(
                parse_region_in_worker,
                region,
                self._options,
                None if buffer is None else self._buffers.path(buffer),
            )
            if result is not None and result.payload_bytes >= 0:
                assert buffer is not None
                assert result.parsed is not None
                payloads = self._buffers.read(buffer, result.payload_bytes)
                parsed = attrs.evolve(result.parsed, payloads=payloads)
                result = attrs.evolve(result, parsed=parsed, payload_bytes=-1)
        except Exception as exc:  # a dead worker, or a bug: the event loop does it instead
            logger.warning(
                "a worker could not parse bytes %d-%d of %s (%r); parsing them here",
                region.start,
                region.stop,
                self.config.path,
                exc,
            )
            result = None
        else:
            if result is None:
                logger.warning(
                    "a worker could not reopen %s; reading bytes %d-%d here",
                    self.config.path,
                    region.start,
                    region.stop,
                )
        finally:
            self._buffers.give_back(buffer)
        if result is None:
            self._counters.worker_failures += 1
        return result

    def _run(
        self,
        fn: Callable[[Region, ParseOptions, str | None], T],
        region: Region,
        options: ParseOptions,
        buffer: str | None,
    ) -> Awaitable[T]:
        if self._pool is not None:
            return self._pool.run(fn, region, options, buffer)
        return engine.to_process(fn, region, options, buffer)

    def _workers(self) -> int:
        if self.config.workers is not None:
            return self.config.workers
        if self._pool is not None:
            return self._pool.workers
        return os.cpu_count() or 1

    # -- publishing ------------------------------------------------------------------

    async def _publish_all(self, receive: trio.MemoryReceiveChannel[_Slot]) -> None:
        async for slot in receive:
            await slot.filled.wait()
            result, slot.result = slot.result, None
            if isinstance(result, ParsedRegion):
                lines = result.lines
                if result.parsed is not None:
                    self._counters.chunks_in_processes += 1
                    await self._publish(result.parsed)
            else:
                assert result is not None
                lines = result
                await self._parse_here(lines.data)
            if lines.overlong:
                self._counters.lines += 1
                self._count_malformed(1, [lines.sample])

    async def _parse_here(self, data: bytes) -> None:
        """Parse whole lines in the event loop, a slice of about :data:`SLICE_SECONDS` at a time."""
        start, end = 0, len(data)
        while start < end:
            stop = end
            if start + self._slice_bytes < end:
                stop = data.find(b"\n", start + self._slice_bytes - 1) + 1
            began = perf_counter()
            parsed = self._parse(data[start:stop])
            took = perf_counter() - began
            # Aim the next slice at SLICE_SECONDS from this one's speed, moving
            # halfway there so one slow slice (a busy machine) does not swing it.
            target = (stop - start) * SLICE_SECONDS / max(took, 1e-6)
            self._slice_bytes = int(
                min(max((self._slice_bytes + target) / 2, _MIN_SLICE_BYTES), 1 << 22)
            )
            self._counters.slices_in_loop += 1
            await trio.lowlevel.checkpoint()
            await self._publish(parsed)
            start = stop

    async def _publish(self, parsed: ParsedChunk) -> None:
        counters = self._counters
        counters.lines += parsed.lines
        if parsed.malformed:
            self._count_malformed(parsed.malformed, parsed.samples)
        if not parsed.topics:
            await trio.lowlevel.checkpoint()
            return
        topics = parsed.topics
        ids = parsed.ids.split("\n")
        payloads = parsed.payloads.split(b"\n")
        payloads.pop()  # after the last newline
        bus, nowait = self._bus, self._nowait
        deadline = perf_counter() + SLICE_SECONDS
        counted = 0
        for index, (topic, payload, msg_id) in enumerate(zip(topics, payloads, ids, strict=True)):
            if nowait is None:
                await bus.publish(topic, payload, msg_id=msg_id)
            else:
                try:
                    nowait(topic, payload, msg_id=msg_id)
                except trio.WouldBlock:  # a subscriber with the block policy is full
                    await bus.publish(topic, payload, msg_id=msg_id)
            if index % _CLOCK_EVERY == _CLOCK_EVERY - 1 and perf_counter() > deadline:
                counters.messages += index + 1 - counted
                counted = index + 1
                await trio.lowlevel.checkpoint()
                deadline = perf_counter() + SLICE_SECONDS
        counters.messages += len(topics) - counted
        counters.orders += parsed.orders
        if self.config.publish is PublishMode.BATCH:
            self._history.add_batch(payloads, parsed.order_coins)
        else:
            self._history.add_orders(payloads)
        # The last stretch of publishing ends here: whatever runs next (the
        # next slice's parse) starts a step of its own.
        await trio.lowlevel.checkpoint()

    def _count_malformed(self, count: int, samples: list[str]) -> None:
        before = self._counters.malformed
        after = self._counters.malformed = before + count
        self._samples.extend(samples)
        # The first one, then about one in _LOG_EVERY: a log line, not a flood.
        if samples and (before == 0 or before // _LOG_EVERY != after // _LOG_EVERY):
            logger.warning(
                "%s: %d malformed lines so far; latest: %s",
                self.config.path,
                after,
                samples[-1],
            )
