"""The market service end to end, in-process: real sockets, the simulator's faults, /ready.

Each test runs :func:`serve_market` in its own nursery on 127.0.0.1 port 0
and talks to it as its users do: WebSocket clients on ``/ws``, HTTP on the
ops port. Faults come from the exchange simulator's switches. Where a test
counts trade ids exactly, it runs its own simulator on a simulated clock
(see ``CLOCK``).
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import signal
import subprocess
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any, cast
from urllib.parse import urlsplit

import attrs
import httpx
import pytest
import trio
import trio_websocket
from trio_websocket import ConnectionClosed, WebSocketConnection
from wsproto.events import AcceptConnection, CloseConnection

import engine
from engine.broadcast import CLOSE_GOING_AWAY, CLOSE_TOO_SLOW, ClientStatistics
from services.market._service import MarketConfig, MarketService, serve_market
from services.market.simulator import Simulator, SimulatorConfig, open_simulator
from tests.test_broadcast import raw_client
from tests.test_market_service import service_process

GUARD = 20  # seconds: an absolute bound on every test (a loaded machine is slow)
SYMBOLS = ("BTCUSDT", "ETHUSDT", "SOLUSDT", "BNBUSDT", "XRPUSDT")
# The tests' own simulators stamp messages from this simulated start (on a
# minute), not the wall clock: every run sends the same sequence, and no
# kline candle rolls over mid-test (a roll-over once made the simulator add
# a trade its trade stream never reported, a false gap in the trade ids).
CLOCK = 1_700_000_040_000


@asynccontextmanager
async def running(**options: Any) -> AsyncIterator[MarketService]:
    """The service on free ports, cancelled when the block ends."""
    if "feed_url" in options:  # the simulator answers REST on the same port
        options.setdefault("rest_url", options["feed_url"].replace("ws://", "http://", 1))
    config = MarketConfig(port=0, ws_port=0, **options)
    async with trio.open_nursery() as nursery:
        service: MarketService = await nursery.start(serve_market, config)
        yield service
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def stalled_simulator(config: SimulatorConfig) -> AsyncIterator[Simulator]:
    """A simulator whose data is held from the start, until the test resumes it.

    Its clock starts at ``CLOCK``, so trade ids can be counted exactly.
    """
    async with open_simulator(attrs.evolve(config, epoch_ms=CLOCK)) as simulator:
        simulator.stall(math.inf)
        yield simulator


@asynccontextmanager
async def ws_client(url: str) -> AsyncIterator[WebSocketConnection]:
    """A trio-websocket client on a TCP stream the test owns and closes.

    (trio-websocket 0.12 leaves its socket open when the server closes first.)
    """
    parts = urlsplit(url)
    assert parts.hostname is not None
    assert parts.port is not None
    target = f"{parts.path}?{parts.query}" if parts.query else parts.path
    stream = await trio.open_tcp_stream(parts.hostname, parts.port)
    async with stream, trio.open_nursery() as nursery:
        ws = await trio_websocket.wrap_client_stream(nursery, stream, parts.hostname, target)
        try:
            yield ws
        finally:
            await ws.aclose()


async def read_until_closed(ws: WebSocketConnection) -> ConnectionClosed:
    """Read (and discard) messages until the connection closes; how it closed."""
    try:
        while True:
            await ws.get_message()
    except ConnectionClosed as exc:
        return exc


class Reader:
    """Reads a WebSocket client's messages in the background, as a client that keeps up."""

    def __init__(self, ws: WebSocketConnection) -> None:
        self.ws = ws
        self.messages: list[dict[str, Any]] = []

    async def run(self) -> None:
        # A close here (this client too slow, say) fails the test at once.
        while True:
            self.messages.append(json.loads(await self.ws.get_message()))

    def trade_ids(self, since: int = 0) -> dict[str, list[int]]:
        """Each symbol's trade ids among the messages from ``since`` on, sorted.

        Sorted, because the processors publish concurrently: two trades may
        swap places on the way; none may go missing.
        """
        ids: dict[str, list[int]] = defaultdict(list)
        for message in self.messages[since:]:
            assert message["type"] == "trade", message
            ids[message["symbol"]].append(message["id"])
        return {symbol: sorted(found) for symbol, found in ids.items()}


