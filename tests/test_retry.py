"""Retry with backoff and full jitter: exact waits in virtual time, Retry-After, the example."""

from __future__ import annotations

import logging
import random
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import attrs
import httpx
import pytest
import trio
import trio.testing
from prometheus_client import CollectorRegistry, generate_latest

import engine
from engine._metrics import EngineCollector
from engine._retry import Retrying, RetryStatistics, retry
from engine._retry_http import retry_after_seconds, transient_http_error

from ._promlint import lint

ROOT = Path(__file__).resolve().parent.parent
EXACT = engine.Backoff(initial=1, maximum=10, multiplier=2, jitter=0)


class Flaky(Exception):
    """The error the scripted calls raise."""


@attrs.define
class Script:
    """An async call that fails ``failures`` times, then returns ``"ok"``; it notes when it ran."""

    failures: int
    error: Callable[[], Exception] = Flaky
    took: float = 0.0
    calls: list[float] = attrs.Factory(list)

    async def __call__(self, *args: object) -> str:
        self.calls.append(trio.current_time())
        await trio.sleep(self.took)
        if len(self.calls) <= self.failures:
            raise self.error()
        return "ok"


def http_error(status: int, **headers: str) -> httpx.HTTPStatusError:
    request = httpx.Request("GET", "https://exchange.test/api/v3/ticker/24hr")
    response = httpx.Response(status, headers=headers, request=request)
    return httpx.HTTPStatusError(f"HTTP {status}", request=request, response=response)


# --- the loop -----------------------------------------------------------------


async def test_waits_grow_exponentially_between_attempts(
    autojump_clock: trio.testing.MockClock,
) -> None:
    script = Script(failures=3, took=0.5)
    policy = Retrying(attempts=5, backoff=EXACT, full_jitter=False, retry_on=Flaky, name="quotes")
    assert await policy.call(script) == "ok"
    # Each attempt takes 0.5 s; then waits of 1, 2 and 4 s.
    assert script.calls == [0, 1.5, 4.0, 8.5]
    assert policy.statistics() == RetryStatistics(
        name="quotes",
        attempts_limit=5,
        calls=1,
        attempts=4,
        retries=3,
        successes=1,
        waited=7.0,
        last_error="Flaky: ",
    )


async def test_full_jitter_waits_a_seeded_uniform_fraction_of_each_cap(
    autojump_clock: trio.testing.MockClock,
) -> None:
    script = Script(failures=3)
    backoff = engine.Backoff(initial=1, maximum=3, multiplier=2, jitter=0, seed=7)
    policy = Retrying(attempts=4, backoff=backoff, retry_on=Flaky)
    await policy.call(script)
    rng = random.Random(7)
    waits = [rng.random() * cap for cap in (1, 2, 3)]  # the third cap is the maximum
    assert script.calls == [0, waits[0], waits[0] + waits[1], waits[0] + waits[1] + waits[2]]
    assert all(0 <= w < cap for w, cap in zip(waits, (1, 2, 3), strict=True))


async def test_when_attempts_run_out_the_last_error_is_raised_with_a_note(
    autojump_clock: trio.testing.MockClock,
) -> None:
    errors: list[Flaky] = []

    def error() -> Flaky:
        errors.append(Flaky(f"attempt {len(errors) + 1}"))
        return errors[-1]

    script = Script(failures=10, error=error)
    policy = Retrying(attempts=3, backoff=EXACT, full_jitter=False, name="quotes")
    with pytest.raises(Flaky) as caught:
        await policy.call(script)
    assert caught.value is errors[-1]
    assert caught.value.__notes__ == ["quotes: gave up after 3 attempt(s)"]
    assert script.calls == [0, 1, 3]
    stats = policy.statistics()
    assert (stats.attempts, stats.retries, stats.exhausted, stats.successes) == (3, 2, 1, 0)
    assert stats.last_error == "Flaky: attempt 3"


async def test_an_error_retry_on_refuses_is_raised_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    script = Script(failures=1, error=lambda: KeyError("bug"))
    policy = Retrying(attempts=5, retry_on=lambda exc: isinstance(exc, Flaky))
    with pytest.raises(KeyError) as caught:
        await policy.call(script)
    assert not hasattr(caught.value, "__notes__")
    assert (script.calls, policy.statistics().refused) == ([0], 1)


