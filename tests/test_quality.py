"""The code stays ruff- and mypy-clean: run as part of the test suite, so CI enforces it."""

from __future__ import annotations
import __future__

import subprocess
import sys
import types
import typing
from pathlib import Path

import pytest

import engine

ROOT = Path(__file__).resolve().parent.parent


def _run(*command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *command],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


@pytest.mark.subprocess
def test_ruff_check() -> None:
    result = _run("ruff", "check", ".")
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.subprocess
def test_ruff_format() -> None:
    result = _run("ruff", "format", "--check", ".")
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.subprocess
def test_mypy() -> None:
    result = _run("mypy")
    assert result.returncode == 0, result.stdout + result.stderr


def test_public_surface_is_exactly_all() -> None:
    # Submodules, the __future__ import, and the helpers pytest's assertion
    # rewriting adds (the package ships a pytest plugin) are not re-exports.
    public = {
        name
        for name, value in vars(engine).items()
        if not name.startswith(("_", "@"))
        and not isinstance(value, types.ModuleType | __future__._Feature)
    }
    assert public == set(engine.__all__)
    assert engine.__all__ == sorted(engine.__all__)


def test_every_public_name_has_a_docstring() -> None:
    # A ``Literal`` alias cannot carry one: it is documented by its enum.
    missing = [
        name
        for name in engine.__all__
        if typing.get_origin(getattr(engine, name)) is not typing.Literal
        and not getattr(engine, name).__doc__
    ]
    assert missing == []


def test_every_lowlevel_name_and_its_public_members_have_docstrings() -> None:
    import engine.lowlevel

    missing = []
    for name in engine.lowlevel.__all__:
        value = getattr(engine.lowlevel, name)
        if not value.__doc__:
            missing.append(name)
        if isinstance(value, type):
            missing += [
                f"{name}.{member}"
                for member, attribute in vars(value).items()
                if not member.startswith("_")
                and callable(attribute) | isinstance(attribute, property)
                and not attribute.__doc__
            ]
    assert missing == []


def test_each_literal_alias_spells_its_enums_values() -> None:
    aliases = [n for n in engine.__all__ if typing.get_origin(getattr(engine, n)) is typing.Literal]
    assert len(aliases) >= 6
    for name in aliases:
        enum = getattr(engine, name.removesuffix("Name"))
        assert set(typing.get_args(getattr(engine, name))) == {m.value for m in enum}, name
