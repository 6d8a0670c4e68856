"""The settings of ``python -m services.market``, each declared once.

A :class:`Setting` names what it sets, how its text is checked, its default,
its ``MARKET_*`` environment variable and its help. From the table
:data:`SETTINGS` come the command's argparse parser and its reading of the
environment (:func:`add_settings`, :func:`check_variables`), the defaults of
:class:`~services.market._service.MarketConfig` (:data:`DEFAULTS`), and the
test that ``docs/configuration.md`` lists every setting. The ``scan`` command
and the simulator's (``python -m services.market.simulator``) declare their
own settings the same way.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Iterable, Mapping
from types import MappingProxyType
from typing import Any

import attrs

from .scans import DEFAULT_UNIVERSE

DEFAULT_SYMBOLS = ("BTCUSDT", "ETHUSDT", "SOLUSDT", "BNBUSDT", "XRPUSDT")

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("", "0", "false", "no", "off")
_ON_OR_OFF = f"{'/'.join(_TRUE)} or {'/'.join(_FALSE[1:])}"


@attrs.frozen
class Bounded:
    """A number read from text, and the range it must fall in.

    Called with a flag's or a variable's text, it is an argparse ``type``;
    :meth:`validate` checks a value given in Python, as an attrs validator.
    Both refuse with the same words: ``must be <wanted>, got <value>``.

    Attributes:
        kind: ``int`` or ``float``; a float setting takes an int too.
        accept: whether a number is in range (``nan`` never is).
        wanted: what is accepted, in words.
    """

    kind: type[int] | type[float]
    accept: Callable[[float], bool]
    wanted: str

    def __call__(self, text: str) -> Any:
        """The number ``text`` spells; ``argparse.ArgumentTypeError`` if it is not accepted."""
        try:
            value = self.kind(text)
        except ValueError:
            value = math.nan  # refused below, with the same message
        if not self.accept(value):  # comparisons with nan are false: refused
            raise argparse.ArgumentTypeError(f"must be {self.wanted}, got {text!r}")
        return value

    def validate(self, instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
        """Refuse a value of another type, or out of range, naming the field."""
        kinds = (int,) if self.kind is int else (int, float)
        if isinstance(value, bool) or not isinstance(value, kinds) or not self.accept(value):
            raise ValueError(f"{attribute.name} must be {self.wanted}, got {value!r}")


PORT = Bounded(int, lambda v: 0 <= v <= 65535, "a port number from 0 to 65535")
SECONDS = Bounded(float, lambda v: v >= 0, "a number of seconds >= 0 or inf")
_POSITIVE = Bounded(int, lambda v: v >= 1, "a whole number >= 1")
_INTERVAL = Bounded(float, lambda v: 0 < v < math.inf, "a number of seconds > 0")
_NOTIONAL = Bounded(float, lambda v: 0 < v < math.inf, "an amount > 0")
_RATE = Bounded(float, lambda v: v > 0, "a positive number or inf")


def _feed_url(text: str) -> str:
    if not text.startswith(("ws://", "wss://")):
        raise argparse.ArgumentTypeError(f"must start with ws:// or wss://, got {text!r}")
    return text


def _bus_url(text: str) -> str:
    from engine.bus import connect

    try:
        connect(text)  # checks the URL and its options; connects only when entered
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _dask_address(text: str) -> str:
    from ._dask import check_address

    try:
        return check_address(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


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


def _switch(text: str) -> bool | str:
    """A variable's on/off text as a bool; other text as is, for :func:`check_variables`."""
    if text.lower() in _TRUE:
        return True
    if text.lower() in _FALSE:
        return False
    return text