async def test_a_deadline_around_the_loop_cuts_the_wait_and_stops_retrying(
    autojump_clock: trio.testing.MockClock,
) -> None:
    script = Script(failures=10)
    policy = Retrying(attempts=10, backoff=EXACT, full_jitter=False)
    with trio.move_on_after(2.5) as scope:
        await policy.call(script)
    assert scope.cancelled_caught
    assert script.calls == [0, 1]  # the wait from 1 to 3 was cut at 2.5
    assert trio.current_time() == 2.5
    stats = policy.statistics()
    assert (stats.attempts, stats.exhausted, stats.waited) == (2, 0, 2.5)


async def test_a_deadline_around_the_loop_cancels_the_attempt_in_progress(
    autojump_clock: trio.testing.MockClock,
) -> None:
    script = Script(failures=10, took=3)
    with trio.move_on_after(5) as scope:
        await retry(script, attempts=10, backoff=EXACT, retry_on=Flaky)
    assert scope.cancelled_caught
    # The first attempt failed at 3; the second started after a wait below
    # 1 s and was cut at 5, before it could fail.
    assert len(script.calls) == 2
    assert 3 <= script.calls[1] < 4
    assert trio.current_time() == 5


async def test_the_shorthand_passes_arguments_and_returns_the_value(
    autojump_clock: trio.testing.MockClock,
) -> None:
    seen: list[tuple[int, str]] = []

    async def fetch(n: int, symbol: str) -> str:
        seen.append((n, symbol))
        if len(seen) < 2:
            raise Flaky
        return f"{symbol}x{n}"

    assert await retry(fetch, 3, "BTCUSDT", retry_on=(Flaky, OSError)) == "BTCUSDTx3"
    assert seen == [(3, "BTCUSDT"), (3, "BTCUSDT")]


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"attempts": 0}, ValueError, "attempts must be >= 1, got 0"),
        ({"attempts": 2.0}, TypeError, "attempts must be an int"),
        ({"retry_on": KeyboardInterrupt}, TypeError, "retry_on must be Exception types"),
        ({"retry_on": (Flaky, "x")}, TypeError, "retry_on must be Exception types"),
        ({"retry_on": ()}, TypeError, "retry_on must be Exception types"),
        ({"retry_on": 3}, TypeError, "retry_on must be Exception types or a predicate"),
        ({"backoff": 1.0}, TypeError, "backoff must be an engine.Backoff"),
        ({"max_retry_after": -1}, ValueError, "max_retry_after must be >= 0"),
        ({"name": ""}, ValueError, "name"),
    ],
)
def test_bad_settings_are_refused_naming_the_setting(
    kwargs: dict[str, object], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=re.escape(message)):
        Retrying(**kwargs)  # type: ignore[arg-type]  # deliberately wrong types


async def test_statistics_are_exported_on_metrics() -> None:
    policy = Retrying(attempts=4, name="quotes")
    registry = CollectorRegistry()
    registry.register(EngineCollector(None, {"quotes": policy}, None))
    text = generate_latest(registry).decode()
    assert 'engine_retry_attempts_total{retry="quotes"} 0.0' in text
    assert 'engine_retry_retries_total{retry="quotes"} 0.0' in text
    assert 'engine_retry_waited_seconds_total{retry="quotes"} 0.0' in text
    assert 'engine_retry_attempts_limit{retry="quotes"} 4.0' in text
    assert "last_error" not in text
    assert lint(text) == []


# --- Retry-After ----------------------------------------------------------------


async def test_retry_after_in_seconds_sets_the_wait(autojump_clock: trio.testing.MockClock) -> None:
    script = Script(failures=2, error=lambda: http_error(429, **{"Retry-After": "7"}))
    policy = Retrying(attempts=3, backoff=EXACT, full_jitter=False, retry_on=transient_http_error)
    await policy.call(script)
    assert script.calls == [0, 7, 14]
    assert policy.statistics().retry_after_waits == 2


