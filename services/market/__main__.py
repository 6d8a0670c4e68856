"""``python -m services.market``: the market-data service on the engine.

With no flags it runs entirely on this machine: an embedded exchange
simulator on loopback feeds it. Every flag has a ``MARKET_*`` environment
variable; a flag wins over its variable.
"""

from __future__ import annotations

import argparse
import errno
import gc
import logging
import os
import socket
import sys
from collections.abc import Sequence
from typing import NoReturn

import attrs

import engine

from ._service import MarketConfig, MarketService, RelayService, serve_market, serve_relay
from ._settings import SETTINGS, add_settings, check_variables


class _Parser(argparse.ArgumentParser):
    """An argparse parser whose errors are one line: the message, and where to look."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="python -m services.market",
        description="Market-data service: exchange feed -> processors -> bus, with /health "
        "/ready /metrics /status. Runs on an embedded exchange simulator unless --feed-url "
        "is given. Each flag defaults to its MARKET_* environment variable.",
        epilog="Other commands (see their --help): 'python -m services.market client "
        "--topics trades' prints a running service's stream; 'python -m services.market "
        "scan --formula ...' scans the simulated universe once.",
    )
    add_settings(parser, SETTINGS, os.environ)
    return parser


def config_from_args(argv: Sequence[str] | None = None) -> tuple[MarketConfig, bool]:
    """The :class:`MarketConfig` and the JSON-logging switch that flags and variables set.

    Exits with status 2, and one line on stderr, on bad input.
    """
    parser = _parser()
    args = parser.parse_args(argv)
    check_variables(parser, SETTINGS, args)
    fields = attrs.fields_dict(MarketConfig)
    try:
        config = MarketConfig(**{k: v for k, v in vars(args).items() if k in fields})
    except ValueError as exc:
        parser.error(str(exc))
    return config, args.log_json


async def _main(config: MarketConfig) -> None:
    import trio

    async with trio.open_nursery() as nursery:
        service: MarketService | RelayService
        if config.role == "broadcast":
            service = await nursery.start(serve_relay, config)
        else:
            service = await nursery.start(serve_market, config)
        # What start-up built lives as long as the service: moving it out of the
        # collector's reach keeps full collections off the loop.
        gc.freeze()
        print(f"market service ready at {service.url} (WebSocket: {service.ws_url})", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the service (or the ``scan`` or ``client`` command); the exit status.

    The service's is 0 after a graceful stop.
    """
    arguments = sys.argv[1:] if argv is None else list(argv)
    if arguments[:1] == ["scan"]:
        from ._scan_command import main as scan_main

        return scan_main(arguments[1:])
    if arguments[:1] == ["client"]:
        from ._client_command import main as client_main

        return client_main(arguments[1:])
    config, log_json = config_from_args(arguments)
    engine.configure_logging("INFO", json=log_json)
    # httpx logs every request at INFO: one line per watchlist batch, every cycle.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        engine.run(_main, config, grace_period=config.grace_period)
    except engine.ForcedShutdown as exc:
        print(f"market service: {exc}", file=sys.stderr)
        return exc.exit_status
    except OSError as exc:
        if not _cannot_bind(exc):
            raise
        return _cannot_start(exc)
    except BaseExceptionGroup as group:
        # A port in use or a host that does not resolve: one line, not a
        # traceback. What else the group holds followed from it (the parts
        # already started were cancelled).
        matched, _ = group.split(_cannot_bind)
        if matched is None:
            raise
        return _cannot_start(_first_leaf(matched))
    return 0


def _cannot_bind(exc: BaseException) -> bool:
    if isinstance(exc, socket.gaierror):
        return True
    return isinstance(exc, OSError) and exc.errno in (
        errno.EADDRINUSE,
        errno.EADDRNOTAVAIL,
        errno.EACCES,
    )


def _first_leaf(group: BaseExceptionGroup[BaseException]) -> OSError:
    first = group.exceptions[0]
    if isinstance(first, BaseExceptionGroup):
        return _first_leaf(first)
    assert isinstance(first, OSError)
    return first


def _cannot_start(exc: OSError) -> int:
    print(f"market service: cannot start: {exc}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