async def until(predicate: Callable[[], bool]) -> None:
    """Return once ``predicate()`` holds; the caller's ``fail_after`` bounds the wait."""
    while not predicate():  # noqa: ASYNC110 -- real sockets; no event to wait on
        await trio.sleep(0.01)


def client_on(service: MarketService, topics: tuple[str, ...]) -> ClientStatistics:
    """The broadcast's snapshot of its one client with ``topics``."""
    [client] = [c for c in service.broadcast.statistics().connections if c.topics == topics]
    return client


def settled(service: MarketService, simulator: Simulator, reader: Reader) -> bool:
    """Whether every message the (stalled) simulator sent has reached ``reader``.

    Simulator -> feed -> processors -> bus -> broadcast -> the reader's socket:
    each stage has taken everything the one before it passed on. That holds
    only if no counter lags what it counts: the simulator counts a burst
    before a client can read it (and a stall holds even a burst already due),
    and a client's ``queued`` covers the frames its writer is writing (both
    tested in test_simulator and test_broadcast).
    """
    sent = simulator.statistics()
    feed = service.feed.statistics()
    broadcast = service.broadcast.statistics()
    client = client_on(service, ("trades.>",))
    return (
        sent.stalled
        and feed.received == sent.messages_sent + sent.malformed_sent
        and feed.published == feed.received - feed.malformed
        and cast(engine.HubStatistics, service.bus.statistics()).published == feed.published
        and broadcast.received == feed.published
        and client.queued == 0
        and len(reader.messages) == client.sent
    )


def published_all(service: MarketService) -> bool:
    """Whether the feed has published every valid frame it received."""
    stats = service.feed.statistics()
    return stats.published == stats.received - stats.malformed


def consecutive(ids: list[int]) -> bool:
    return ids == list(range(ids[0], ids[0] + len(ids)))


# -- a client receives trades ---------------------------------------------------


async def test_a_websocket_client_receives_trades_from_the_embedded_simulator() -> None:
    with trio.fail_after(GUARD):
        async with (
            running(symbols=("BTCUSDT", "ETHUSDT"), rate=2000) as service,
            ws_client(f"{service.ws_url}?topics=trades") as ws,
        ):
            trades = [json.loads(await ws.get_message()) for _ in range(20)]
            assert service.simulator is not None
            assert service.simulator.statistics().connections_open == 1  # the feed's
            published = service.feed.statistics().published
    assert {t["type"] for t in trades} == {"trade"}
    # The simulator's streams alternate between the symbols: both arrive.
    assert {t["symbol"] for t in trades} == {"BTCUSDT", "ETHUSDT"}
    assert all(t["price"] > 0 and t["qty"] > 0 and isinstance(t["id"], int) for t in trades)
    assert published >= 20  # each of them went through the feed and the bus


async def test_a_topic_the_service_never_publishes_is_refused_with_the_valid_kinds() -> None:
    with trio.fail_after(GUARD):
        async with running(symbols=("BTCUSDT",), rate=100) as service:
            refused: list[trio_websocket.ConnectionRejected] = []
            try:
                async with ws_client(f"{service.ws_url}?topics=tardes"):
                    pass
            except* trio_websocket.ConnectionRejected as group:
                refused += [
                    e for e in group.exceptions if isinstance(e, trio_websocket.ConnectionRejected)
                ]
            # Every kind the service does publish is still accepted.
            kinds = "trades,aggtrades,book,depth,klines,whales,orders"
            async with ws_client(f"{service.ws_url}?topics={kinds}"):
                pass
            rejected = service.broadcast.statistics().rejected
    assert [r.status_code for r in refused] == [400]
    body = (refused[0].body or b"").decode()
    assert "tardes" in body
    for kind in kinds.split(","):
        assert kind in body
    assert rejected == {"unknown_topics": 1}


async def test_the_stream_and_the_ops_endpoints_listen_on_their_own_addresses() -> None:
    with trio.fail_after(GUARD):
        async with running(symbols=("BTCUSDT",), rate=100, ws_host="127.0.0.2") as service:
            ops, stream = urlsplit(service.url), urlsplit(service.ws_url)
            # The ops port is not served on the stream's address, nor the reverse.
            for host, port in ((stream.hostname, ops.port), (ops.hostname, stream.port)):
                assert host is not None
                assert port is not None
                with pytest.raises(OSError, match="all attempts to connect"):
                    await trio.open_tcp_stream(host, port)
            async with ws_client(f"{service.ws_url}?topics=trades") as ws:
                assert json.loads(await ws.get_message())["type"] == "trade"
    assert (ops.hostname, stream.hostname) == ("127.0.0.1", "127.0.0.2")


