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
import math
import os
import socket
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

import engine

from ._service import DEFAULT_SYMBOLS, MarketConfig, MarketService, rate_from_text, serve_market


def _rate(text: str) -> float:
    try:
        return rate_from_text(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"must be a positive number or inf, got {text!r}") from exc


def _checked(
    convert: Callable[[str], float], accept: Callable[[float], bool], wanted: str
) -> Callable[[str], Any]:
    """An argparse type: ``convert`` the text, and refuse what ``accept`` does not take."""

    def check(text: str) -> Any:
        try:
            value = convert(text)
        except ValueError:
            value = math.nan  # refused below, with the same message
        if not accept(value):  # comparisons with nan are false: refused
            raise argparse.ArgumentTypeError(f"must be {wanted}, got {text!r}")
        return value

    return check


_port = _checked(int, lambda v: 0 <= v <= 65535, "a port number from 0 to 65535")
_positive = _checked(int, lambda v: v >= 1, "a whole number >= 1")
_seconds = _checked(float, lambda v: v >= 0, "a number of seconds >= 0 or inf")
_interval = _checked(float, lambda v: 0 < v < math.inf, "a number of seconds > 0")
_notional = _checked(float, lambda v: 0 < v < math.inf, "an amount > 0")


def _feed_url(text: str) -> str:
    if not text.startswith(("ws://", "wss://")):
        raise argparse.ArgumentTypeError(f"must start with ws:// or wss://, got {text!r}")
    return text


def _http_url(text: str) -> str:
    if not text.startswith(("http://", "https://")):
        raise argparse.ArgumentTypeError(f"must start with http:// or https://, got {text!r}")
    return text


def _symbols(text: str) -> tuple[str, ...]:
    symbols = tuple(s.strip().upper() for s in text.split(",") if s.strip())
    if not symbols:
        raise argparse.ArgumentTypeError(f"must name at least one symbol, got {text!r}")
    for symbol in symbols:
        if not symbol.isascii() or not symbol.isalnum():
            raise argparse.ArgumentTypeError(
                f"{symbol!r} is not a symbol (letters and digits only, like BTCUSDT)"
            )
    return symbols


_TRUE = ("1", "true", "yes", "on")
_FALSE = ("", "0", "false", "no", "off")


def _switch(text: str) -> bool | str:
    """A variable's on/off text as a bool; other text as is, for the parser to refuse."""
    if text.lower() in _TRUE:
        return True
    if text.lower() in _FALSE:
        return False
    return text


def _host(text: str) -> str:
    if not text.strip() or text != text.strip():
        raise argparse.ArgumentTypeError(f"must be an address or host name, got {text!r}")
    return text


