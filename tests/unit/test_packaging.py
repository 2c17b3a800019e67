"""
The oldest versions `make test-oldest` installs (ci/oldest-constraints.txt) are exactly the
lower bounds setup.cfg declares, so the unit tests run at both ends of the supported range.
"""

from __future__ import annotations

import configparser
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).parents[2]


def _lower_bounds() -> dict[str, Version]:
    setup = configparser.ConfigParser()
    setup.read(ROOT / "setup.cfg")
    bounds = {}
    for line in setup["options"]["install_requires"].split("\n"):
        if not line.strip():
            continue
        requirement = Requirement(line.strip())
        [minimum] = [s.version for s in requirement.specifier if s.operator == ">="]
        bounds[canonicalize_name(requirement.name)] = Version(minimum)
    return bounds


def _pins() -> dict[str, Version]:
    pins = {}
    for line in (ROOT / "ci" / "oldest-constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            requirement = Requirement(line)
            [pin] = [s.version for s in requirement.specifier if s.operator == "=="]
            pins[canonicalize_name(requirement.name)] = Version(pin)
    return pins


def test_the_oldest_constraints_pin_every_lower_bound_of_setup_cfg() -> None:
    bounds = _lower_bounds()
    assert len(bounds) == 8, "every run-time dependency has a lower bound"
    assert _pins() == bounds