# -- the simulator drops the connection -----------------------------------------


async def test_the_feed_reconnects_after_a_drop_and_data_resumes() -> None:
    config = SimulatorConfig(symbols=SYMBOLS, rate=2000)
    with trio.fail_after(GUARD):
        async with (
            stalled_simulator(config) as simulator,
            running(feed_url=simulator.address.ws_url, symbols=SYMBOLS) as service,
            ws_client(f"{service.ws_url}?topics=trades") as ws,
            trio.open_nursery() as nursery,
        ):
            assert service.simulator is None  # an exchange URL was given
            reader = Reader(ws)
            nursery.start_soon(reader.run)
            # The client is in before the first message: it gets every trade.
            await until(lambda: service.broadcast.statistics().clients == 1)
            simulator.resume()
            await until(lambda: len(reader.trade_ids()) == len(SYMBOLS))
            # Hold the data and let everything sent reach the client, so what
            # it receives after the drop can only come from the new connection.
            simulator.stall(math.inf)
            await until(lambda: settled(service, simulator, reader))
            before = reader.trade_ids()
            published = service.feed.statistics().published
            sent_before = simulator.statistics().messages_sent

            assert simulator.drop_connections() == 1
            await until(lambda: service.feed.statistics().connections == 2)
            seen = len(reader.messages)
            simulator.resume()
            await until(lambda: len(reader.trade_ids(seen)) == len(SYMBOLS))
            simulator.stall(math.inf)
            await until(lambda: settled(service, simulator, reader))
            after = reader.trade_ids(seen)
            stats = service.feed.statistics()
            nursery.cancel_scope.cancel()
    assert (stats.connected, stats.connections, stats.disconnects) == (True, 2, 1)
    assert stats.published > published
    assert simulator.statistics().connections_dropped == 1
    # Nothing the client was sent went missing, on either connection.
    assert all(consecutive(ids) for ids in [*before.values(), *after.values()])
    # The exchange's ids went on while the feed was away: the new connection
    # starts past every message sent before the drop, and the feed counts the
    # ids it never saw, symbol by symbol.
    gaps = {s: after[s][0] - before[s][-1] - 1 for s in SYMBOLS}
    assert all(gap > 0 for gap in gaps.values())
    assert {s: after[s][0] for s in SYMBOLS} == {s: before[s][0] + sent_before for s in SYMBOLS}
    assert stats.missing_trades == sum(gaps.values())
    assert stats.malformed == 0


# -- malformed frames -------------------------------------------------------------


async def test_a_malformed_frame_is_counted_and_shown_and_the_feed_goes_on() -> None:
    async with httpx.AsyncClient(timeout=5) as http:
        with trio.fail_after(GUARD):
            async with running(symbols=("BTCUSDT",), rate=1000) as service:
                simulator = service.simulator
                assert simulator is not None
                await until(lambda: service.feed.statistics().received > 0)
                assert simulator.send_malformed() == 1
                await until(lambda: service.feed.statistics().malformed == 1)
                received = service.feed.statistics().received
                await until(lambda: service.feed.statistics().received > received + 10)
                simulator.stall(math.inf)  # so the processors can catch up
                await until(lambda: published_all(service))
                status = (await http.get(f"{service.url}/status")).json()
                ready = await http.get(f"{service.url}/ready")
                stats = service.feed.statistics()
    [sample] = stats.malformed_samples
    # A truncated copy of a real message: the start of a combined-stream frame.
    assert sample.startswith('{"stream":"btcusdt@')
    with pytest.raises(json.JSONDecodeError):
        json.loads(sample)
    assert (stats.connections, stats.disconnects, stats.malformed) == (1, 0, 1)
    assert stats.published == stats.received - 1  # everything else went on to the bus
    assert ready.status_code == 200
    feed = status["sources"]["feed"]
    assert (feed["malformed"], feed["malformed_samples"]) == (1, [sample])
    assert status["sources"]["simulator"]["malformed_sent"] == 1


# -- a client that never reads --------------------------------------------------


