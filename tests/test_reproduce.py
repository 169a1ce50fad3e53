"""experiments/paper/reproduce.py: the commands of every paper table compose, and one table runs end
to end with the tiny model (slow) and lands as a table with the best-AIME24 selection."""

from __future__ import annotations

import csv
import itertools
import os
import subprocess
import sys

import pytest

from experiments.paper.reproduce import BASELINES, TABLES, commands
from tests.conftest import CONF, REPO, SHARED_DATA, compose
from tests.test_experiments import tiny_overrides


def sweep_overrides(command: list[str]) -> list[list[str]]:
    """The jobs of one ``src/run.py -m`` command, as plain override lists (comma sweeps expanded)."""
    overrides = [a for a in command[2:] if a != "-m" and not a.startswith("hydra.")]
    choices = [[f"{a.split('=', 1)[0]}={v}" for v in a.split("=", 1)[1].split(",")] if "," in a else [a] for a in overrides]
    return [list(job) for job in itertools.product(*choices)]


def test_every_table_names_existing_experiments_and_presets(tmp_path):
    for name, table in TABLES.items():
        for experiment, presets in table.parts:
            assert (CONF / "experiment" / f"{experiment}.yaml").is_file(), (name, experiment)
            assert all((CONF / "intervention" / f"{p}.yaml").is_file() for p in presets), (name, presets)
    main_rows = {(e, p) for e, presets in TABLES["main"].parts for p in presets}
    assert {("steer_math", p) for p in BASELINES} <= main_rows
    assert {("steer_math_rloo", "steer"), ("steer_math_opo", "steer")} <= main_rows
    with pytest.raises(SystemExit, match="unknown table"):
        commands("nope", "1", tmp_path)
    with pytest.raises(SystemExit, match="no row"):
        commands("main", "1", tmp_path, rows=["nope"])


@pytest.mark.parametrize("table", sorted(TABLES))
def test_table_commands_compose(table, tmp_path, monkeypatch):
    monkeypatch.setenv("STEER_DATA_DIR", str(SHARED_DATA))
    todo = commands(table, "1,2", tmp_path / "out", extra=["algorithm.steps=3"])
    assert [c[3] for c in todo] == [f"+experiment={e}" for e, _ in TABLES[table].parts]
    for command, (experiment, presets) in zip(todo, TABLES[table].parts):
        jobs = sweep_overrides(command)
        assert len(jobs) == 2 * len(presets) and command[-2] == f"hydra.sweep.dir={tmp_path / 'out' / experiment}"
        cfg = compose(jobs[-1], tmp_path)  # one job per multirun: the others differ only in seed/preset
        assert (cfg.intervention.name, cfg.seed, cfg.algorithm.steps) == (presets[-1], 2, 3)


@pytest.mark.slow
def test_extreme_table_end_to_end_with_the_tiny_model(tmp_path):
    """`reproduce.py --table extreme` on two rows, 2 RL steps each: two runs, one table."""
    tiny = [o for o in tiny_overrides("steer_math_extreme", tmp_path)[1:] if o != "logger=none"]
    tiny += ["eval.benchmarks.aime24.samples_per_prompt=32"]  # the selection metric is mean_at_32
    out = tmp_path / "extreme"
    env = {**os.environ, "STEER_DATA_DIR": str(SHARED_DATA), "STEER_CACHE": str(tmp_path / "cache"),
           "PYTHONPATH": f"{REPO / 'src'}{os.pathsep}{REPO}"}
    done = subprocess.run([sys.executable, str(REPO / "experiments" / "paper" / "reproduce.py"), "--table", "extreme",
                           "--rows", "grpo_extreme,steer_extreme", "--out", str(out), "--", *tiny],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {(r["method"], r["column"]): r for r in csv.DictReader((out / "table" / "comparison.csv").open())}
    for method in ("grpo_extreme", "steer_extreme"):
        assert int(rows[(method, "eval/aime24/mean_at_32")]["n"]) == 1
        assert float(rows[(method, "selected step")]["mean"]) in (0.0, 2.0)
    assert "best eval/aime24/mean_at_32" in (out / "table" / "comparison.md").read_text()