async def test_retry_after_as_an_http_date_is_read_from_the_wall_clock(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # 1_700_000_000 is Tue, 14 Nov 2023 22:13:20 GMT; the server asks for 22:13:32.
    date = "Tue, 14 Nov 2023 22:13:32 GMT"
    script = Script(failures=1, error=lambda: http_error(503, **{"Retry-After": date}))
    policy = Retrying(
        attempts=2,
        retry_on=transient_http_error,
        wall_clock=lambda: 1_700_000_000 + trio.current_time(),
    )
    await policy.call(script)
    assert script.calls == [0, 12]


async def test_retry_after_is_capped_and_still_inside_the_enclosing_scope(
    autojump_clock: trio.testing.MockClock,
) -> None:
    script = Script(failures=5, error=lambda: http_error(429, **{"Retry-After": "3600"}))
    policy = Retrying(attempts=5, max_retry_after=30, retry_on=transient_http_error)
    with trio.move_on_after(45) as scope:
        await policy.call(script)
    assert scope.cancelled_caught
    assert script.calls == [0, 30]


async def test_max_retry_after_zero_ignores_the_header(
    autojump_clock: trio.testing.MockClock,
) -> None:
    script = Script(failures=1, error=lambda: http_error(429, **{"Retry-After": "60"}))
    policy = Retrying(attempts=2, backoff=EXACT, full_jitter=False, max_retry_after=0)
    await policy.call(script)
    assert script.calls == [0, 1]


@pytest.mark.parametrize(
    ("error", "seconds"),
    [
        (http_error(429, **{"Retry-After": "5"}), 5.0),
        (http_error(503, **{"Retry-After": " 0 "}), 0.0),
        (http_error(503, **{"Retry-After": "Tue, 14 Nov 2023 22:13:30 GMT"}), 10.0),
        (http_error(503, **{"Retry-After": "Tue, 14 Nov 2023 22:13:30 -0000"}), 10.0),
        (http_error(503, **{"Retry-After": "Tue, 14 Nov 2023 22:00:00 GMT"}), 0.0),  # past
        (http_error(503, **{"Retry-After": "soon"}), None),
        (http_error(503, **{"Retry-After": "-5"}), None),
        (http_error(500, **{"Retry-After": "5"}), None),  # only 429 and 503 carry one
        (http_error(429), None),
        (Flaky(), None),
    ],
)
def test_retry_after_seconds_reads_what_the_server_asked(
    error: Exception, seconds: float | None
) -> None:
    assert retry_after_seconds(error, lambda: 1_700_000_000.0) == seconds


@pytest.mark.parametrize(
    ("error", "transient"),
    [
        (httpx.ConnectError("refused"), True),
        (httpx.ReadTimeout("slow"), True),
        (httpx.RemoteProtocolError("dropped"), True),
        (http_error(429), True),
        (http_error(503), True),
        (http_error(504), True),
        (http_error(400), False),
        (http_error(404), False),
        (httpx.UnsupportedProtocol("ftp"), False),
        (ValueError("bug"), False),
    ],
)
def test_transient_http_errors(error: Exception, transient: bool) -> None:
    assert transient_http_error(error) is transient


# --- the page's example -------------------------------------------------------------


def _quoted(fence: str) -> list[str]:
    text = (ROOT / "docs" / "resilience.md").read_text()
    return [block.strip() for block in re.findall(rf"```{fence}\n(.*?)```", text, re.DOTALL)]


@pytest.mark.subprocess
def test_the_resilience_example_prints_what_the_page_shows() -> None:
    example = ROOT / "docs" / "examples" / "resilience_example.py"
    assert example.read_text().strip() in _quoted("python")
    result = subprocess.run(
        [sys.executable, str(example)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    [output] = [block for block in _quoted("text") if block.startswith("t=")]
    assert result.stdout.strip() == output


async def test_a_retried_http_errors_query_and_password_stay_out_of_logs_and_statistics(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    url = "https://user:hunter2@api.example.com/v3/quotes?symbols=A&signature=s3cret"
    request = httpx.Request("GET", url)

    async def refused() -> None:
        response = httpx.Response(503, request=request)
        raise httpx.HTTPStatusError(
            f"Server error '503' for url '{url}'", request=request, response=response
        )

    retrying = engine.Retrying(attempts=2, name="quotes")
    with caplog.at_level(logging.INFO), pytest.raises(httpx.HTTPStatusError):
        await retrying.call(refused)
    last_error = retrying.statistics().last_error
    assert last_error is not None
    for text in (caplog.text, last_error):
        assert "s3cret" not in text
        assert "hunter2" not in text
    assert "https://user:***@api.example.com/v3/quotes?…" in last_error
