"""The exchange simulator: Binance shapes, determinism, pacing, REST, and each fault.

Socket tests run a real simulator on 127.0.0.1 port 0 inside the test's own
trio run, with trio-websocket and httpx as clients, under an absolute
``trio.fail_after`` guard. Pacing logic is tested on its own under the
autojump clock, exactly.
"""

from __future__ import annotations

import itertools
import json
import math
import re
import signal
import subprocess
import sys
import urllib.request
from collections import deque
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, cast

import httpx
import pytest
import trio
import trio.testing
from trio_websocket import WebSocketConnection, open_websocket_url
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    CloseConnection,
    Event,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)

from services.market.simulator import (
    Simulator,
    SimulatorAddress,
    SimulatorConfig,
    SimulatorStatistics,
    open_simulator,
)
from services.market.simulator import __main__ as command
from services.market.simulator._instruments import instruments
from services.market.simulator._pacing import Pacer
from services.market.simulator._session import Session
from services.market.simulator._state import Counters, SharedState
from services.market.simulator._streams import parse_streams
from services.market.simulator._tape import Tape

EPOCH = 1_700_000_000_000  # a whole second (and a whole minute: 28,333,333 min + 20 s)
ALL_STREAMS = [
    "btcusdt@trade",
    "ethusdt@aggTrade",
    "bnbusdt@bookTicker",
    "solusdt@depth@100ms",
    "xrpusdt@kline_1m",
]
GUARD = 5  # seconds of real time any socket test may take
DECIMAL = re.compile(r"\d+\.\d{8}")
TICKER_FIELDS = {
    "symbol",
    "priceChange",
    "priceChangePercent",
    "weightedAvgPrice",
    "prevClosePrice",
    "lastPrice",
    "lastQty",
    "bidPrice",
    "bidQty",
    "askPrice",
    "askQty",
    "openPrice",
    "highPrice",
    "lowPrice",
    "volume",
    "quoteVolume",
    "openTime",
    "closeTime",
    "firstId",
    "lastId",
    "count",
}


@asynccontextmanager
async def _simulator(**settings: Any) -> AsyncIterator[Simulator]:
    settings.setdefault("epoch_ms", EPOCH)
    async with open_simulator(SimulatorConfig(**settings)) as simulator:
        yield simulator


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    # Built before any server starts: constructing a client blocks ~100 ms.
    async with httpx.AsyncClient() as client:
        yield client


async def _receive(ws: WebSocketConnection, count: int) -> list[str]:
    return [str(await ws.get_message()) for _ in range(count)]


def _trades(sim: Simulator) -> AbstractAsyncContextManager[WebSocketConnection]:
    return open_websocket_url(sim.address.raw_url("btcusdt@trade"))


async def _first_messages(url: str, count: int) -> list[str]:
    async with open_websocket_url(url) as ws:
        return await _receive(ws, count)


async def _reply_to(ws: WebSocketConnection, request: dict[str, Any]) -> dict[str, Any]:
    """Send a request; skip stream data until the answer (it has an "id" or "error")."""
    await ws.send_message(json.dumps(request))
    while True:
        message = json.loads(await ws.get_message())
        if "id" in message or "error" in message:
            return dict(message)


class _RawClient:
    """A WebSocket client on wsproto whose socket the test owns.

    trio-websocket 0.12 never closes its socket when the server ends the
    connection (a drop, a close frame), which ``filterwarnings = error``
    turns into a failure of whichever test runs the garbage collector next.
    Tests of server-initiated endings use this client instead.
    """

    def __init__(self, stream: trio.SocketStream, ws: WSConnection) -> None:
        self.stream, self.ws = stream, ws
        self.pending: deque[Event] = deque()

    async def next_event(self) -> Event | None:
        """The next event, or ``None`` once the server closed the socket."""
        while not self.pending:
            data = await self.stream.receive_some()
            if not data:
                return None
            self.ws.receive_data(data)
            self.pending.extend(self.ws.events())
        return self.pending.popleft()

    async def texts(self) -> list[str]:
        """Every text message until the connection ends."""
        texts = []
        while (event := await self.next_event()) is not None:
            if isinstance(event, TextMessage):
                texts.append(event.data)
        return texts


@asynccontextmanager
async def _raw_client(sim: Simulator, target: str) -> AsyncIterator[_RawClient]:
    host, port = _host_port(sim)
    stream = await trio.open_tcp_stream(host, port)
    async with stream:
        ws = WSConnection(ConnectionType.CLIENT)
        await stream.send_all(ws.send(Request(host=host, target=target)))
        yield _RawClient(stream, ws)


