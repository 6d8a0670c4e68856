"""The settings' table: where a value comes from, and the checks it is given.

Which flag wins over which variable, what a variable may hold that a flag may
not, and the same bound checked on text (the command) and on a value
(``MarketConfig``). ``test_docs_market.py`` compares the table with the page.
"""

from __future__ import annotations

import math
import os
import re

import attrs
import pytest

import services.market.__main__ as cli
from services.market import _scan_command as scan_command
from services.market._service import MarketConfig
from services.market._settings import DEFAULTS, SETTINGS
from services.market.scans import ScanConfig


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("MARKET_"):
            monkeypatch.delenv(name)


def _refused(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exited:
        cli.config_from_args(argv)
    assert exited.value.code == 2
    return capsys.readouterr().err


def test_marketconfigs_defaults_are_the_tables() -> None:
    fields = attrs.asdict(MarketConfig(), recurse=False)
    assert fields == {name: value for name, value in DEFAULTS.items() if name != "log_json"}
    assert DEFAULTS["port"] == 8000
    assert DEFAULTS["symbols"] == ("BTCUSDT", "ETHUSDT", "SOLUSDT", "BNBUSDT", "XRPUSDT")
    assert DEFAULTS["rate"] == 1000.0
    assert DEFAULTS["log_json"] is False


def test_a_variable_sets_a_value_and_a_flag_wins_over_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MARKET_PORT", "9000")
    monkeypatch.setenv("MARKET_SYMBOLS", "btcusdt, ethusdt")
    config, _ = cli.config_from_args([])
    assert (config.port, config.symbols) == (9000, ("BTCUSDT", "ETHUSDT"))
    config, _ = cli.config_from_args(["--port", "9100"])
    assert config.port == 9100


def test_a_bad_variable_is_not_read_when_its_flag_is_given(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("MARKET_PORT", "banana")
    monkeypatch.setenv("MARKET_OVERFLOW", "spill")
    assert "MARKET_OVERFLOW" in _refused(["--port", "9100"], capsys)
    config, _ = cli.config_from_args(["--port", "9100", "--overflow", "drop_oldest"])
    assert (config.port, config.overflow) == (9100, "drop_oldest")


@pytest.mark.parametrize(
    ("variable", "flags", "expected"),
    [
        ("YES", [], True),
        ("off", [], False),
        ("", [], False),
        ("on", ["--no-log-json"], False),
        ("maybe", ["--log-json"], True),
        ("maybe", ["--no-log-json"], False),
    ],
)
def test_the_switch_reads_its_variable_and_the_command_line_wins(
    variable: str, flags: list[str], expected: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MARKET_LOG_JSON", variable)
    assert cli.config_from_args(flags)[1] is expected


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("port", 70000, "port must be a port number from 0 to 65535, got 70000"),
        ("ws_port", True, "ws_port must be a port number from 0 to 65535, got True"),
        ("port", 8000.0, "port must be a port number from 0 to 65535, got 8000.0"),
        ("grace_period", -1, "grace_period must be a number of seconds >= 0 or inf, got -1"),
        ("grace_period", math.nan, "grace_period must be a number of seconds >= 0 or inf"),
        ("grace_period", "10", "grace_period must be a number of seconds >= 0 or inf"),
    ],
)
def test_marketconfig_refuses_what_the_flag_refuses(
    field: str, value: object, message: str
) -> None:
    with pytest.raises(ValueError, match="^" + re.escape(message)):
        MarketConfig(**{field: value})  # type: ignore[arg-type]  # each a wrong value


@pytest.mark.parametrize(("field", "value"), [("port", 0), ("grace_period", math.inf)])
def test_marketconfig_takes_the_bounds(field: str, value: float) -> None:
    assert getattr(MarketConfig(**{field: value}), field) == value  # type: ignore[arg-type]


def test_marketconfig_takes_a_whole_number_of_seconds() -> None:
    assert MarketConfig(grace_period=3).grace_period == 3


def test_every_setting_has_a_variable_named_after_it() -> None:
    for setting in SETTINGS:
        assert setting.variable == "MARKET_" + setting.name.upper()


# -- the scan command ---------------------------------------------------------


def test_the_scan_commands_defaults_are_scanconfigs() -> None:
    args = scan_command._parser().parse_args(["--formula", "close > 0"])
    default = ScanConfig()
    assert (args.symbols, args.workers, args.deadline, args.seed) == (
        default.symbols,
        default.workers,
        default.item_deadline,
        default.seed,
    )
    assert (args.epoch_ms, args.limit, args.json) == (None, 50, False)


def test_the_scan_command_reads_its_workers_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MARKET_SCAN_WORKERS", "3")
    parser = scan_command._parser()
    assert parser.parse_args(["--formula", "x"]).workers == 3
    assert parser.parse_args(["--formula", "x", "--workers", "2"]).workers == 2


def test_the_scan_command_requires_a_formula(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        scan_command._parser().parse_args(["--json"])
    assert "the following arguments are required: --formula" in capsys.readouterr().err
