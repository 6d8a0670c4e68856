"""A component of your own that looks like the engine's: checked arguments,
statistics declared once, listed under the child that runs it, on /metrics.

Run it: ``python docs/examples/extending_component.py``.
"""

from __future__ import annotations

import collections
import functools

import attrs
import httpx
import trio
import trio.testing

import engine
from engine.lowlevel import attach_statistics, check_count, check_name, describe_error


@engine.metric_source(label="deduper")
@attrs.frozen
class DeduperStatistics:
    """What a :class:`Deduper` has done."""

    name: str
    window: int = attrs.field(metadata=engine.gauge_metric("Message ids remembered"))
    passed: int = attrs.field(default=0, metadata=engine.counter_metric("Messages let through"))
    duplicates: int = attrs.field(
        default=0, metadata=engine.counter_metric("Messages seen before, dropped")
    )
    last_error: str | None = None


class _Tally(engine.Tally[DeduperStatistics]):
    """The counters behind DeduperStatistics."""


class Deduper:
    """Passes on each message id once, remembering the last ``window`` ids."""

    def __init__(self, name: str, *, window: int = 1000) -> None:
        self.name = check_name("name", name)
        self.window = check_count("window", window, minimum=1)
        self._seen: collections.OrderedDict[int, None] = collections.OrderedDict()
        self._tally = _Tally()

    def statistics(self) -> DeduperStatistics:
        return self._tally.snapshot(name=self.name, window=self.window)

    async def run(
        self,
        source: engine.ReceiveChannel[int],
        sink: engine.SendChannel[int],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        with attach_statistics(self):  # listed under the child that runs it
            task_status.started()
            async for message_id in source:
                engine.heartbeat()
                if message_id in self._seen:
                    self._tally.duplicates += 1
                    continue
                self._seen[message_id] = None
                if len(self._seen) > self.window:
                    self._seen.popitem(last=False)
                try:
                    await sink.send(message_id)
                except trio.ClosedResourceError as exc:
                    self._tally.last_error = describe_error(exc)
                    raise
                self._tally.passed += 1


async def main() -> None:
    try:
        Deduper("orders", window=0)
    except ValueError as exc:
        print(f"refused: {exc}")

    deduper = Deduper("orders", window=100)
    send_in, receive_in = engine.open_channel[int](10)
    send_out, receive_out = engine.open_channel[int](10)
    async with engine.open_supervisor(name="service") as sup, trio.open_nursery() as nursery:
        await sup.start(deduper.run, receive_in, send_out, name="dedup", stall_after=5)
        ops = await nursery.start(functools.partial(engine.serve_ops, sup, port=0))
        for message_id in [1, 2, 2, 3, 1, 4]:
            await send_in.send(message_id)
        print("passed on:", [await receive_out.receive() for _ in range(4)])
        await trio.testing.wait_all_tasks_blocked()  # the deduper has counted the last one
        (child,) = sup.statistics().children
        print(f"{child.name}: {child.attached}")
        async with httpx.AsyncClient() as client:
            metrics = (await client.get(f"{ops.url}/metrics")).text
        print(*(line for line in metrics.splitlines() if "deduper" in line), sep="\n")
        sup.cancel()
        nursery.cancel_scope.cancel()


if __name__ == "__main__":
    trio.run(main)
