"""The seams hold: code outside the engine uses its public names, and the
market service's parts use each other's public names.

Read from the source with :mod:`ast`, so an import inside a function or under
``TYPE_CHECKING`` counts as much as one at the top. The tests themselves may
reach into private modules (they are white-box tests of those modules); the
service, the benchmarks and the docs' examples may not. A part of the market
service may use the private modules of ``services.market`` itself (its
events, its settings, its symbol checks): they are shared by the parts, and
are the parts' common parent's, not another part's.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MARKET = ROOT / "services" / "market"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path, source: str | None = None) -> Iterator[tuple[int, str]]:
    """``(line, absolute module)`` of every import in a file, names imported from it included."""
    tree = ast.parse(source if source is not None else path.read_text(), str(path))
    # What a relative import is relative to: the package itself for its __init__.
    package = _module_name(path)
    if path.name != "__init__.py":
        package = package.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            yield node.lineno, base
            for alias in node.names:
                yield node.lineno, f"{base}.{alias.name}"


def _private(dotted: str) -> str | None:
    """The first private part of a dotted name (``_x``, not ``__init__``), if any."""
    for part in dotted.split("."):
        if part.startswith("_") and not part.startswith("__"):
            return part
    return None


def _outside_engine() -> Iterator[Path]:
    for folder in ("services", "benchmarks", "docs"):
        yield from sorted((ROOT / folder).rglob("*.py"))


def test_nothing_outside_the_engine_imports_its_private_modules() -> None:
    found = [
        f"{path.relative_to(ROOT)}:{line}: {name}"
        for path in _outside_engine()
        for line, name in _imports(path)
        if name.startswith("engine.") and _private(name) is not None
    ]
    assert found == []


_FENCE = re.compile(r"```python\n(.*?)```", re.DOTALL)


def test_the_docs_code_blocks_use_public_names_only() -> None:
    found = []
    for page in sorted((ROOT / "docs").glob("*.md")):
        for block in _FENCE.findall(page.read_text()):
            try:
                names = list(_imports(page.with_suffix(".py"), block))
            except SyntaxError:
                continue  # a fragment, not a program
            found += [f"{page.name}: {n}" for _, n in names if n.startswith("engine._")]
    assert found == []


def _subpackage(module: str) -> str | None:
    """``services.market.<part>`` for a module inside a part of the service, else None."""
    parts = module.split(".")
    return ".".join(parts[:3]) if len(parts) >= 3 and parts[:2] == ["services", "market"] else None


def test_no_part_of_the_market_service_imports_another_parts_private_modules() -> None:
    found = []
    for path in sorted(MARKET.rglob("*.py")):
        mine = _subpackage(_module_name(path))
        for line, name in _imports(path):
            theirs = _subpackage(name)
            if theirs is None or theirs == mine:
                continue
            # Below the part's package, anything private is its own business.
            if _private(name.removeprefix(theirs)) is not None:
                found.append(f"{path.relative_to(ROOT)}:{line}: {name}")
    assert found == []


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("from engine._batch import map_batch", ["engine._batch"]),
        ("import engine._watchdog", ["engine._watchdog"]),
        ("from engine import lowlevel", []),
        ("def f():\n    from engine._names import describe_error", ["engine._names"]),
    ],
)
def test_the_import_check_sees_private_imports(source: str, expected: list[str]) -> None:
    names = [n for _, n in _imports(ROOT / "services" / "x.py", source)]
    assert [n for n in names if _private(n) is not None and n.startswith("engine")][:1] == expected
