"""experiments/compare.py on a small MLflow store made here: the table's numbers, the filter, the plots."""

from __future__ import annotations

import csv
import math

import mlflow
import pytest
from mlflow.entities import Metric, Param
from scipy import stats

from experiments.compare import main as compare

ACCURACY = {("grpo", 1): 0.50, ("grpo", 2): 0.60, ("grpo", 3): 0.70, ("steer", 1): 0.55, ("steer", 2): 0.65}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    uri = f"sqlite:///{tmp_path_factory.mktemp('store')}/mlflow.db"
    client = mlflow.MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("steer-lab")
    for (method, seed), accuracy in ACCURACY.items():
        run = client.create_run(experiment, run_name=f"{method}_seed{seed}")
        run_id = run.info.run_id
        params = [Param("intervention.name", method), Param("seed", str(seed))]
        metrics = [Metric("actor/entropy", 1.0 - 0.1 * step + 0.01 * seed, 0, step) for step in range(5)]
        metrics += [Metric("reward/accuracy", 0.1 * step, 0, step) for step in range(5)]
        metrics += [Metric("eval/arithmetic/mean_at_4", 0.2, 0, 0),
                    Metric("eval/arithmetic/mean_at_4", accuracy, 0, 4),  # the last step counts
                    Metric("eval/arithmetic/entropy", 0.3, 0, 4)]
        client.log_batch(run_id, metrics=metrics, params=params)
        client.set_terminated(run_id)
    return uri


def test_table_and_plots(store, tmp_path):
    out = tmp_path / "out"
    paths = compare(["--tracking-uri", store, "--out", str(out)])
    assert {p.name for p in paths} == {"comparison.md", "comparison.csv", "entropy_curves.png", "accuracy_curves.png"}
    rows = {(r["method"], r["column"]): r for r in csv.DictReader((out / "comparison.csv").open())}
    grpo = rows[("grpo", "eval/arithmetic/mean_at_4")]
    half_width = stats.t.ppf(0.975, 2) * 0.1 / math.sqrt(3)  # sample std of 0.5, 0.6, 0.7 is 0.1
    assert float(grpo["mean"]) == pytest.approx(0.6)
    assert float(grpo["ci95"]) == pytest.approx(half_width)
    assert int(grpo["n"]) == 3
    assert float(rows[("steer", "eval/arithmetic/mean_at_4")]["mean"]) == pytest.approx(0.6)
    assert float(rows[("grpo", "actor/entropy (start)")]["mean"]) == pytest.approx(1.02)
    assert float(rows[("grpo", "actor/entropy (end)")]["mean"]) == pytest.approx(0.62)
    markdown = (out / "comparison.md").read_text()
    assert f"| grpo | 0.600 ± {half_width:.3f} (n=3)" in markdown
    assert "eval/arithmetic/entropy (end)" in markdown


def test_filter_and_single_seed(store, tmp_path):
    out = tmp_path / "filtered"
    compare(["--tracking-uri", store, "--out", str(out), "--filter", "params.seed = '1'", "--methods", "steer", "grpo",
             "--extra-mean", "reward/accuracy"])
    lines = (out / "comparison.md").read_text().splitlines()
    table = [line for line in lines if line.startswith("| steer") or line.startswith("| grpo")]
    assert table[0].startswith("| steer | 0.550 (n=1)")  # one seed: no CI, rows in the order asked
    assert table[1].startswith("| grpo | 0.500 (n=1)")
    assert "reward/accuracy (run mean)" in lines[2] and table[1].endswith("| 0.200 (n=1) |")  # mean of 0..0.4


def test_unknown_experiment_is_an_error(store, tmp_path):
    with pytest.raises(SystemExit, match="no runs"):
        compare(["--tracking-uri", store, "--experiment", "nope", "--out", str(tmp_path / "x")])

