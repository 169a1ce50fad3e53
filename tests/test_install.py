"""What `make install` asks pip for: extras under the spelling their metadata uses, and antlr 4.9.3."""

from __future__ import annotations

import re
import tomllib
from importlib.metadata import PackageNotFoundError, metadata, version

import pytest

from tests.conftest import REPO

PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
REQUIREMENTS = PROJECT["dependencies"] + [r for extra in PROJECT["optional-dependencies"].values() for r in extra]


def unprovided_extras(requirements: list[str]) -> list[str]:
    """``name[extra]`` requests whose installed ``name`` does not list ``extra`` literally (pip < 24
    drops those with a warning, e.g. math-verify 0.9 spells ``antlr4-9-3``, not ``antlr4_9_3``)."""
    missing = []
    for requirement in requirements:
        match = re.match(r"([A-Za-z0-9_.-]+)\[([^\]]+)\]", requirement)
        if not match:
            continue
        try:
            provided = metadata(match[1]).get_all("Provides-Extra") or []
        except PackageNotFoundError:
            continue
        missing += [f"{match[1]}[{e.strip()}]" for e in match[2].split(",") if e.strip() not in provided]
    return missing


def test_every_requested_extra_is_provided_as_spelled():
    assert unprovided_extras(REQUIREMENTS) == []
    assert unprovided_extras(["math-verify[antlr4_9_3]"]) == ["math-verify[antlr4_9_3]"]  # the old spelling
    assert unprovided_extras(["math-verify[antlr4-9-3]"]) == []


def test_antlr_is_the_version_hydra_needs():
    assert "antlr4-python3-runtime==4.9.3" in PROJECT["dependencies"]
    assert version("antlr4-python3-runtime") == "4.9.3"


def test_the_readme_test_numbers_come_from_a_command():
    from experiments.benchmarks.test_suite_numbers import summarise

    assert summarise("x\n==== 447 passed, 3 skipped, 1 warning in 171.20s (0:02:51) ====\n") == (
        "447 passed, 3 skipped, 1 warning", 171.2)
    assert summarise("2 passed in 4.24s\n") == ("2 passed", 4.24)
    assert "python experiments/benchmarks/test_suite_numbers.py" in (REPO / "README.md").read_text()


@pytest.mark.slow
def test_the_test_numbers_command_on_one_file():
    """The command itself, on one small test file (not the suite: that would recurse)."""
    from experiments.benchmarks.test_suite_numbers import main

    line = main(["tests/test_install.py", "-k", "antlr"])
    assert line.startswith("pytest tests/test_install.py -k antlr: 1 passed, ")