def _host_port(sim: Simulator) -> tuple[str, int]:
    host, port = sim.address.rest_url.removeprefix("http://").rsplit(":", 1)
    return host, int(port)


# --- Message shapes ---------------------------------------------------------

_TRADE = {
    "e": str,
    "E": int,
    "s": str,
    "t": int,
    "p": str,
    "q": str,
    "T": int,
    "m": bool,
    "M": bool,
}
_AGG_TRADE = {**_TRADE, "a": int, "f": int, "l": int}
del _AGG_TRADE["t"]
_BOOK_TICKER = {"u": int, "s": str, "b": str, "B": str, "a": str, "A": str}
_DEPTH = {"e": str, "E": int, "s": str, "U": int, "u": int, "b": list, "a": list}
_KLINE = {"e": str, "E": int, "s": str, "k": dict}
_CANDLE = {
    **dict.fromkeys("tTfLn", int),
    **dict.fromkeys("siochlvqVQB", str),
    "x": bool,
}


def _check_shape(data: dict[str, Any], shape: dict[str, type], decimals: str = "") -> None:
    assert set(data) == set(shape)
    for key, kind in shape.items():
        assert type(data[key]) is kind, (key, data[key])  # bool is not an int here
    for key in decimals:
        assert DECIMAL.fullmatch(data[key]), (key, data[key])


def _check_message(kind: str, data: dict[str, Any]) -> None:
    if kind == "trade":
        _check_shape(data, _TRADE, "pq")
    elif kind == "aggTrade":
        _check_shape(data, _AGG_TRADE, "pq")
        assert data["f"] <= data["l"]
    elif kind == "bookTicker":
        _check_shape(data, _BOOK_TICKER, "bBaA")
        assert float(data["b"]) < float(data["a"])
    elif kind.startswith("depth"):
        _check_shape(data, _DEPTH)
        assert data["e"] == "depthUpdate"
        assert data["U"] <= data["u"]
        for price, qty in data["b"] + data["a"]:
            assert DECIMAL.fullmatch(price)
            assert DECIMAL.fullmatch(qty)
        assert max(float(p) for p, _ in data["b"]) < min(float(p) for p, _ in data["a"])
    else:
        _check_shape(data, _KLINE)
        _check_shape(data["k"], _CANDLE, "ochlvqVQ")
        assert data["k"]["B"] == "0"
        assert data["k"]["i"] == "1m"
        assert data["k"]["T"] == data["k"]["t"] + 59_999
    if kind != "bookTicker" and not kind.startswith("depth"):
        assert data["e"] == kind.partition("_")[0]
    assert data["s"] in {"BTCUSDT", "ETHUSDT", "BNBUSDT", "SOLUSDT", "XRPUSDT"}


async def test_combined_stream_wraps_every_type_in_binance_shapes() -> None:
    with trio.fail_after(GUARD):
        async with _simulator(rate=5000) as sim:
            texts = await _first_messages(sim.address.combined_url(ALL_STREAMS), 10)
    messages = [json.loads(text) for text in texts]
    assert [m["stream"] for m in messages] == ALL_STREAMS * 2  # round robin
    for message in messages:
        assert set(message) == {"stream", "data"}
        symbol, _, kind = message["stream"].partition("@")
        _check_message(kind, message["data"])
        assert message["data"]["s"] == symbol.upper()


async def test_raw_streams_send_bare_messages() -> None:
    with trio.fail_after(GUARD):
        async with _simulator(rate=5000) as sim:
            one = await _first_messages(sim.address.raw_url("btcusdt@trade"), 3)
            two = await _first_messages(sim.address.raw_url("ethusdt@aggTrade/xrpusdt@kline_1m"), 2)
    trades = [json.loads(text) for text in one]
    for trade in trades:
        _check_message("trade", trade)
    assert [t["t"] for t in trades] == [trades[0]["t"] + i for i in range(3)]
    assert [json.loads(text)["e"] for text in two] == ["aggTrade", "kline"]