@attrs.frozen
class Setting:
    """One setting of a command: what it sets, its check, default, variable and help.

    Attributes:
        name: what it sets: the parsed arguments' attribute and, for the
            service, the :class:`MarketConfig` field. The flag is the name
            with dashes (``queue_size``: ``--queue-size``).
        check: turns the text of the flag, the variable or the default into
            the value, or raises ``argparse.ArgumentTypeError`` (or
            ``ValueError``) with what is wrong; ``None`` keeps the text.
        default: the default, as text a variable could hold; ``None``: none,
            and ``unset`` says what that means.
        variable: the environment variable read when the flag is not given.
        help: what it sets, for ``--help``; the variable and the default
            are added after it.
        unset: what no value means, when there is no ``default``.
        choices: the only texts accepted, when not empty.
        switch: an on/off flag, off by default. With a variable it has a
            ``--no-`` form too, to turn off what the variable turned on.
        required: the flag must be given.
    """

    name: str
    check: Callable[[str], Any] | None
    default: str | None
    variable: str | None
    help: str
    unset: str = ""
    choices: tuple[str, ...] = ()
    switch: bool = False
    required: bool = False

    @property
    def flag(self) -> str:
        """The command-line flag: ``--`` and the name with dashes."""
        return "--" + self.name.replace("_", "-")

    @property
    def default_value(self) -> Any:
        """The default value, as the command would parse it with nothing set."""
        if self.switch:
            return False
        if self.default is None or self.check is None:
            return self.default
        return self.check(self.default)

    def argument(self, environ: Mapping[str, str]) -> dict[str, Any]:
        """The keywords of ``add_argument`` for this setting, its default read from ``environ``.

        A default given as text is converted and checked by argparse with the
        flag's own ``type``, and only when the flag is not given: so a bad
        variable gets the flag's message, and a flag wins over its variable.
        """
        if self.switch:
            if self.variable is None:
                return {"action": "store_true", "help": self._help()}
            on = _switch(environ.get(self.variable, ""))
            return {"action": argparse.BooleanOptionalAction, "default": on, "help": self._help()}
        options: dict[str, Any] = {"default": self.default, "help": self._help()}
        if self.variable is not None:
            options["default"] = environ.get(self.variable, self.default)
        if self.check is not None:
            options["type"] = self.check
        if self.choices:
            options["choices"] = self.choices
        if self.required:
            options["required"] = True
        return options

    def _help(self) -> str:
        if self.switch:
            notes = [f"{self.variable}: {_ON_OR_OFF}", "default off"] if self.variable else []
        else:
            notes = [self.variable] if self.variable else []
            if self.default is not None:
                notes.append(f"default {self.default}")
            elif self.unset:
                notes.append(f"default: {self.unset}")
        return f"{self.help} ({'; '.join(notes)})" if notes else self.help


def add_settings(
    parser: argparse.ArgumentParser, settings: Iterable[Setting], environ: Mapping[str, str]
) -> None:
    """Add each setting's flag to ``parser``, with its default from ``environ``."""
    for setting in settings:
        parser.add_argument(setting.flag, **setting.argument(environ))


def check_variables(
    parser: argparse.ArgumentParser, settings: Iterable[Setting], args: argparse.Namespace
) -> None:
    """Refuse, through ``parser.error``, a variable's text that argparse let through.

    argparse checks choices and on/off flags only on the command line: a
    value from a variable is checked here, and the message names the variable.
    """
    for setting in settings:
        value = getattr(args, setting.name)
        if setting.choices and value not in setting.choices:
            parser.error(
                f"argument {setting.flag}: invalid choice: {value!r} "
                f"({setting.variable}; choose from {', '.join(setting.choices)})"
            )
        if setting.switch and isinstance(value, str):
            parser.error(f"{setting.variable} must be one of {'/'.join(_TRUE + _FALSE[1:])}")


