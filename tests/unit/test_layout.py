"""
Every module of the package names, on its first line, the test modules that test it
(C{# -*- test-case-name: tests.unit.test_x -*-}, as Twisted's trial reads it), and every
module named exists: a tag pointing nowhere sends whoever changes the module to no tests.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "persistproxy"
TAG = re.compile(r"^# -\*- test-case-name: ([\w.]+(?:\s*,\s*[\w.]+)*) -\*-$")

#: Package markers and the twistd dropin: no code of their own to test.
UNTAGGED = {"__init__.py", "persistproxy_builtin.py"}


def _modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if p.name not in UNTAGGED)


def test_the_package_has_modules() -> None:
    assert len(_modules()) > 20


@pytest.mark.parametrize("module", _modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_the_first_line_names_test_modules_that_exist(module: Path) -> None:
    first = module.read_text().split("\n", 1)[0]
    match = TAG.match(first)
    assert match, f"{module.relative_to(ROOT)}: first line is not a test-case-name tag: {first!r}"
    for name in re.split(r"\s*,\s*", match.group(1)):
        path = ROOT.joinpath(*name.split(".")).with_suffix(".py")
        assert path.is_file(), f"{module.relative_to(ROOT)} names {name}, which does not exist"
