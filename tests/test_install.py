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


def undeclared_imports(files, declared: set[str], root=REPO) -> dict[str, list[str]]:
    """Third-party modules imported at module level by ``files`` whose distribution is not in
    ``declared`` (normalised names): what a fresh ``pip install -e .[dev]`` may lack. The standard
    library, this project's packages and modules lying next to the importing file do not count."""
    import ast
    import sys
    from importlib.metadata import packages_distributions

    distributions = packages_distributions()
    missing: dict[str, list[str]] = {}
    for path in files:
        for node in ast.parse(path.read_text()).body:  # module level: optional extras import inside functions
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for top in {name.split(".")[0] for name in names}:
                if top in sys.stdlib_module_names or top in ("__future__", "steer", "experiments", "tests") \
                        or (path.parent / f"{top}.py").exists():
                    continue
                owners = {_normalise(d) for d in distributions.get(top, [top])}
                if not owners & declared:
                    missing.setdefault(top, []).append(str(path.relative_to(root)))
    return missing


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_every_module_level_import_is_a_declared_dependency(tmp_path):
    declared = {_normalise(re.match(r"[A-Za-z0-9_.-]+", r)[0]) for r in PROJECT["dependencies"] + PROJECT["optional-dependencies"]["dev"]}
    files = [*(REPO / "src").rglob("*.py"), *(REPO / "experiments").rglob("*.py"), *(REPO / "tests").rglob("*.py")]
    assert undeclared_imports(files, declared) == {}
    probe = tmp_path / "probe.py"  # the rule itself: scipy undeclared is found, an import inside a function is not
    probe.write_text("import os\nimport scipy.stats\nfrom yaml import safe_load\n\ndef f():\n    import vllm\n")
    assert undeclared_imports([probe], declared - {"scipy"}, root=tmp_path) == {"scipy": ["probe.py"]}


def _make_install_calls(tmp_path, index_answers: bool, *variables: str) -> list[list[str]]:
    """The pip commands `make install` runs, with a stand-in Python that records them (no network);
    the PyTorch index "answers" or fails as told."""
    import shlex
    import subprocess

    log = tmp_path / "calls.txt"
    fake = tmp_path / "python"
    fake.write_text(f"#!/bin/sh\necho \"$*\" >> {shlex.quote(str(log))}\n"
                    + ("" if index_answers else 'case "$*" in *--index-url*) exit 1;; esac\n') + "exit 0\n")
    fake.chmod(0o755)
    result = subprocess.run(["make", "--no-print-directory", "install", f"PYTHON={fake}", *variables], cwd=REPO,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return [line.split() for line in log.read_text().splitlines()]


def test_make_install_takes_cpu_torch_from_the_pytorch_index_and_falls_back_fast(tmp_path):
    first = _make_install_calls(tmp_path, index_answers=True)
    assert first[0] == ["-m", "pip", "install", "--quiet", "--timeout", "10", "--retries", "0",
                        "--index-url", "https://download.pytorch.org/whl/cpu", "torch==2.13.0"]
    assert first[1:] == [["-m", "pip", "install", "--quiet", "-e", ".[dev]"]]
    (tmp_path / "calls.txt").unlink()
    rest = _make_install_calls(tmp_path, index_answers=False)  # unreachable: one fast try, then the configured index
    assert rest[0][:8] == first[0][:8] and rest[1:] == [["-m", "pip", "install", "--quiet", "torch==2.13.0"],
                                                         ["-m", "pip", "install", "--quiet", "-e", ".[dev]"]]
    (tmp_path / "calls.txt").unlink()
    assert _make_install_calls(tmp_path, True, "TORCH_INDEX=")[0] == ["-m", "pip", "install", "--quiet", "torch==2.13.0"]
