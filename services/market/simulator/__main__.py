"""``python -m services.market.simulator``: run the exchange simulator on its own.

Prints the WebSocket and REST base URLs, then serves until SIGINT or SIGTERM.
"""

from __future__ import annotations

import argparse
import sys

import engine

from ._config import DEFAULT_SYMBOLS, SimulatorConfig
from ._server import open_simulator


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m services.market.simulator",
        description="Binance-format market data streams and REST endpoints, from a seed.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (127.0.0.1)")
    parser.add_argument("--port", type=int, default=9443, help="port to bind; 0 picks one (9443)")
    parser.add_argument("--seed", type=int, default=0, help="seed of every price and id (0)")
    parser.add_argument(
        "--rate",
        type=float,
        default=1000.0,
        help="messages per second on each connection; 'inf' for no limit (1000)",
    )
    parser.add_argument(
        "--symbols",
        default=",".join(DEFAULT_SYMBOLS),
        help="comma-separated symbols (%(default)s)",
    )
    parser.add_argument(
        "--epoch-ms",
        type=int,
        default=None,
        help="start a simulated clock here (ms since the epoch) instead of the wall clock",
    )
    parser.add_argument(
        "--order-log",
        default=None,
        help="also append a Hyperliquid-style order-status log to this file (none)",
    )
    parser.add_argument(
        "--order-log-rate",
        type=float,
        default=100.0,
        help="lines per second of the order log (100)",
    )
    return parser


async def _serve(config: SimulatorConfig) -> None:
    async with open_simulator(config) as simulator:
        print(f"streams: {simulator.address.ws_url}", flush=True)
        print(f"rest: {simulator.address.rest_url}", flush=True)
        shutdown = engine.current_shutdown()
        await shutdown.wait()
        print(f"stopped: {shutdown.reason}", flush=True)


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv``, serve until a signal, and return the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        config = SimulatorConfig(
            symbols=[s.strip() for s in args.symbols.split(",") if s.strip()],
            rate=args.rate,
            seed=args.seed,
            host=args.host,
            port=args.port,
            epoch_ms=args.epoch_ms,
            order_log=args.order_log,
            order_log_rate=args.order_log_rate,
        )
    except (TypeError, ValueError) as exc:
        parser.error(str(exc))
    engine.run(_serve, config, grace_period=1.0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