async def test_subscribe_unsubscribe_and_list_on_a_bare_connection() -> None:
    with trio.fail_after(GUARD):
        async with (
            _simulator(rate=2000) as sim,
            open_websocket_url(f"{sim.address.ws_url}/ws") as ws,
        ):
            reply = await _reply_to(
                ws, {"method": "SUBSCRIBE", "params": ["btcusdt@trade"], "id": 1}
            )
            assert reply == {"result": None, "id": 1}
            assert json.loads(await ws.get_message())["e"] == "trade"
            params = ["ethusdt@bookTicker"]
            await _reply_to(ws, {"method": "SUBSCRIBE", "params": params, "id": 2})
            listed = await _reply_to(ws, {"method": "LIST_SUBSCRIPTIONS", "id": 3})
            assert listed == {"result": ["btcusdt@trade", "ethusdt@bookTicker"], "id": 3}
            await _reply_to(ws, {"method": "UNSUBSCRIBE", "params": ["btcusdt@trade"], "id": 4})
            listed = await _reply_to(ws, {"method": "LIST_SUBSCRIPTIONS", "id": 5})
            assert listed["result"] == ["ethusdt@bookTicker"]
            bad = await _reply_to(ws, {"method": "SUBSCRIBE", "params": ["nope@trade"], "id": 6})
            assert bad["id"] == 6
            assert bad["error"]["code"] == 2
            assert "nope@trade" in bad["error"]["msg"]
            broken = await _reply_to(
                ws, {"method": "SUBSCRIBE", "params": "btcusdt@trade", "id": 7}
            )
            assert broken["error"]["code"] == 2


async def test_pings_are_answered() -> None:
    with trio.fail_after(GUARD):
        async with _simulator(rate=10) as sim, _trades(sim) as ws:
            await ws.ping(b"are you there")  # returns once the pong arrives


# --- Rejections --------------------------------------------------------------


@pytest.mark.parametrize(
    "stream", ["nope@trade", "btcusdt@trades", "BTCUSDT@trade", "btcusdt@kline_7m", "btcusdt"]
)
async def test_an_unknown_stream_is_closed_with_a_reason(stream: str) -> None:
    with trio.fail_after(GUARD):
        async with _simulator() as sim:
            target = f"/stream?streams=btcusdt@trade/{stream}"
            async with _raw_client(sim, target) as client:
                assert isinstance(await client.next_event(), AcceptConnection)
                close = await client.next_event()
                assert isinstance(close, CloseConnection)
                await client.stream.send_all(client.ws.send(close.response()))
                assert await client.next_event() is None  # then the server closes the socket
            assert sim.statistics().streams_rejected == 1
            assert sim.statistics().connections_total == 0
    assert close.code == 1008
    assert close.reason is not None
    assert stream in close.reason


async def test_an_unknown_path_is_rejected_with_404() -> None:
    with trio.fail_after(GUARD):
        async with _simulator() as sim, _raw_client(sim, "/socket") as client:
            rejection = await client.next_event()
            body = await client.next_event()
    assert isinstance(rejection, RejectConnection)
    assert rejection.status_code == 404
    assert isinstance(body, RejectData)
    assert json.loads(body.data)["code"] == -1


async def test_a_broken_handshake_gets_400_and_requests_keep_the_connection_alive() -> None:
    ping = b"GET /api/v3/ping HTTP/1.1\r\nhost: x\r\n\r\n"
    upgrade = b"GET /ws HTTP/1.1\r\nhost: x\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\n"
    with trio.fail_after(GUARD):
        async with _simulator() as sim:
            stream = await trio.open_tcp_stream(*_host_port(sim))
            async with stream:
                await stream.send_all(ping + ping + upgrade)  # pipelined on one connection
                answer = await _read_all(stream)
    assert answer.count(b"HTTP/1.1 200 ") == 2
    assert answer.count(b"HTTP/1.1 400 ") == 1


async def _read_all(stream: trio.SocketStream) -> bytes:
    chunks = []
    while chunk := await stream.receive_some():
        chunks.append(chunk)
    return b"".join(chunks)


# --- Determinism ----------------------------------------------------------


def _tape(seed: int, streams: list[str], *, rate: float = 1000.0) -> Tape:
    specs = parse_streams(streams, instruments(SimulatorConfig().symbols, seed))
    return Tape(seed, specs, combined=True, epoch_ms=EPOCH, rate=rate)


def test_the_sequence_does_not_depend_on_burst_sizes() -> None:
    whole = _tape(3, ALL_STREAMS).texts(200)
    pieces = _tape(3, ALL_STREAMS)
    assert pieces.texts(1) + pieces.texts(57) + pieces.texts(142) == whole
    assert _tape(4, ALL_STREAMS).texts(200) != whole


