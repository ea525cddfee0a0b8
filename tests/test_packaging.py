"""pyproject.toml builds where pip is told to use the setuptools already installed."""

from __future__ import annotations

import re
import sys
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

PYPROJECT = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())


def test_the_build_requires_a_setuptools_that_reads_the_license():
    """`license = "Apache-2.0"` (PEP 639) is refused by setuptools before 77 ("`project.license`
    must be valid exactly by one definition"), which `setuptools>=68` let a build without
    isolation (`pip install --no-build-isolation`, a distribution's build) use."""
    assert isinstance(PYPROJECT["project"]["license"], str)
    (floor,) = (re.fullmatch(r"setuptools>=(\d+)(?:\.\d+)*", requirement)
                for requirement in PYPROJECT["build-system"]["requires"]
                if requirement.startswith("setuptools"))
    assert floor and int(floor.group(1)) >= 77
