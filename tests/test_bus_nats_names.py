"""The check that a NATS stream or durable consumer name is one subject token."""

from __future__ import annotations

import pytest

from engine.bus._nats import _check_token


@pytest.mark.parametrize("name", ["MARKET", "market_1", "a-b"])
def test_a_single_token_is_accepted(name: str) -> None:
    _check_token("queue", name)


@pytest.mark.parametrize("name", ["a.b", "a b", "a*", "a>"])
def test_a_name_that_would_split_or_match_subjects_is_refused(name: str) -> None:
    with pytest.raises(ValueError, match=r"^queue must not contain spaces, '\.', '\*' or '>'"):
        _check_token("queue", name)


def test_an_empty_name_is_refused_with_its_parameter_named() -> None:
    with pytest.raises(ValueError, match="stream"):
        _check_token("stream", "")