def test_ids_chain_across_the_streams_of_a_symbol() -> None:
    streams = ["btcusdt@trade", "btcusdt@aggTrade", "btcusdt@depth", "btcusdt@kline_1m"]
    messages = [json.loads(t)["data"] for t in _tape(1, streams).texts(200)]
    trades, aggs, depths, klines = (messages[i::4] for i in range(4))
    first = trades[0]["t"]
    assert [t["t"] for t in trades] == list(range(first, first + 50))  # no gaps
    # Each aggTrade covers exactly the trades since the previous one.
    assert [(a["f"], a["l"]) for a in aggs] == [(t["t"], t["t"]) for t in trades]
    assert [a["a"] - aggs[0]["a"] for a in aggs] == list(range(50))
    for before, after in itertools.pairwise(depths):
        assert after["U"] == before["u"] + 1
    # The candle counts the same trades, without making its own.
    assert [k["k"]["L"] for k in klines] == [t["t"] for t in trades]
    assert {k["k"]["f"] for k in klines} == {first}
    assert klines[-1]["k"]["n"] == 50


def test_a_lone_stream_makes_its_own_trades() -> None:
    aggs = [json.loads(t)["data"] for t in _tape(2, ["ethusdt@aggTrade"]).texts(3)]
    assert [(a["f"], a["l"]) for a in aggs] == [(a["f"], a["f"]) for a in aggs]
    assert [a["f"] - aggs[0]["f"] for a in aggs] == [0, 1, 2]


def test_trade_ids_stay_consecutive_across_kline_rollovers() -> None:
    # trade + kline_1s at 1,000 messages/s: a rollover every 500 trades.
    messages = [
        json.loads(t)["data"] for t in _tape(1, ["btcusdt@trade", "btcusdt@kline_1s"]).texts(4_000)
    ]
    trades, klines = messages[0::2], [m["k"] for m in messages[1::2]]
    ids = [t["t"] for t in trades]
    assert ids == list(range(ids[0], ids[0] + len(ids)))
    assert sum(1 for k in klines if k["x"]) == 3
    reported = set(ids)
    assert all(k["f"] in reported and k["L"] in reported for k in klines)


def test_a_kline_closes_when_its_interval_rolls_over() -> None:
    # 1,000 messages per second of simulated clock: message 1000 opens second 2.
    klines = [json.loads(t)["data"]["k"] for t in _tape(1, ["btcusdt@kline_1s"]).texts(1002)]
    assert [k["n"] for k in klines[:3]] == [1, 2, 3]
    assert not klines[999]["x"]
    closed, reopened = klines[1000], klines[1001]
    assert closed["x"]
    assert closed["n"] == 1000
    assert closed["t"] == EPOCH
    assert not reopened["x"]
    assert reopened["n"] == 2
    assert reopened["t"] == EPOCH + 1000
    assert closed["L"] - closed["f"] == 999
    assert reopened["f"] == closed["L"] + 1


async def test_a_later_connection_continues_the_trade_ids() -> None:
    with trio.fail_after(GUARD):
        async with _simulator(seed=7, rate=20_000) as sim:
            url = sim.address.raw_url("btcusdt@trade")
            first = [json.loads(t)["t"] for t in await _first_messages(url, 10)]
            sent = sim.statistics().messages_sent
            second = [json.loads(t)["t"] for t in await _first_messages(url, 10)]
    # Ids move on as an exchange's would while a client is away: a reconnecting
    # client sees a jump past everything sent before it came back.
    assert first == list(range(first[0], first[0] + 10))
    assert second == list(range(first[0] + sent, first[0] + sent + 10))
    assert sent >= 10


async def test_same_seed_same_messages_different_seed_different() -> None:
    url_streams = ALL_STREAMS
    with trio.fail_after(GUARD):
        async with _simulator(seed=7, rate=20_000) as sim:
            first = await _first_messages(sim.address.combined_url(url_streams), 50)
        async with _simulator(seed=7, rate=20_000) as sim:
            again = await _first_messages(sim.address.combined_url(url_streams), 50)
        async with _simulator(seed=8, rate=20_000) as other:
            different = await _first_messages(other.address.combined_url(url_streams), 50)
    assert first == again
    assert first != different
    assert [json.loads(t)["stream"] for t in different] == [json.loads(t)["stream"] for t in first]


# --- Pacing ----------------------------------------------------------------


async def test_pacer_releases_rate_messages_per_second_exactly(autojump_clock: object) -> None:
    pacer = Pacer(1000.0, max_burst=512)
    pacer.restart()
    start, sent, bursts = trio.current_time(), 0, 0
    while sent < 1000:
        count = await pacer.next_burst()
        pacer.sent(count)
        sent, bursts = sent + count, bursts + 1
    assert sent == 1000
    assert bursts == 1000
    assert trio.current_time() - start == pytest.approx(1.0, abs=1e-9)


