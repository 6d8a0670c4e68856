"""``python -m services.market client``: watch the service's WebSocket stream.

It connects to the broadcast with the service's own WebSocket client
(:mod:`services.market._wsclient`), so it needs nothing beyond the
service's dependencies, and prints each message on its own line, as it
arrives, until Ctrl-C or ``--count`` messages. A problem is one line on
stderr and exit status 1: nothing listens, the server refuses the
connection (its reason is shown), or closes it other than normally.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from urllib.parse import urlencode, urlsplit, urlunsplit

import trio

import engine

from ._settings import SETTINGS, Bounded, Setting, add_settings
from ._wsclient import ConnectionClosed, HandshakeError, open_websocket

PROG = "python -m services.market client"
DEFAULT_URL = "ws://127.0.0.1:8001/ws"
"""The broadcast's address when the service runs with its defaults."""

# Closes that end a watch normally: the client's own, and a server stopping.
_NORMAL_CLOSES = (1000, 1001)
# The service's own checks, for the flags that mean the same here.
_SERVICE = {setting.name: setting.check for setting in SETTINGS}
_COUNT = Bounded(int, lambda v: v >= 1, "a whole number >= 1")


def _topics(text: str) -> str:
    topics = [topic.strip() for topic in text.split(",") if topic.strip()]
    if not topics:
        raise argparse.ArgumentTypeError(f"must name at least one topic, got {text!r}")
    return ",".join(topics)


_SETTINGS = (
    Setting(
        "topics",
        _topics,
        None,
        None,
        "comma-separated kinds or topics, e.g. trades,whales or book.BTCUSDT",
        unset="every kind of --symbols",
    ),
    Setting(
        "symbols", _SERVICE["symbols"], None, None, "comma-separated symbols", unset="every symbol"
    ),
    Setting("url", _SERVICE["feed_url"], DEFAULT_URL, None, "the service's WebSocket address"),
    Setting("count", _COUNT, None, None, "messages to print, then exit", unset="no limit"),
    Setting(
        "token",
        _SERVICE["token"],
        None,
        "MARKET_TOKEN",
        "the service's token, if it has one; prefer the variable",
        unset="no token",
    ),
)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Print the messages of a running market service's WebSocket stream, "
        "one a line, until Ctrl-C or --count. Topics: see docs/broadcast.md.",
    )
    add_settings(parser, _SETTINGS, os.environ)
    return parser


def stream_url(
    url: str, topics: str | None, symbols: Sequence[str] | None, token: str | None
) -> str:
    """``url`` with the query that asks for ``topics`` of ``symbols``, and gives ``token``."""
    asked = {"topics": topics, "symbols": ",".join(symbols or ()), "token": token}
    parts = urlsplit(url)
    query = [parts.query] if parts.query else []
    query.append(urlencode({key: value for key, value in asked.items() if value}, safe=","))
    return urlunsplit(parts._replace(query="&".join(query)))


def main(argv: Sequence[str]) -> int:
    """Run the ``client`` command; the exit status (2 for bad flags)."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.topics is None and args.symbols is None:
        parser.error("give --topics, --symbols or both, e.g. --topics trades")
    url = stream_url(args.url, args.topics, args.symbols, args.token)
    try:
        failure = engine.run(_watch, url, args.count, grace_period=5)
    except engine.ForcedShutdown as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return exc.exit_status
    if failure is None:
        return 0
    # The URL as given, without the query: the token stays out of the message.
    print(f"{PROG}: error: {args.url}: {failure}", file=sys.stderr)
    return 1


async def _watch(url: str, count: int | None) -> str | None:
    """Print messages until ``count``, or a stop request; what went wrong, or ``None``."""
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_cancel_on_stop, nursery.cancel_scope)
        try:
            await _print_messages(url, count)
        except ConnectionClosed as closed:
            if closed.code not in _NORMAL_CLOSES:
                return str(closed)
            print(f"{PROG}: {closed}", file=sys.stderr)
        except HandshakeError as exc:
            return str(exc)
        except OSError as exc:
            return f"cannot connect: {_why(exc)}"
        finally:
            nursery.cancel_scope.cancel()
    return None


async def _print_messages(url: str, count: int | None) -> None:
    left = count
    async with open_websocket(url) as ws:
        while left is None or left > 0:
            messages = await ws.receive_messages()
            if left is not None:
                del messages[left:]
                left -= len(messages)
            text = "".join(
                f"{m if isinstance(m, str) else m.decode('utf-8', 'replace')}\n" for m in messages
            )
            try:
                sys.stdout.write(text)
                sys.stdout.flush()
            except BrokenPipeError:
                # The reader of stdout left (``| head``): done. Python's own
                # flush at exit must not fail on the same pipe.
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
                return


async def _cancel_on_stop(scope: trio.CancelScope) -> None:
    # Ctrl-C asks for a stop: the connection then closes normally (1000).
    await engine.current_shutdown().wait()
    scope.cancel()


def _why(exc: OSError) -> str:
    """What the system said about a failed connection, without trio's wrapping."""
    cause = exc.__cause__
    # trio tries each address the name resolved to, and groups their errors.
    errors = cause.exceptions if isinstance(cause, BaseExceptionGroup) else (exc,)
    said = ", ".join(sorted({_strerror(error) for error in errors}))
    if all(isinstance(error, ConnectionRefusedError) for error in errors):
        said += " (is the service running?)"
    return said


def _strerror(exc: BaseException) -> str:
    code, text = getattr(exc, "errno", None), getattr(exc, "strerror", None)
    if isinstance(code, int) and code > 0:
        return os.strerror(code)  # trio's text adds the address, given already
    return text if isinstance(text, str) and text else str(exc)