async def test_a_client_that_never_reads_is_closed_while_a_reader_gets_every_trade() -> None:
    config = SimulatorConfig(symbols=SYMBOLS, rate=20_000)
    with trio.fail_after(GUARD):
        async with (
            stalled_simulator(config) as simulator,
            running(
                feed_url=simulator.address.ws_url, symbols=SYMBOLS, client_max_lag=2.0
            ) as service,
            ws_client(f"{service.ws_url}?topics=trades") as ws,
            # A small receive window, so the server's writes block soon.
            raw_client(urlsplit(service.ws_url).port or 0, receive_buffer=4096) as slow,
            trio.open_nursery() as nursery,
        ):
            # Both clients are in before the first message: the reader must
            # get every trade the simulator ever sends.
            assert isinstance(await slow.upgrade("/ws?topics=>"), AcceptConnection)
            reader = Reader(ws)
            nursery.start_soon(reader.run)
            await until(lambda: service.broadcast.statistics().clients == 2)
            await until(lambda: service.feed.statistics().connected)
            simulator.resume()

            await until(lambda: service.broadcast.statistics().slow_disconnects == 1)
            # Only now does the slow client look: the rest of what reached
            # its socket, then the close, with the code for "too slow".
            events = await slow.events(until=(CloseConnection,))
            close = events[-1]
            assert isinstance(close, CloseConnection)
            assert (close.code, close.reason) == (CLOSE_TOO_SLOW, "too slow: more than 2 s behind")
            await slow.stream.send_all(slow.ws.send(close.response()))
            assert await slow.events() == []  # the server closed TCP
            await until(lambda: service.broadcast.statistics().clients == 1)

            simulator.stall(math.inf)
            await until(lambda: settled(service, simulator, reader))
            reader_stats = client_on(service, ("trades.>",))
            broadcast = service.broadcast.statistics()
            sent = simulator.statistics().messages_sent
            bus = cast(engine.HubStatistics, service.bus.statistics())
            nursery.cancel_scope.cancel()
    assert broadcast.disconnected == {"too_slow": 1}
    # What the slow client never got (its queue overflowing, or still queued
    # when it was closed) is counted.
    assert broadcast.dropped > 0
    assert broadcast.offered == broadcast.sent + broadcast.dropped + broadcast.queued
    assert reader_stats.dropped == 0
    assert all(s.dropped == 0 for s in bus.subscriptions)
    # The feed's stream list is symbol-major, eight kinds each, trade first:
    # message i of the connection is a trade when i % 8 == 0.
    assert len(reader.messages) == (sent + 7) // 8
    ids = reader.trade_ids()
    assert sorted(ids) == sorted(SYMBOLS)
    assert all(consecutive(found) for found in ids.values())


# -- readiness --------------------------------------------------------------------


async def relay(port: int, client: trio.SocketStream) -> None:
    """Pass bytes both ways between ``client`` and 127.0.0.1:``port`` until either closes."""

    async def pipe(source: trio.abc.Stream, sink: trio.abc.Stream) -> None:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            async for chunk in source:
                await sink.send_all(chunk)
        nursery.cancel_scope.cancel()

    async with (
        client,
        await trio.open_tcp_stream("127.0.0.1", port) as upstream,
        trio.open_nursery() as nursery,
    ):
        nursery.start_soon(pipe, client, upstream)
        nursery.start_soon(pipe, upstream, client)


async def test_ready_is_503_until_the_feed_is_connected() -> None:
    config = SimulatorConfig(symbols=("BTCUSDT",), rate=100)
    async with httpx.AsyncClient(timeout=5) as http:
        with trio.fail_after(GUARD):
            # The exchange's port is bound but nothing accepts yet: the kernel
            # takes the feed's TCP connection, and its upgrade waits unanswered.
            [listener] = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[:1]
            port = listener.socket.getsockname()[1]
            async with (
                listener,
                open_simulator(config) as simulator,
                running(feed_url=f"ws://127.0.0.1:{port}", symbols=("BTCUSDT",)) as service,
                trio.open_nursery() as nursery,
            ):
                first = await http.get(f"{service.url}/ready")
                assert service.feed.statistics().connections == 0
                exchange_port = urlsplit(simulator.address.ws_url).port
                assert exchange_port is not None
                serve = functools.partial(relay, exchange_port)
                nursery.start_soon(trio.serve_listeners, serve, [listener])
                # Polled over HTTP, as a probe does: there is no event to wait on.
                while (ready := await http.get(f"{service.url}/ready")).status_code != 200:  # noqa: ASYNC110
                    await trio.sleep(0.01)
                stats = service.feed.statistics()
                nursery.cancel_scope.cancel()
    assert first.status_code == 503
    assert first.json()["reasons"] == ["child 'market/feed' is starting and not ready yet"]
    assert ready.json()["status"] == "ok"
    assert (stats.connected, stats.connections) == (True, 1)