async def test_pacer_bursts_at_least_a_millisecond_of_messages(autojump_clock: object) -> None:
    pacer = Pacer(100_000.0, max_burst=512)
    pacer.restart()
    start = trio.current_time()
    counts: list[int] = []
    while sum(counts) < 100_000:
        counts.append(await pacer.next_burst())
        pacer.sent(counts[-1])
    assert set(counts) == {100}
    assert len(counts) == 1000
    assert trio.current_time() - start == pytest.approx(1.0, abs=1e-9)


async def test_pacer_catches_up_a_short_lag_and_skips_a_long_one(autojump_clock: object) -> None:
    pacer = Pacer(1000.0, max_burst=100)
    pacer.restart()
    await trio.sleep(0.2)  # a slow write: 200 messages are due
    assert [await pacer.next_burst() for _ in range(1)] == [100]
    pacer.sent(100)
    assert await pacer.next_burst() == 100
    pacer.sent(100)
    assert pacer.skipped == 0
    await trio.sleep(1.0)  # 1,000 more are due: only the last 250 ms are kept
    assert await pacer.next_burst() == 100
    assert pacer.skipped == 750


async def test_pacer_without_limit_only_checkpoints(autojump_clock: object) -> None:
    pacer = Pacer(math.inf, max_burst=64)
    pacer.restart()
    start = trio.current_time()
    assert [await pacer.next_burst() for _ in range(3)] == [64, 64, 64]
    assert trio.current_time() == start


async def test_the_rate_is_respected_on_a_real_socket() -> None:
    with trio.fail_after(GUARD):
        async with _simulator(rate=2000) as sim, _trades(sim) as ws:
            await ws.get_message()
            start, count = trio.current_time(), 0
            while trio.current_time() - start < 0.5:
                await ws.get_message()
                count += 1
    assert 700 <= count <= 1300  # 1,000 expected; the machine is noisy


# --- Faults ----------------------------------------------------------------


async def test_drop_connections_cuts_every_client() -> None:
    target = "/ws/btcusdt@trade"
    with trio.fail_after(GUARD):
        async with _simulator(rate=1000) as sim:
            async with _raw_client(sim, target) as one, _raw_client(sim, target) as two:
                for client in (one, two):
                    assert isinstance(await client.next_event(), AcceptConnection)
                    assert isinstance(await client.next_event(), TextMessage)
                assert sim.drop_connections() == 2
                for client in (one, two):
                    # What was in flight arrives, then the socket ends: no close frame.
                    assert all(_parses(text) for text in await client.texts())
            # The simulator itself goes on serving.
            assert len(await _first_messages(sim.address.raw_url("btcusdt@trade"), 2)) == 2
            stats = sim.statistics()
    assert stats.connections_dropped == 2
    assert stats.connections_total == 3


async def test_send_malformed_breaks_exactly_one_frame() -> None:
    with trio.fail_after(GUARD):
        async with _simulator(rate=1000) as sim:
            async with open_websocket_url(sim.address.combined_url(ALL_STREAMS)) as ws:
                await ws.get_message()
                await trio.testing.wait_all_tasks_blocked()
                assert sim.send_malformed() == 1
                texts = await _receive(ws, 30)
            stats = sim.statistics()
    broken = [text for text in texts if not _parses(text)]
    assert len(broken) == 1
    assert stats.malformed_sent == 1
    index = texts.index(broken[0])
    assert texts[index + 1].startswith(broken[0])  # a truncated copy of the next message


