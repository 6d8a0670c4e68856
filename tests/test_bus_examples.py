"""The bus examples in docs/examples, run as programs against real servers from the wheels."""

from __future__ import annotations

import functools
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from tests.fixtures_nats import NatsServer
from tests.fixtures_nats import nats_server as nats_server
from tests.fixtures_redis import PASSWORD, RedisServer
from tests.fixtures_redis import redis_server as redis_server

EXAMPLES = Path(__file__).resolve().parent.parent / "docs" / "examples"


@pytest.mark.parametrize("url_from", ["argv", "env"])
async def test_redis_relay_demo_relays_every_message(
    redis_server: RedisServer, url_from: str
) -> None:
    command = [sys.executable, str(EXAMPLES / "redis_relay.py"), "--demo", "300"]
    env = dict(os.environ)
    if url_from == "argv":
        command.append(redis_server.url)
    else:
        env["REDIS_URL"] = redis_server.url
    with trio.fail_after(10):
        result = await trio.run_process(command, capture_stdout=True, capture_stderr=True, env=env)
    out, err = result.stdout.decode(), result.stderr.decode()
    lines = out.splitlines()
    assert re.fullmatch(
        r"relaying trade_events to ws://127\.0\.0\.1:\d+/ws; "
        r"health at http://127\.0\.0\.1:\d+/health",
        lines[0],
    )
    assert lines[1:] == [
        "relayed 300 of 300 trade_events messages over the WebSocket, in order",
        "/health: 200",
        "broadcast: returned",
    ]
    assert PASSWORD not in out + err


async def test_nats_publisher_stores_each_message_once_across_a_restart(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    command = [sys.executable, str(EXAMPLES / "nats_publisher.py"), nats_server.url]
    command += ["--messages", "2000", "--rate", "1000"]
    output = b""
    with (tmp_path / "stderr.txt").open("wb") as errors, trio.fail_after(15):
        run = functools.partial(
            trio.run_process, command, stdout=subprocess.PIPE, stderr=errors, check=False
        )
        async with trio.open_nursery() as nursery:
            process: trio.Process = await nursery.start(run)
            assert process.stdout is not None
            restarted = False
            async for chunk in process.stdout:
                output += chunk
                if b"halfway" in output and not restarted:
                    await nats_server.restart()  # SIGKILL, then the same port and store
                    restarted = True
    stderr = (tmp_path / "stderr.txt").read_text()
    assert process.returncode == 0, stderr[-3000:]
    lines = output.decode().splitlines()
    assert lines[:3] == [
        "halfway: 1000 stored",
        "published 2000 of 2000 trades to stream TRADES, each with its own msg_id",
        "read back 2000 distinct msg_ids: 0 stored twice, 0 missing",
    ]
    reconnects = re.fullmatch(r"\(reconnects: (\d+), sent again: \d+\)", lines[3])
    assert reconnects is not None
    assert int(reconnects[1]) >= 1


async def test_nats_publisher_runs_again_on_the_same_stream(nats_server: NatsServer) -> None:
    command = [sys.executable, str(EXAMPLES / "nats_publisher.py"), "--rate", "10000"]
    command += ["--messages", "200"]
    env = dict(os.environ, NATS_URL=nats_server.url)
    for _ in range(2):  # the second run finds the first one's stream, messages and consumer
        with trio.fail_after(10):
            result = await trio.run_process(
                command, capture_stdout=True, capture_stderr=True, env=env
            )
        assert result.stdout.decode().splitlines()[:3] == [
            "halfway: 100 stored",
            "published 200 of 200 trades to stream TRADES, each with its own msg_id",
            "read back 200 distinct msg_ids: 0 stored twice, 0 missing",
        ]