def _path(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError(f"must name a file, got {text!r}")
    return text


def _token(text: str) -> str:
    if not text or not text.isascii() or not text.isprintable() or " " in text:
        raise argparse.ArgumentTypeError("must be printable ASCII without spaces")
    return text


def _origins(text: str) -> tuple[str, ...]:
    origins = tuple(o.strip() for o in text.split(",") if o.strip())
    if not origins:
        raise argparse.ArgumentTypeError(f"must name at least one origin, got {text!r}")
    for origin in origins:
        scheme, _, rest = origin.partition("://")
        if scheme not in ("http", "https") or not rest or "/" in rest:
            raise argparse.ArgumentTypeError(
                f"{origin!r} is not an origin (scheme://host[:port], like https://example.com)"
            )
    return origins


_OVERFLOW = ("block", "drop_oldest", "drop_newest")


class _Parser(argparse.ArgumentParser):
    """An argparse parser whose errors are one line: the message, and where to look."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def _parser() -> argparse.ArgumentParser:
    env = os.environ.get
    parser = _Parser(
        prog="python -m services.market",
        description="Market-data service: exchange feed -> processors -> bus, with /health "
        "/ready /metrics /status. Runs on an embedded exchange simulator unless --feed-url "
        "is given. Each flag defaults to its MARKET_* environment variable.",
        epilog="Other command: 'python -m services.market scan --formula ...' scans the "
        "simulated universe once (see its --help).",
    )
    parser.add_argument(
        "--host",
        type=_host,
        default=env("MARKET_HOST", "127.0.0.1"),
        help="address of the ops server and /api (MARKET_HOST; default 127.0.0.1)",
    )
    # Defaults are the variables' text: argparse converts and checks a string
    # default with the flag's type, so a bad variable gets the flag's message.
    parser.add_argument(
        "--port",
        type=_port,
        default=env("MARKET_PORT", "8000"),
        help="port to serve on, 0 for any free one (MARKET_PORT; default 8000)",
    )
    parser.add_argument(
        "--ws-host",
        type=_host,
        default=env("MARKET_WS_HOST", "127.0.0.1"),
        help="address of the WebSocket broadcast (MARKET_WS_HOST; default 127.0.0.1)",
    )
    parser.add_argument(
        "--ws-port",
        type=_port,
        default=env("MARKET_WS_PORT", "8001"),
        help="WebSocket broadcast port, 0 for any free one (MARKET_WS_PORT; default 8001)",
    )
    parser.add_argument(
        "--feed-url",
        type=_feed_url,
        default=env("MARKET_FEED_URL"),
        help="exchange stream base URL, e.g. wss://stream.binance.com:9443 "
        "(MARKET_FEED_URL; default: the embedded simulator)",
    )
    parser.add_argument(
        "--symbols",
        type=_symbols,
        default=env("MARKET_SYMBOLS", ",".join(DEFAULT_SYMBOLS)),
        help="comma-separated symbols (MARKET_SYMBOLS)",
    )
    parser.add_argument(
        "--rate",
        type=_rate,
        default=env("MARKET_RATE", "1000"),
        help="simulator messages per second, or inf (MARKET_RATE; default 1000)",
    )
    parser.add_argument(
        "--processors",
        type=_positive,
        default=env("MARKET_PROCESSORS", "4"),
        help="feed processors (MARKET_PROCESSORS; default 4)",
    )
    parser.add_argument(
        "--queue-size",
        type=_positive,
        default=env("MARKET_QUEUE_SIZE", "10000"),
        help="feed queue bound (MARKET_QUEUE_SIZE; default 10000)",
    )
    parser.add_argument(
        "--overflow",
        choices=_OVERFLOW,
        default=env("MARKET_OVERFLOW", "block"),
        help="feed queue policy when full (MARKET_OVERFLOW; default block)",
    )
    parser.add_argument(
        "--order-log",
        type=_path,
        default=env("MARKET_ORDER_LOG"),
        help="a Hyperliquid node's order-status log to follow (MARKET_ORDER_LOG; default: "
        "the embedded simulator writes one, unless --feed-url is given)",
    )
    parser.add_argument(
        "--order-log-publish",
        choices=("order", "batch"),
        default=env("MARKET_ORDER_LOG_PUBLISH", "batch"),
        help="one bus message per coin and parsed chunk (batch), or per order "
        "(MARKET_ORDER_LOG_PUBLISH; default batch)",
    )
    parser.add_argument(
        "--rest-url",
        type=_http_url,
        default=env("MARKET_REST_URL"),
        help="exchange REST base for the watchlist's quotes, e.g. https://api.binance.com "
        "(MARKET_REST_URL; default: the embedded simulator's, or Binance's with --feed-url)",
    )
    parser.add_argument(
        "--watchlist-interval",
        type=_interval,
        default=env("MARKET_WATCHLIST_INTERVAL", "5"),
        help="seconds between watchlist refreshes (MARKET_WATCHLIST_INTERVAL; default 5)",
    )
    parser.add_argument(
        "--whale-threshold",
        type=_notional,
        default=env("MARKET_WHALE_THRESHOLD"),
        help="notional of a whale trade, in quote currency (MARKET_WHALE_THRESHOLD; "
        "default 100000, or 1500 on the simulator)",
    )
    parser.add_argument(
        "--scan-symbols",
        type=_positive,
        default=env("MARKET_SCAN_SYMBOLS", "2500"),
        help="symbols in the simulated universe scans cover (MARKET_SCAN_SYMBOLS; default 2500)",
    )
    parser.add_argument(
        "--scan-workers",
        type=_positive,
        default=env("MARKET_SCAN_WORKERS"),
        help="worker processes for scans (MARKET_SCAN_WORKERS; default one per CPU)",
    )
    parser.add_argument(
        "--grace-period",
        type=_seconds,
        default=env("MARKET_GRACE_PERIOD", "10"),
        help="seconds to finish in-flight work after SIGTERM (MARKET_GRACE_PERIOD)",
    )
    parser.add_argument(
        "--token",
        type=_token,
        default=env("MARKET_TOKEN"),
        help="a secret WebSocket clients and POST/DELETE /api requests must present "
        "(MARKET_TOKEN, which keeps it out of the process list; default none)",
    )
    parser.add_argument(
        "--allowed-origins",
        type=_origins,
        default=env("MARKET_ALLOWED_ORIGINS"),
        help="comma-separated origins WebSocket requests from browsers may come from "
        "(MARKET_ALLOWED_ORIGINS; default: any)",
    )
    parser.add_argument(
        "--max-clients",
        type=_positive,
        default=env("MARKET_MAX_CLIENTS", "1000"),
        help="WebSocket clients at most (MARKET_MAX_CLIENTS; default 1000)",
    )
    parser.add_argument(
        "--max-clients-per-ip",
        type=_positive,
        default=env("MARKET_MAX_CLIENTS_PER_IP"),
        help="WebSocket clients from one address at most (MARKET_MAX_CLIENTS_PER_IP; "
        "default: no limit below --max-clients)",
    )
    parser.add_argument(
        "--log-json",
        action=argparse.BooleanOptionalAction,
        default=_switch(env("MARKET_LOG_JSON", "")),
        help="log JSON lines, or not (MARKET_LOG_JSON: 1/true/yes/on or 0/false/no/off; "
        "default off)",
    )
    return parser


def config_from_args(argv: Sequence[str] | None = None) -> tuple[MarketConfig, bool]:
    """Parse flags into a :class:`MarketConfig`; exits with status 2 on bad input."""
    parser = _parser()
    args = parser.parse_args(argv)
    # argparse checks choices only for values given on the command line.
    if args.overflow not in _OVERFLOW:
        parser.error(
            f"argument --overflow: invalid choice: {args.overflow!r} "
            f"(MARKET_OVERFLOW; choose from {', '.join(_OVERFLOW)})"
        )
    if args.order_log_publish not in ("order", "batch"):
        parser.error(
            f"argument --order-log-publish: invalid choice: {args.order_log_publish!r} "
            "(MARKET_ORDER_LOG_PUBLISH; choose from order, batch)"
        )
    log_json = args.log_json
    if isinstance(log_json, str):  # the variable's text was neither on nor off
        parser.error(f"MARKET_LOG_JSON must be one of {'/'.join(_TRUE + _FALSE[1:])}")
    try:
        config = MarketConfig(
            host=args.host,
            port=args.port,
            ws_host=args.ws_host,
            ws_port=args.ws_port,
            feed_url=args.feed_url,
            symbols=args.symbols,
            rate=float(args.rate),
            processors=args.processors,
            queue_size=args.queue_size,
            overflow=args.overflow,
            grace_period=args.grace_period,
            order_log=args.order_log,
            order_log_publish=args.order_log_publish,
            rest_url=args.rest_url,
            watchlist_interval=args.watchlist_interval,
            whale_threshold=args.whale_threshold,
            scan_symbols=args.scan_symbols,
            scan_workers=args.scan_workers,
            token=args.token,
            allowed_origins=args.allowed_origins,
            max_clients=args.max_clients,
            max_clients_per_ip=args.max_clients_per_ip,
        )
    except ValueError as exc:
        parser.error(str(exc))
    return config, log_json


async def _main(config: MarketConfig) -> None:
    import trio

    async with trio.open_nursery() as nursery:
        service: MarketService = await nursery.start(serve_market, config)
        # What start-up built lives as long as the service: moving it out of the
        # collector's reach keeps full collections (tens of ms) off the loop.
        gc.freeze()
        print(f"market service ready at {service.url} (WebSocket: {service.ws_url})", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the service (or the ``scan`` command); the exit status (0 after a graceful stop)."""
    arguments = sys.argv[1:] if argv is None else list(argv)
    if arguments[:1] == ["scan"]:
        from .scans._cli import main as scan_main

        return scan_main(arguments[1:])
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