SETTINGS: tuple[Setting, ...] = (
    Setting("host", _host, "127.0.0.1", "MARKET_HOST", "address of the ops server and /api"),
    Setting("port", PORT, "8000", "MARKET_PORT", "port to serve on, 0 for any free one"),
    Setting("ws_host", _host, "127.0.0.1", "MARKET_WS_HOST", "address of the WebSocket broadcast"),
    Setting(
        "ws_port", PORT, "8001", "MARKET_WS_PORT", "WebSocket broadcast port, 0 for any free one"
    ),
    Setting(
        "feed_url",
        _feed_url,
        None,
        "MARKET_FEED_URL",
        "exchange stream base URL, e.g. wss://stream.binance.com:9443",
        unset="the embedded simulator",
    ),
    Setting(
        "symbols", _symbols, ",".join(DEFAULT_SYMBOLS), "MARKET_SYMBOLS", "comma-separated symbols"
    ),
    Setting(
        "bus",
        _bus_url,
        "memory://",
        "MARKET_BUS",
        "the bus between the processors and the broadcast: memory://, "
        "redis://host:port (?mode=streams), nats://host:port (?stream=NAME)",
    ),
    Setting(
        "role",
        None,
        "all",
        "MARKET_ROLE",
        "all: the whole service; broadcast: only relay a shared --bus to WebSocket clients",
        choices=("all", "broadcast"),
    ),
    Setting("rate", _RATE, "1000", "MARKET_RATE", "simulator messages per second, or inf"),
    Setting("processors", _POSITIVE, "4", "MARKET_PROCESSORS", "feed processors"),
    Setting("queue_size", _POSITIVE, "10000", "MARKET_QUEUE_SIZE", "feed queue bound"),
    Setting(
        "overflow",
        None,
        "block",
        "MARKET_OVERFLOW",
        "feed queue policy when full",
        choices=("block", "drop_oldest", "drop_newest"),
    ),
    Setting(
        "order_log",
        _path,
        None,
        "MARKET_ORDER_LOG",
        "a Hyperliquid node's order-status log to follow",
        unset="the embedded simulator writes one, unless --feed-url is given",
    ),
    Setting(
        "order_log_publish",
        None,
        "batch",
        "MARKET_ORDER_LOG_PUBLISH",
        "one bus message per coin and parsed chunk (batch), or per order",
        choices=("order", "batch"),
    ),
    Setting(
        "rest_url",
        _http_url,
        None,
        "MARKET_REST_URL",
        "exchange REST base for the watchlist's quotes, e.g. https://api.binance.com",
        unset="the embedded simulator's, or Binance's with --feed-url",
    ),
    Setting(
        "watchlist_interval",
        _INTERVAL,
        "5",
        "MARKET_WATCHLIST_INTERVAL",
        "seconds between watchlist refreshes",
    ),
    Setting(
        "whale_threshold",
        _NOTIONAL,
        None,
        "MARKET_WHALE_THRESHOLD",
        "notional of a whale trade, in quote currency",
        unset="100,000, or 1,500 on the simulator",
    ),
    Setting(
        "scan_symbols",
        _POSITIVE,
        str(DEFAULT_UNIVERSE),
        "MARKET_SCAN_SYMBOLS",
        "symbols in the simulated universe scans cover",
    ),
    Setting(
        "scan_workers",
        _POSITIVE,
        None,
        "MARKET_SCAN_WORKERS",
        "worker processes for scans",
        unset="one per CPU",
    ),
    Setting(
        "dask",
        _dask_address,
        None,
        "MARKET_DASK",
        "a Dask scheduler (tcp://host:8786) to run scans on",
        unset="local worker processes",
    ),
    Setting(
        "history",
        _path,
        ":memory:",
        "MARKET_HISTORY",
        "SQLite file that keeps the watchlist's failure history across restarts",
    ),
    Setting(
        "candles",
        _path,
        None,
        "MARKET_CANDLES",
        "SQLite file that keeps the candles scans fetch, across restarts (one per exchange)",
        unset="a temporary file",
    ),
    Setting(
        "grace_period",
        SECONDS,
        "10",
        "MARKET_GRACE_PERIOD",
        "seconds to finish in-flight work after SIGTERM",
    ),
    Setting(
        "token",
        _token,
        None,
        "MARKET_TOKEN",
        "a secret WebSocket clients and POST/DELETE /api requests must present; "
        "prefer the variable, which stays out of the process list",
        unset="no token",
    ),
    Setting(
        "allowed_origins",
        _origins,
        None,
        "MARKET_ALLOWED_ORIGINS",
        "comma-separated origins WebSocket requests from browsers may come from",
        unset="any",
    ),
    Setting("max_clients", _POSITIVE, "1000", "MARKET_MAX_CLIENTS", "WebSocket clients at most"),
    Setting(
        "max_clients_per_ip",
        _POSITIVE,
        None,
        "MARKET_MAX_CLIENTS_PER_IP",
        "WebSocket clients from one address at most",
        unset="no limit below --max-clients",
    ),
    Setting(
        "client_max_lag",
        _INTERVAL,
        "10",
        "MARKET_CLIENT_MAX_LAG",
        "seconds a WebSocket client may fall behind before it is closed as too slow",
    ),
    Setting("log_json", None, None, "MARKET_LOG_JSON", "log JSON lines, or not", switch=True),
)
"""Every setting of ``python -m services.market``, in the order ``--help`` lists them."""

DEFAULTS: Mapping[str, Any] = MappingProxyType({s.name: s.default_value for s in SETTINGS})
"""Each setting's default value, by name: :class:`MarketConfig`'s defaults."""
