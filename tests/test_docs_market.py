"""The market service's pages say what the service does: getting-started.md, configuration.md.

The configuration reference is compared with the settings' table and the
command's parser built from it (flags, variables, defaults, error messages),
the getting-started example is run and its output compared with the page,
the metric names, /metrics size, /status sources and message types the page
quotes are looked up on a running service, and the documented commands
whose output is deterministic (the client's errors, the scan command) are
run and compared with the pages.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import attrs
import httpx
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

import services.market.__main__ as cli
from services.market import _client_command as client_command
from services.market._events import KINDS
from services.market._service import MarketConfig, MarketService, serve_market
from services.market._settings import SETTINGS, Setting
from services.market._wsclient import open_websocket
from services.market.cycles import WhaleFlowConfig
from services.market.orders import ORDER_KIND
from tests.test_market_service import service_process

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
GETTING_STARTED = DOCS / "getting-started.md"
CONFIGURATION = DOCS / "configuration.md"
SCANS = DOCS / "scans.md"
EXAMPLE = DOCS / "examples" / "market_client.py"

Row = list[str]


def _cells(line: str) -> Row:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def _table_after(page: str, marker: str) -> list[Row]:
    """The rows of the first Markdown table after ``marker``, without its header."""
    lines = page[page.index(marker) + len(marker) :].lstrip("\n").splitlines()
    rows = []
    for line in lines:
        if not line.startswith("|"):
            break
        rows.append(_cells(line))
    assert len(rows) > 2, f"no table after {marker!r}"
    return rows[2:]


def _code(cell: str) -> str:
    """The text of a cell's first `code span`."""
    match = re.search(r"`([^`]*)`", cell)
    assert match is not None, f"no code in {cell!r}"
    return match.group(1)


def _flag_rows() -> list[Row]:
    return _table_after(CONFIGURATION.read_text(), "## Flags and variables\n")


def _error_rows(marker: str) -> list[tuple[str, str]]:
    rows = _table_after(CONFIGURATION.read_text(), f"<!-- {marker} -->")
    return [(_code(given), _code(message)) for given, message in rows]


def _parser_actions() -> dict[str, argparse.Action]:
    """The parser's options by long flag, without --help."""
    actions = {}
    for action in cli._parser()._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        # The first long form: --log-json, not its --no-log-json.
        flag = next(option for option in action.option_strings if option.startswith("--"))
        actions[flag] = action
    return actions


def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("MARKET_"):
            monkeypatch.delenv(name)


# -- configuration.md against the parser -------------------------------------


def _documented_default(setting: Setting) -> str:
    """The page's default column for ``setting``, without its backticks."""
    if setting.switch:
        return "off"
    if setting.default is not None:
        return setting.default
    return f"none: {setting.unset}"


def test_configuration_lists_every_setting_with_its_flag_variable_and_default() -> None:
    rows = {_code(row[0]): row for row in _flag_rows()}
    assert sorted(rows) == sorted(s.flag for s in SETTINGS), "flags differ from the table's"
    for setting in SETTINGS:
        _, variable, default, *_ = rows[setting.flag]
        assert _code(variable) == setting.variable, f"{setting.flag}'s variable"
        assert default.replace("`", "") == _documented_default(setting), f"{setting.flag}'s default"


def test_the_parser_and_its_help_are_the_tables() -> None:
    actions = _parser_actions()
    assert list(actions) == [s.flag for s in SETTINGS], "the parser's flags are not the table's"
    for setting in SETTINGS:
        shown = actions[setting.flag].help or ""
        assert shown.startswith(setting.help), f"{setting.flag}'s help"
        assert setting.variable is not None
        assert setting.variable in shown, f"{setting.flag}'s help does not name its variable"
        default = _documented_default(setting).removeprefix("none: ")
        assert default in shown, f"{setting.flag}'s help does not give its default"