def _parses(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


async def test_stall_holds_messages_then_resumes() -> None:
    with trio.fail_after(GUARD):
        async with _simulator(rate=2000) as sim, _trades(sim) as ws:
            await ws.get_message()
            sim.stall(0.3)
            stalled_at = trio.current_time()
            assert sim.statistics().stalled
            arrivals: list[float] = []
            while not arrivals or arrivals[-1] - stalled_at < 0.4:
                await ws.get_message()  # on the same connection: it stayed open
                arrivals.append(trio.current_time())
    gaps = [b - a for a, b in zip([stalled_at, *arrivals], arrivals, strict=False)]
    assert max(gaps) >= 0.25  # nothing for the stall (less what was in flight)
    assert len(arrivals) > 20  # and a steady flow after it, not a catch-up burst only
    assert len(arrivals) < 500


async def test_resume_ends_an_endless_stall() -> None:
    with trio.fail_after(GUARD):
        async with _simulator(rate=2000) as sim:
            sim.stall(math.inf)
            async with open_websocket_url(sim.address.raw_url("btcusdt@trade")) as ws:
                with trio.move_on_after(0.1) as waited:
                    await ws.get_message()
                assert waited.cancelled_caught
                sim.resume()
                assert json.loads(await ws.get_message())["e"] == "trade"
                assert not sim.statistics().stalled


@pytest.mark.parametrize("seconds", [0, -1, math.nan, "1"])
async def test_stall_rejects_a_bad_duration(seconds: Any) -> None:
    with trio.fail_after(GUARD):
        async with _simulator() as sim:
            with pytest.raises((TypeError, ValueError), match="seconds"):
                sim.stall(seconds)


async def test_statistics_count_connections_and_messages() -> None:
    with trio.fail_after(GUARD):
        async with _simulator(rate=5000) as sim:
            assert sim.statistics() == SimulatorStatistics(connections_open=0, stalled=False)
            async with open_websocket_url(sim.address.raw_url("btcusdt@trade")) as ws:
                texts = await _receive(ws, 20)
                during = sim.statistics()
            await trio.testing.wait_all_tasks_blocked()
            after = sim.statistics()
    assert during.connections_open == 1
    assert during.connections_total == 1
    assert after.connections_open == 0
    assert after.messages_sent >= 20
    assert after.bytes_sent >= sum(len(text) for text in texts)


# --- REST --------------------------------------------------------------------


async def test_klines_have_binance_shape_and_window(http: httpx.AsyncClient) -> None:
    with trio.fail_after(GUARD):
        async with _simulator() as sim:
            url = f"{sim.address.rest_url}/api/v3/klines"
            latest = await http.get(url, params={"symbol": "BTCUSDT", "interval": "1m"})
            window = await http.get(
                url,
                params={"symbol": "ETHUSDT", "interval": "1h", "startTime": EPOCH - 10 * 3_600_000},
            )
            capped = await http.get(
                url, params={"symbol": "ETHUSDT", "interval": "1h", "endTime": EPOCH, "limit": 3}
            )
            ancient = await http.get(
                url, params={"symbol": "ETHUSDT", "interval": "1h", "startTime": 0, "limit": 2}
            )
    assert latest.status_code == 200
    rows = latest.json()
    assert len(rows) == 500  # Binance's default limit
    assert [len(row) for row in rows] == [12] * 500
    last = rows[-1]
    assert last[0] == EPOCH - EPOCH % 60_000
    assert last[6] == last[0] + 59_999
    assert [type(value) for value in last] == [int, *[str] * 5, int, str, int, str, str, str]
    assert all(rows[i + 1][1] == rows[i][4] for i in range(499))  # each opens at the last close
    assert all(float(r[3]) <= min(float(r[1]), float(r[4])) for r in rows)
    assert all(float(r[2]) >= max(float(r[1]), float(r[4])) for r in rows)
    hours = window.json()
    assert hours[0][0] == EPOCH - 10 * 3_600_000 - EPOCH % 3_600_000 + 3_600_000
    assert len(hours) == 10  # up to the candle open now, no further
    assert [row[0] for row in capped.json()] == [row[0] for row in hours[-3:]]
    # History starts 2**17 candles before the anchor, as if the symbol was listed then.
    assert ancient.json()[0][0] == (EPOCH // 3_600_000 - 2**17) * 3_600_000


async def test_ticker_24hr_has_binance_shape_and_matches_klines_and_streams(
    http: httpx.AsyncClient,
) -> None:
    with trio.fail_after(GUARD):
        async with _simulator() as sim:
            base = f"{sim.address.rest_url}/api/v3"
            one = (await http.get(f"{base}/ticker/24hr", params={"symbol": "BTCUSDT"})).json()
            every = (await http.get(f"{base}/ticker/24hr")).json()
            some = await http.get(
                f"{base}/ticker/24hr", params={"symbols": '["ETHUSDT","BTCUSDT"]'}
            )
            klines = await http.get(
                f"{base}/klines", params={"symbol": "BTCUSDT", "interval": "1m"}
            )
            trade = json.loads((await _first_messages(sim.address.raw_url("btcusdt@trade"), 1))[0])
    assert set(one) == TICKER_FIELDS
    assert one["closeTime"] == EPOCH
    assert one["openTime"] == EPOCH - 86_400_000
    assert one["lastId"] - one["firstId"] + 1 == one["count"]
    assert one["lastPrice"] == klines.json()[-1][4]
    assert float(one["lowPrice"]) <= float(one["lastPrice"]) <= float(one["highPrice"])
    # The stream starts where the history ends: the next trade id and nearly the last price.
    assert trade["t"] == one["lastId"] + 1
    assert float(trade["p"]) == pytest.approx(float(one["lastPrice"]), rel=1e-3)
    assert [t["symbol"] for t in every] == ["BTCUSDT", "ETHUSDT", "BNBUSDT", "SOLUSDT", "XRPUSDT"]
    assert every[0] == one
    assert [t["symbol"] for t in some.json()] == ["ETHUSDT", "BTCUSDT"]


async def test_rest_answers_repeat_exactly_for_a_seed(http: httpx.AsyncClient) -> None:
    params: dict[str, str | int] = {"symbol": "SOLUSDT", "interval": "5m", "limit": 50}
    bodies = []
    with trio.fail_after(GUARD):
        for seed in (5, 5, 6):
            async with _simulator(seed=seed) as sim:
                reply = await http.get(f"{sim.address.rest_url}/api/v3/klines", params=params)
                bodies.append(reply.content)
    assert bodies[0] == bodies[1]
    assert bodies[0] != bodies[2]


@pytest.mark.parametrize(
    ("path", "params", "status", "code"),
    [
        ("/api/v3/ticker/24hr", {"symbol": "NOPEUSDT"}, 400, -1121),
        ("/api/v3/ticker/24hr", {"symbols": "BTCUSDT"}, 400, -1102),
        ("/api/v3/klines", {"symbol": "BTCUSDT"}, 400, -1102),
        ("/api/v3/klines", {"interval": "1m"}, 400, -1102),
        ("/api/v3/klines", {"symbol": "btcusdt", "interval": "1m"}, 400, -1121),
        ("/api/v3/klines", {"symbol": "BTCUSDT", "interval": "7m"}, 400, -1120),
        ("/api/v3/klines", {"symbol": "BTCUSDT", "interval": "1m", "limit": "0"}, 400, -1130),
        ("/api/v3/klines", {"symbol": "BTCUSDT", "interval": "1m", "limit": "x"}, 400, -1100),
        ("/api/v3/order", {}, 404, -1),
    ],
)
async def test_rest_errors_answer_like_binance(
    http: httpx.AsyncClient, path: str, params: dict[str, str], status: int, code: int
) -> None:
    with trio.fail_after(GUARD):
        async with _simulator() as sim:
            reply = await http.get(f"{sim.address.rest_url}{path}", params=params)
    assert reply.status_code == status
    assert reply.json()["code"] == code
    assert isinstance(reply.json()["msg"], str)


async def test_basic_endpoints(http: httpx.AsyncClient) -> None:
    with trio.fail_after(GUARD):
        async with _simulator(symbols=["BTCUSDT", "PEPEFDUSD"]) as sim:
            base = f"{sim.address.rest_url}/api/v3"
            ping = await http.get(f"{base}/ping")
            now = await http.get(f"{base}/time")
            info = await http.get(f"{base}/exchangeInfo")
            post = await http.post(f"{base}/ping")
    assert ping.json() == {}
    assert now.json() == {"serverTime": EPOCH}
    assert [(s["baseAsset"], s["quoteAsset"]) for s in info.json()["symbols"]] == [
        ("BTC", "USDT"),
        ("PEPE", "FDUSD"),
    ]
    assert post.status_code == 405


# --- Configuration and the command line ---------------------------------------


@pytest.mark.parametrize(
    ("settings", "error", "named"),
    [
        ({"rate": 0}, ValueError, "rate"),
        ({"rate": math.nan}, ValueError, "rate"),
        ({"rate": "fast"}, TypeError, "rate"),
        ({"symbols": []}, ValueError, "symbols"),
        ({"symbols": "BTCUSDT"}, TypeError, "symbols"),
        ({"symbols": ["btcusdt"]}, ValueError, "symbols"),
        ({"symbols": ["BTCUSDT", "BTCUSDT"]}, ValueError, "symbols"),
        ({"seed": -1}, ValueError, "seed"),
        ({"port": 70_000}, ValueError, "port"),
        ({"host": ""}, ValueError, "host"),
        ({"epoch_ms": -5}, ValueError, "epoch_ms"),
    ],
)
def test_config_rejects_bad_settings(
    settings: dict[str, Any], error: type[Exception], named: str
) -> None:
    with pytest.raises(error, match=named):
        SimulatorConfig(**settings)


def test_config_defaults() -> None:
    config = SimulatorConfig()
    assert config.symbols == ("BTCUSDT", "ETHUSDT", "BNBUSDT", "SOLUSDT", "XRPUSDT")
    assert (config.rate, config.seed, config.host, config.port) == (1000.0, 0, "127.0.0.1", 0)
    assert SimulatorConfig(rate=math.inf, symbols=["AAA1"]).symbols == ("AAA1",)


def test_the_command_lines_settings_are_the_configs_fields_with_its_defaults() -> None:
    parse = command._parser().parse_args
    assert SimulatorConfig(**vars(parse([]))) == SimulatorConfig(port=9443)
    args = parse(["--symbols", "ETHUSDT, BTCUSDT,", "--rate", "inf", "--epoch-ms", "5"])
    assert SimulatorConfig(**vars(args)) == SimulatorConfig(
        symbols=("ETHUSDT", "BTCUSDT"), rate=math.inf, port=9443, epoch_ms=5
    )


def test_the_command_line_refuses_a_bad_setting_by_name(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        command.main(["--rate", "0"])
    assert exited.value.code == 2
    assert "error: rate must be > 0" in capsys.readouterr().err


@pytest.mark.subprocess
def test_the_command_line_serves_until_sigterm() -> None:
    command = [sys.executable, "-m", "services.market.simulator", "--port", "0", "--seed", "3"]
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ) as child:
        try:
            assert child.stdout is not None
            streams = child.stdout.readline().split()
            rest = child.stdout.readline().split()
            with urllib.request.urlopen(f"{rest[1]}/api/v3/exchangeInfo", timeout=5) as reply:
                listed = [s["symbol"] for s in json.load(reply)["symbols"]]
            child.send_signal(signal.SIGTERM)
            out, err = child.communicate(timeout=10)
        finally:
            child.kill()
    assert streams[0] == "streams:"
    assert streams[1].startswith("ws://127.0.0.1:")
    assert listed == ["BTCUSDT", "ETHUSDT", "BNBUSDT", "SOLUSDT", "XRPUSDT"]
    assert out == "stopped: received SIGTERM\n", err
    assert child.returncode == 0


# -- the counters a client can rely on ------------------------------------------
#
# messages_sent is never behind what a client can have read, and a stall holds
# even a burst that fell due before it: tests that wait for "everything sent
# has arrived" depend on both (the market end-to-end reconnect test once
# counted one trade more than the feed when they did not hold).


class _Wire:
    """A socket as a simulator session sees it: a write is taken whole, then a checkpoint.

    (As trio's ``send_all`` ends.) At each write it notes how many of the
    bytes a client could read by then the simulator had not counted.
    """

    def __init__(self, counters: Counters) -> None:
        self.counters = counters
        self.written = 0
        self.uncounted: list[int] = []

    async def send_all(self, data: bytes) -> None:
        self.written += len(data)
        self.uncounted.append(self.written - self.counters.bytes_sent)
        await trio.lowlevel.checkpoint()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        await trio.sleep_forever()


class _Beats:
    """A pacer the test drives: each burst is due when the test says so."""

    skipped = 0

    def __init__(self) -> None:
        self._send, self._receive = trio.open_memory_channel[int](math.inf)

    def due(self, count: int) -> None:
        self._send.send_nowait(count)

    def restart(self) -> None:
        pass

    def sent(self, count: int) -> None:
        pass

    async def next_burst(self) -> int:
        return await self._receive.receive()


async def test_the_simulator_counts_a_burst_before_it_is_sent_and_a_stall_holds_a_due_one() -> None:
    config = SimulatorConfig(symbols=("BTCUSDT",), epoch_ms=EPOCH)
    state = SharedState.create(config, instruments(config.symbols, config.seed))
    simulator = Simulator(config, SimulatorAddress("ws://-", "http://-"), state=state)
    specs = parse_streams(["btcusdt@trade"], state.instruments)
    tape = Tape(config.seed, specs, combined=False, epoch_ms=EPOCH, rate=config.rate)
    wire, beats = _Wire(state.counters), _Beats()
    ws = WSConnection(ConnectionType.SERVER)
    session = Session(state, cast(trio.SocketStream, wire), ws, tape, cast(Pacer, beats))
    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(session.run)
            beats.due(2)
            await trio.testing.wait_all_tasks_blocked()
            first = simulator.statistics().messages_sent
            # A burst falls due while the socket is busy (answering a ping, say),
            # and the exchange stalls before the writer gets it.
            async with session.lock:
                beats.due(3)
                await trio.testing.wait_all_tasks_blocked()
                simulator.stall(math.inf)
            await trio.testing.wait_all_tasks_blocked()
            stalled = simulator.statistics().messages_sent, len(wire.uncounted)
            simulator.resume()
            beats.due(3)
            await trio.testing.wait_all_tasks_blocked()
            resumed = simulator.statistics().messages_sent
            nursery.cancel_scope.cancel()
    assert first == 2
    assert stalled == (2, 1)  # nothing went out once stall() had returned
    assert resumed == 5
    assert wire.uncounted == [0, 0]  # a client never has bytes the counters lack
