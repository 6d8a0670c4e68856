"""``python -m services.market.simulator``: run the exchange simulator on its own.

Prints the WebSocket and REST base URLs, then serves until SIGINT or SIGTERM.
"""

from __future__ import annotations

import argparse
import sys

import engine

from .._settings import Setting, add_settings
from ._config import SimulatorConfig
from ._server import open_simulator


def _symbols(text: str) -> list[str]:
    return [s.strip() for s in text.split(",") if s.strip()]


_DEFAULT = SimulatorConfig()

# Each is the SimulatorConfig field of its name, with the same default but the port.
_SETTINGS = (
    Setting("host", None, _DEFAULT.host, None, "address to bind"),
    Setting("port", int, "9443", None, "port to bind; 0 picks one"),
    Setting("seed", int, str(_DEFAULT.seed), None, "seed of every price and id"),
    Setting(
        "rate",
        float,
        f"{_DEFAULT.rate:g}",
        None,
        "messages per second on each connection; 'inf' for no limit",
    ),
    Setting("symbols", _symbols, ",".join(_DEFAULT.symbols), None, "comma-separated symbols"),
    Setting(
        "epoch_ms",
        int,
        None,
        None,
        "start a simulated clock here (ms since the epoch)",
        unset="the wall clock",
    ),
    Setting(
        "order_log",
        None,
        None,
        None,
        "also append a Hyperliquid-style order-status log to this file",
        unset="none",
    ),
    Setting(
        "order_log_rate",
        float,
        f"{_DEFAULT.order_log_rate:g}",
        None,
        "lines per second of the order log",
    ),
)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m services.market.simulator",
        description="Binance-format market data streams and REST endpoints, from a seed.",
    )
    add_settings(parser, _SETTINGS, {})
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
        config = SimulatorConfig(**vars(args))
    except (TypeError, ValueError) as exc:
        parser.error(str(exc))
    engine.run(_serve, config, grace_period=1.0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