def test_configuration_defaults_are_the_parsers(monkeypatch: pytest.MonkeyPatch) -> None:
    _clean_environment(monkeypatch)
    parser = cli._parser()
    defaults = parser.parse_args([])
    for row in _flag_rows():
        flag, default = _code(row[0]), row[2]
        dest = _parser_actions()[flag].dest
        if default.startswith("`"):
            documented = getattr(parser.parse_args([flag, _code(default)]), dest)
            assert documented == getattr(defaults, dest), f"{flag}'s default"
        elif default.startswith("none"):
            assert getattr(defaults, dest) is None, f"{flag}'s default"
        else:
            assert default == "off", f"{flag}: a default the test cannot read: {default!r}"
            assert getattr(defaults, dest) is False, f"{flag}'s default"


def test_configuration_names_every_marketconfig_field(monkeypatch: pytest.MonkeyPatch) -> None:
    fields = {row[4].strip("`") for row in _flag_rows() if row[4].startswith("`")}
    assert fields == {field.name for field in attrs.fields(MarketConfig)}
    # Every setting but the command's own switch is a field of the same name.
    assert {s.name for s in SETTINGS} - {"log_json"} == fields
    _clean_environment(monkeypatch)
    # "the same defaults": the command line with nothing set is MarketConfig().
    assert cli.config_from_args([]) == (MarketConfig(), False)


