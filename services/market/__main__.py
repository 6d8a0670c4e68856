"""``python -m services.market``: the market-data service on the engine.

With no flags it runs entirely on this machine: an embedded exchange
simulator on loopback feeds it. Every flag has a ``MARKET_*`` environment
variable; a flag wins over its variable.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

import engine

from ._service import DEFAULT_SYMBOLS, MarketConfig, MarketService, rate_from_text, serve_market


def _rate(text: str) -> float:
    try:
        return rate_from_text(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"must be a positive number or inf, got {text!r}") from exc


def _parser() -> argparse.ArgumentParser:
    env = os.environ.get
    parser = argparse.ArgumentParser(
        prog="python -m services.market",
        description="Market-data service: exchange feed -> processors -> bus, with /health "
        "/ready /metrics /status. Runs on an embedded exchange simulator unless --feed-url "
        "is given. Each flag defaults to its MARKET_* environment variable.",
    )
    parser.add_argument(
        "--host",
        default=env("MARKET_HOST", "127.0.0.1"),
        help="address to serve on (MARKET_HOST; default 127.0.0.1)",
    )
    parser.add_argument(
        "--port",
        type=int,
        default=int(env("MARKET_PORT", "8000")),
        help="port to serve on, 0 for any free one (MARKET_PORT; default 8000)",
    )
    parser.add_argument(
        "--ws-port",
        type=int,
        default=int(env("MARKET_WS_PORT", "8001")),
        help="WebSocket broadcast port, 0 for any free one (MARKET_WS_PORT; default 8001)",
    )
    parser.add_argument(
        "--feed-url",
        default=env("MARKET_FEED_URL"),
        help="exchange stream base URL, e.g. wss://stream.binance.com:9443 "
        "(MARKET_FEED_URL; default: the embedded simulator)",
    )
    parser.add_argument(
        "--symbols",
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
        type=int,
        default=int(env("MARKET_PROCESSORS", "4")),
        help="feed processors (MARKET_PROCESSORS; default 4)",
    )
    parser.add_argument(
        "--queue-size",
        type=int,
        default=int(env("MARKET_QUEUE_SIZE", "10000")),
        help="feed queue bound (MARKET_QUEUE_SIZE; default 10000)",
    )
    parser.add_argument(
        "--overflow",
        choices=("block", "drop_oldest", "drop_newest"),
        default=env("MARKET_OVERFLOW", "block"),
        help="feed queue policy when full (MARKET_OVERFLOW; default block)",
    )
    parser.add_argument(
        "--grace-period",
        type=float,
        default=float(env("MARKET_GRACE_PERIOD", "10")),
        help="seconds to finish in-flight work after SIGTERM (MARKET_GRACE_PERIOD)",
    )
    parser.add_argument(
        "--log-json",
        action="store_true",
        default=env("MARKET_LOG_JSON", "") not in ("", "0", "false"),
        help="log JSON lines (MARKET_LOG_JSON)",
    )
    return parser


def config_from_args(argv: Sequence[str] | None = None) -> tuple[MarketConfig, bool]:
    """Parse flags into a :class:`MarketConfig`; exits with status 2 on bad input."""
    parser = _parser()
    args = parser.parse_args(argv)
    symbols = tuple(s.strip().upper() for s in args.symbols.split(",") if s.strip())
    try:
        config = MarketConfig(
            host=args.host,
            port=args.port,
            ws_port=args.ws_port,
            feed_url=args.feed_url,
            symbols=symbols,
            rate=float(args.rate),
            processors=args.processors,
            queue_size=args.queue_size,
            overflow=args.overflow,
            grace_period=args.grace_period,
        )
        for flag, port in (("--port", config.port), ("--ws-port", config.ws_port)):
            if not 0 <= port <= 65535:
                raise ValueError(f"{flag} must be between 0 and 65535, got {port}")
        if config.processors < 1 or config.queue_size < 1 or not symbols:
            raise ValueError("--processors and --queue-size must be >= 1 and --symbols non-empty")
    except ValueError as exc:
        parser.error(str(exc))
    return config, args.log_json


async def _main(config: MarketConfig) -> None:
    import trio

    async with trio.open_nursery() as nursery:
        service: MarketService = await nursery.start(serve_market, config)
        print(f"market service ready at {service.url} (WebSocket: {service.ws_url})", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the service; the exit status (0 after a graceful stop)."""
    config, log_json = config_from_args(argv)
    engine.configure_logging("INFO", json=log_json)
    try:
        engine.run(_main, config, grace_period=config.grace_period)
    except engine.ForcedShutdown as exc:
        print(f"market service: {exc}", file=sys.stderr)
        return exc.exit_status
    return 0


if __name__ == "__main__":
    sys.exit(main())