# -- stopping ---------------------------------------------------------------------


async def test_a_stop_request_closes_clients_with_1001_and_the_service_returns() -> None:
    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery:
            service: MarketService = await nursery.start(
                serve_market, MarketConfig(port=0, ws_port=0, rate=1000)
            )
            async with ws_client(f"{service.ws_url}?topics=trades") as ws:
                await ws.get_message()  # data is flowing
                engine.current_shutdown().request("test: stop")
                closed = await read_until_closed(ws)
        # The nursery exited without a cancel from here: serve_market returned.
    assert closed.reason is not None
    assert (closed.reason.code, closed.reason.reason) == (
        CLOSE_GOING_AWAY,
        "server shutting down",
    )
    children = {c.name: c.state.value for c in service.supervisor.statistics().children}
    assert {"feed", "processors"} <= set(children)
    assert set(children.values()) == {"stopped"}


async def test_a_stop_under_load_publishes_everything_received_and_flushes_clients() -> None:
    """The feed stops reading, the processors drain its queue, the broadcast flushes."""
    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery:
            service: MarketService = await nursery.start(
                # 5,000 a second: a load this process keeps up with, client
                # included; at 20,000 the loop is saturated on a 2-CPU machine
                # and the client, in this process, falls more than max_lag behind.
                serve_market,
                MarketConfig(port=0, ws_port=0, rate=5_000, processors=1),
            )
            async with ws_client(f"{service.ws_url}?topics=trades") as ws:
                for _ in range(1000):  # a client that keeps up, under load
                    await ws.get_message()
                engine.current_shutdown().request("test: stop")
                got = 1000 + await count_until_closed(ws)
        # The nursery exited without a cancel from here: serve_market returned.
    feed = service.feed.statistics()
    assert feed.received > 4000
    assert service.feed.in_flight() == 0
    assert feed.received == feed.published + feed.malformed  # the queue blocks: no drops
    stats = service.broadcast.statistics()
    assert (stats.dropped, stats.queued) == (0, 0), stats.dropped_by_reason
    assert stats.sent == got
    states = {c.name: c.state.value for c in service.supervisor.statistics().children}
    assert set(states.values()) == {"stopped"}


async def count_until_closed(ws: WebSocketConnection) -> int:
    """How many messages arrive until the connection closes with 1001."""
    count = 0
    ended: list[ConnectionClosed] = []
    while not ended:
        try:
            await ws.get_message()
        except ConnectionClosed as closed:
            ended.append(closed)
        else:
            count += 1
    assert ended[0].reason is not None
    assert ended[0].reason.code == CLOSE_GOING_AWAY
    return count


@pytest.mark.subprocess
def test_sigterm_with_a_client_connected_closes_it_with_1001_and_exits_0() -> None:
    async def client(process: subprocess.Popen[str], ws_url: str) -> ConnectionClosed:
        with trio.fail_after(GUARD):
            async with ws_client(f"{ws_url}?topics=trades") as ws:
                await ws.get_message()  # in flight: trades are streaming to it
                process.send_signal(signal.SIGTERM)
                return await read_until_closed(ws)

    flags = ("--rate", "2000", "--grace-period", "5")
    with service_process(*flags) as (process, _, ws_url):
        closed = trio.run(client, process, ws_url)
        assert closed.reason is not None
        assert (closed.reason.code, closed.reason.reason) == (1001, "server shutting down")
        # 0, not 128 + SIGTERM: it finished before the 5 s grace period ran out.
        _, stderr = process.communicate(timeout=GUARD)
        assert process.returncode == 0, stderr
    # Its last word is the feed's account: everything received was published.
    [line] = [line for line in stderr.splitlines() if "market stopped: " in line]
    counts = json.loads(line.split("market stopped: ", 1)[1])
    assert counts["received"] > 0
    assert counts["received"] == counts["published"] + counts["malformed"]
    assert (counts["dropped"], counts["left_in_queue"]) == (0, 0)