@pytest.mark.parametrize(("given", "message"), _error_rows("parser errors"))
def test_bad_values_exit_2_with_the_documented_message(
    given: str, message: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _clean_environment(monkeypatch)
    argv: list[str] = []
    if given.startswith("MARKET_"):
        name, _, value = given.partition("=")
        monkeypatch.setenv(name, value)
    else:
        argv = shlex.split(given)
    with pytest.raises(SystemExit) as exited:
        cli.config_from_args(argv)
    assert exited.value.code == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1, lines  # one line, not the usage and a traceback
    expected = f"python -m services.market: error: {message}"
    # argparse's list of choices after "invalid choice" is worded differently
    # across Python versions, so the page stops before it.
    assert lines[0] == expected or lines[0].startswith(f"{expected} (")


def test_every_flag_and_variable_has_a_bad_value_row() -> None:
    given = [row[0] for row in _error_rows("parser errors")]
    flags = {g.split("=")[0].split()[0] for g in given if g.startswith("--")}
    variables = {g.partition("=")[0] for g in given if g.startswith("MARKET_")}
    rows = {_code(row[0]): _code(row[1]) for row in _flag_rows()}
    assert set(rows) <= flags, f"flags without a bad-value row: {sorted(set(rows) - flags)}"
    assert set(rows.values()) <= variables, (
        f"variables without a bad-value row: {sorted(set(rows.values()) - variables)}"
    )


@pytest.mark.subprocess
def test_an_address_in_use_is_one_line_and_status_1() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "services.market", "--port", str(port), "--ws-port", "0"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert result.returncode == 1, result.stderr
    line = "market service: cannot start: [Errno 98] Address already in use"
    assert result.stderr.splitlines()[-1] == line, result.stderr
    assert "Traceback" not in result.stderr
    assert f"```\n{line}\n```" in GETTING_STARTED.read_text()


# -- getting-started.md -------------------------------------------------------


@pytest.mark.subprocess
def test_getting_started_quotes_the_example_and_shows_what_it_prints() -> None:
    page = GETTING_STARTED.read_text()
    source = EXAMPLE.read_text()
    assert source[source.index("import json") :].strip() in page
    result = subprocess.run(
        [sys.executable, str(EXAMPLE)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    shown = page.split("<!-- example output -->\n```\n", 1)[1].split("```", 1)[0]
    assert result.stdout == shown
    # The claims the output makes, should the page and the example drift together.
    lines = result.stdout.splitlines()
    assert lines[1] == "trades from " + ", ".join(sorted(MarketConfig().symbols))
    assert lines[2:4] == ["/health 200 ok", "/ready 200 ok"]
    assert lines[-1] == "stopped: the example is done"


async def test_metrics_and_sources_quoted_in_getting_started_exist() -> None:
    page = GETTING_STARTED.read_text()
    quoted = set(re.findall(r"\bengine_[a-z_]+[a-z]", page))
    sources_line = page.split("jq -c '.sources | keys'\n", 1)[1].splitlines()[0]
    client = httpx.AsyncClient()  # before the loop is watched: it loads CA certificates
    with trio.fail_after(20):
        async with client, trio.open_nursery() as nursery:
            service: MarketService = await nursery.start(
                serve_market, MarketConfig(port=0, ws_port=0)
            )
            metrics = (await client.get(f"{service.url}/metrics")).text
            status = (await client.get(f"{service.url}/status")).json()
            nursery.cancel_scope.cancel()
    families = text_string_to_metric_families(metrics)
    exposed = {sample.name for family in families for sample in family.samples}
    assert quoted, "the page quotes no metric"
    assert quoted <= exposed, f"quoted but not on /metrics: {sorted(quoted - exposed)}"
    assert json.loads(sources_line) == sorted(status["sources"])
    match = re.search(r"Prometheus text format, about (\d+) lines", page)
    assert match is not None, "the page no longer gives /metrics' size"
    about, lines = int(match.group(1)), len(metrics.splitlines())
    assert abs(lines - about) <= about * 0.05, f"/metrics has {lines} lines, the page says {about}"


def _topic_rows() -> list[Row]:
    return _table_after(GETTING_STARTED.read_text(), "for each type of message:\n")


def _types(message: str | bytes) -> set[str]:
    """The ``type`` of a message, or of each element of an array (orders in batches)."""
    body = json.loads(message)
    return {item["type"] for item in (body if isinstance(body, list) else [body])}


async def test_the_topic_table_lists_every_kind_and_type_the_service_sends() -> None:
    rows = _topic_rows()
    kinds = [_code(row[0]).split(".")[0] for row in rows]
    documented = {_code(row[1]) for row in rows}
    received: set[str] = set()
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            service: MarketService = await nursery.start(
                serve_market, MarketConfig(port=0, ws_port=0, symbols=("BTCUSDT",))
            )
            # Every kind the service publishes: it refuses a topic of any other.
            async with open_websocket(f"{service.ws_url}?topics={','.join(kinds)}") as ws:
                while not documented <= received:
                    for message in await ws.receive_messages():
                        received |= _types(message)
            nursery.cancel_scope.cancel()
    assert received == documented
    assert sorted(kinds) == sorted((*KINDS, WhaleFlowConfig().publish_prefix, ORDER_KIND))


def _quoted_after(page: str, marker: str) -> str:
    """The first line of the code block after ``marker``, without a ``$ `` command."""
    block = page.split(f"{marker}\n```\n", 1)[1].split("```", 1)[0]
    return next(line for line in block.splitlines() if not line.startswith("$ "))


def test_the_clients_documented_nothing_listens_error(capsys: pytest.CaptureFixture[str]) -> None:
    shown = _quoted_after(GETTING_STARTED.read_text(), "<!-- client error: nothing listens -->")
    with socket.socket() as bound:  # bound, never listening: connections are refused
        bound.bind(("127.0.0.1", 0))
        url = f"ws://127.0.0.1:{bound.getsockname()[1]}/ws"
        status = client_command.main(["--topics", "trades", "--url", url])
    assert status == 1
    assert capsys.readouterr().err == shown.replace(client_command.DEFAULT_URL, url) + "\n"


@pytest.mark.subprocess
def test_the_clients_documented_commands_against_a_running_service(
    capsys: pytest.CaptureFixture[str],
) -> None:
    page = GETTING_STARTED.read_text()
    watch = re.search(r"python -m services\.market client (--topics trades --count 3)\n", page)
    assert watch is not None, "the page no longer shows the client watching trades"
    # The command's block ends where the match does; the next block is its output.
    shown = page[watch.end() :].split("```\n", 2)[2].split("```", 1)[0].splitlines()
    refused = _quoted_after(page, "<!-- client error: unknown topic -->")
    with service_process() as (_, _, ws_url):
        status = client_command.main([*watch.group(1).split(), "--url", ws_url])
        printed = capsys.readouterr().out.splitlines()
        assert status == 0
        assert client_command.main(["--topics", "tardes", "--url", ws_url]) == 1
    assert len(printed) == len(shown) == 3
    for line, documented in zip(printed, shown, strict=True):
        assert list(json.loads(line)) == list(json.loads(documented))  # the fields, in order
        assert json.loads(line)["type"] == "trade"
    assert capsys.readouterr().err == refused.replace(client_command.DEFAULT_URL, ws_url) + "\n"


# -- scans.md: the scan command ---------------------------------------------------


def _console_blocks(page: Path) -> list[list[str]]:
    blocks = re.findall(r"```console\n(.*?)```", page.read_text(), flags=re.DOTALL)
    return [block.splitlines() for block in blocks]


def _scan_argv(command: str) -> list[str]:
    argv = shlex.split(command.removeprefix("$ "))
    assert argv[:4] == ["python", "-m", "services.market", "scan"], argv
    return [sys.executable, *argv[1:]]


@pytest.mark.subprocess
def test_the_documented_scans_print_what_scans_md_shows(tmp_path: Path) -> None:
    blocks = [b for b in _console_blocks(SCANS) if "--epoch-ms" in b[0]]
    assert len(blocks) == 2
    took = re.compile(r"in \d+\.\d+ s")
    store = str(tmp_path / "candles.sqlite")  # the second scan reuses what the first fetched
    for block in blocks:
        result = subprocess.run(
            [*_scan_argv(block[0]), "--candles", store],
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
            env={**os.environ, "COLUMNS": "100"},
        )
        assert result.returncode == 0, result.stderr
        # Every line as shown, but for the time the scan took.
        printed = [took.sub("in ? s", line) for line in result.stdout.splitlines()]
        assert printed == [took.sub("in ? s", line) for line in block[1:]]
    # The README quotes the first scan's figures.
    last_bar = re.search(r": (\d+) of (\d+) symbols", blocks[0][2])
    on_bars = re.search(r"on (\d+) bars", blocks[0][3])
    assert last_bar is not None
    assert on_bars is not None
    readme = " ".join((ROOT / "README.md").read_text().split())
    matched, total, bars = (int(n) for n in (*last_bar.groups(), on_bars[1]))
    assert f"{matched} of {total:,} symbols match at the last bar, on {bars:,} bars" in readme


@pytest.mark.subprocess
def test_a_bad_formula_prints_what_scans_md_shows() -> None:
    [block] = [b for b in _console_blocks(SCANS) if "3O" in b[0]]
    result = subprocess.run(
        _scan_argv(block[0]), capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 2
    assert result.stderr.splitlines() == block[1:]


# -- links --------------------------------------------------------------------


def _anchors(page: str) -> set[str]:
    """GitHub's anchors for a page's headings."""
    anchors = set()
    for heading in re.findall(r"^#+ (.+)$", page, re.MULTILINE):
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        anchors.add(slug)
    return anchors


@pytest.mark.parametrize(
    "page",
    [GETTING_STARTED, CONFIGURATION, DOCS / "broadcast.md", DOCS / "whale-flows.md"],
    ids=lambda p: p.name,
)
def test_links_lead_to_files_and_headings_that_exist(page: Path) -> None:
    text = page.read_text()
    for target, anchor in re.findall(r"\]\(([^)#\s]*)(?:#([^)\s]+))?\)", text):
        if target.startswith(("http://", "https://")):
            continue
        linked = (page.parent / target).resolve() if target else page
        assert linked.exists(), f"{page.name} links to missing {target}"
        if anchor:
            assert anchor in _anchors(linked.read_text()), f"{page.name}: no #{anchor} in {target}"


def test_readme_links_both_pages() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "](docs/getting-started.md)" in readme
    assert "](docs/configuration.md)" in readme
