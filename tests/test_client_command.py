"""``python -m services.market client``: a running service's stream, one message a line.

In-process tests run the service on 127.0.0.1 port 0 and the command's
reading loop against it; one test runs both as a user does, in processes.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import pytest
import trio

import engine
from services.market import _client_command as client
from tests.test_market_e2e import running, until
from tests.test_market_service import service_process

GUARD = 20  # seconds: an absolute bound on every test
COMMAND = [sys.executable, "-m", "services.market", "client"]


def _lines(capsys: pytest.CaptureFixture[str]) -> list[dict[str, object]]:
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


async def test_it_prints_count_messages_of_its_topic_one_a_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with trio.fail_after(GUARD):
        async with running(symbols=("BTCUSDT", "ETHUSDT"), rate=2000) as service:
            url = client.stream_url(service.ws_url, "trades", ("ETHUSDT",), None)
            failure = await client._watch(url, 25)
    assert failure is None
    messages = _lines(capsys)
    assert len(messages) == 25
    assert {(m["type"], m["symbol"]) for m in messages} == {("trade", "ETHUSDT")}


async def test_whales_arrive_with_their_type(capsys: pytest.CaptureFixture[str]) -> None:
    with trio.fail_after(GUARD):
        async with running(symbols=("BTCUSDT",), rate=2000) as service:
            url = client.stream_url(service.ws_url, "whales", None, None)
            assert await client._watch(url, 2) is None
    messages = _lines(capsys)
    assert [m["type"] for m in messages] == ["whale", "whale"]


async def test_a_stop_request_ends_it_with_a_normal_close(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with trio.fail_after(GUARD):
        async with running(symbols=("BTCUSDT",), rate=200) as service:
            url = client.stream_url(service.ws_url, "book", None, None)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(client._watch, url, None)
                await until(lambda: bool(capsys.readouterr().out))
                engine.current_shutdown().request("Ctrl-C")  # what engine.run does on SIGINT
            await until(lambda: service.broadcast.statistics().clients == 0)
            # The client sent its close frame (1000) and waited for the answer.
            assert service.broadcast.statistics().disconnected == {"client_closed": 1}


async def test_a_refused_connection_gives_the_servers_reason() -> None:
    with trio.fail_after(GUARD):
        async with running(symbols=("BTCUSDT",), rate=100, token="s3cret") as service:
            bad_topic = client.stream_url(service.ws_url, "tardes", None, "s3cret")
            no_token = client.stream_url(service.ws_url, "trades", None, None)
            refused = [await client._watch(url, 1) for url in (bad_topic, no_token)]
            with_token = client.stream_url(service.ws_url, "trades", None, "s3cret")
            accepted = await client._watch(with_token, 1)
    assert refused == [
        "the server refused the upgrade with HTTP 400: unknown topic 'tardes.>': the kinds "
        "are trades, aggtrades, book, depth, klines, tickers, minitickers, avgprices, whales, "
        "orders",
        "the server refused the upgrade with HTTP 401: a valid bearer token is required",
    ]
    assert accepted is None


def test_nothing_listening_is_one_line_and_status_1(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as bound:  # bound, never listening: connections are refused
        bound.bind(("127.0.0.1", 0))
        url = f"ws://127.0.0.1:{bound.getsockname()[1]}/ws"
        status = client.main(["--topics", "trades", "--url", url, "--token", "s3cret"])
    captured = capsys.readouterr()
    assert status == 1
    assert captured.out == ""
    assert captured.err == (
        f"python -m services.market client: error: {url}: "
        "cannot connect: Connection refused (is the service running?)\n"
    )


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "give --topics, --symbols or both, e.g. --topics trades"),
        (["--topics", ","], "argument --topics: must name at least one topic, got ','"),
        (["--symbols", "btc-usdt"], "argument --symbols: 'BTC-USDT' is not a symbol"),
        (["--symbols", "X", "--count", "0"], "argument --count: must be a whole number >= 1"),
        (["--symbols", "X", "--url", "http://x/ws"], "argument --url: must start with ws://"),
    ],
)
def test_bad_flags_exit_2_naming_the_flag(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        client.main(argv)
    assert exited.value.code == 2
    last = capsys.readouterr().err.splitlines()[-1]
    assert last.startswith(f"python -m services.market client: error: {message}")


def test_the_query_keeps_the_urls_own_and_lists_unescaped() -> None:
    url = client.stream_url("ws://h:1/ws?x=1", "trades,book", ("BTCUSDT", "ETHUSDT"), "a&b")
    assert url == "ws://h:1/ws?x=1&topics=trades,book&symbols=BTCUSDT,ETHUSDT&token=a%26b"
    assert client.stream_url("ws://h:1/ws", None, ("BTCUSDT",), None) == (
        "ws://h:1/ws?symbols=BTCUSDT"
    )


@pytest.mark.subprocess
def test_the_command_prints_n_trades_from_a_running_service_and_exits_0() -> None:
    with service_process("--symbols", "BTCUSDT,ETHUSDT") as (_, _, ws_url):
        result = subprocess.run(
            [*COMMAND, "--topics", "trades", "--count", "5", "--url", ws_url],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    trades = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(trades) == 5
    assert {t["type"] for t in trades} == {"trade"}
