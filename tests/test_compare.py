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
                    Metric("eval/arithmetic/entropy", 0.3, 0, 4),
                    Metric("eval/arithmetic/distinct_solutions", 4.0, 0, 0),
                    Metric("eval/arithmetic/distinct_solutions", 3.0 - 0.5 * seed, 0, 4)]
        client.log_batch(run_id, metrics=metrics, params=params)
        client.set_terminated(run_id)
    return uri


def test_table_and_plots(store, tmp_path):
    out = tmp_path / "out"
    paths = compare(["--tracking-uri", store, "--out", str(out)])
    assert {p.name for p in paths} == {"comparison.md", "comparison.csv", "entropy_curves.png", "accuracy_curves.png",
                                       "diversity_curves.png"}
    rows = {(r["method"], r["column"]): r for r in csv.DictReader((out / "comparison.csv").open())}
    grpo = rows[("grpo", "eval/arithmetic/mean_at_4")]
    half_width = stats.t.ppf(0.975, 2) * 0.1 / math.sqrt(3)  # sample std of 0.5, 0.6, 0.7 is 0.1
    assert float(grpo["mean"]) == pytest.approx(0.6)
    assert float(grpo["ci95"]) == pytest.approx(half_width)
    assert int(grpo["n"]) == 3
    assert float(rows[("steer", "eval/arithmetic/mean_at_4")]["mean"]) == pytest.approx(0.6)
    assert float(rows[("grpo", "actor/entropy (start)")]["mean"]) == pytest.approx(1.02)
    assert float(rows[("grpo", "actor/entropy (end)")]["mean"]) == pytest.approx(0.62)
    assert float(rows[("grpo", "eval/arithmetic/distinct_solutions")]["mean"]) == pytest.approx(2.0)  # 2.5, 2.0, 1.5
    markdown = (out / "comparison.md").read_text()
    grpo_row = next(line for line in markdown.splitlines() if line.startswith("| grpo |"))
    assert grpo_row.startswith("| grpo | 2.000 ± ") and f"| 0.600 ± {half_width:.3f} (n=3) |" in grpo_row
    assert "eval/arithmetic/entropy (end)" in markdown


def test_filter_and_single_seed(store, tmp_path):
    out = tmp_path / "filtered"
    compare(["--tracking-uri", store, "--out", str(out), "--filter", "params.seed = '1'", "--methods", "steer", "grpo",
             "--extra-mean", "reward/accuracy"])
    lines = (out / "comparison.md").read_text().splitlines()
    table = [line for line in lines if line.startswith("| steer") or line.startswith("| grpo")]
    assert table[0].startswith("| steer | 2.500 (n=1) | 0.550 (n=1)")  # one seed: no CI, rows in the order asked
    assert table[1].startswith("| grpo | 2.500 (n=1) | 0.500 (n=1)")
    assert "reward/accuracy (run mean)" in lines[2] and table[1].endswith("| 0.200 (n=1) |")  # mean of 0..0.4


def test_unknown_experiment_is_an_error(store, tmp_path):
    with pytest.raises(SystemExit, match="no runs"):
        compare(["--tracking-uri", store, "--experiment", "nope", "--out", str(tmp_path / "x")])


@pytest.fixture(scope="module")
def paper_store(store):
    """Two estimators x one intervention, AIME24 and MATH500 evaluated at steps 0, 10, 20 (experiment
    "paper" in the same sqlite file: creating a store costs seconds)."""
    uri = store
    client = mlflow.MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("paper")
    aime = {"grpo": [0.10, 0.30, 0.20], "rloo": [0.10, 0.15, 0.25]}   # best at step 10 / step 20
    math500 = {"grpo": [0.50, 0.70, 0.80], "rloo": [0.50, 0.60, 0.65]}
    for estimator in ("grpo", "rloo"):
        for seed in (1, 2):
            run_id = client.create_run(experiment, run_name=f"steer_seed{seed}").info.run_id
            params = [Param("intervention.name", "steer"), Param("algorithm.estimator", estimator), Param("seed", str(seed))]
            metrics = []
            for i, step in enumerate((0, 10, 20)):
                metrics += [Metric("eval/aime24/mean_at_32", aime[estimator][i] + 0.01 * seed, 0, step),
                            Metric("eval/math500/mean_at_1", math500[estimator][i], 0, step),
                            Metric("eval/math500/entropy", 0.1 * i, 0, step)]
            client.log_batch(run_id, metrics=metrics, params=params)
    return uri


def test_select_by_best_aime24_and_label_by_estimator(paper_store, tmp_path):
    out = tmp_path / "paper"
    compare(["--tracking-uri", paper_store, "--experiment", "paper", "--out", str(out), "--select-by", "eval/aime24/mean_at_32",
             "--label-by", "algorithm.estimator", "intervention.name"])
    rows = {(r["method"], r["column"]): r for r in csv.DictReader((out / "comparison.csv").open())}
    assert float(rows[("grpo / steer", "selected step")]["mean"]) == 10  # AIME24 peaks at step 10 ...
    assert float(rows[("grpo / steer", "eval/math500/mean_at_1")]["mean"]) == pytest.approx(0.70)  # ... not the last 0.80
    assert float(rows[("grpo / steer", "eval/aime24/mean_at_32")]["mean"]) == pytest.approx(0.315)
    assert float(rows[("rloo / steer", "selected step")]["mean"]) == 20
    assert float(rows[("rloo / steer", "eval/math500/mean_at_1")]["mean"]) == pytest.approx(0.65)
    assert float(rows[("rloo / steer", "eval/math500/entropy (selected)")]["mean"]) == pytest.approx(0.2)
    assert "best eval/aime24/mean_at_32" in (out / "comparison.md").read_text()
    # without --select-by: the last evaluation, one row per intervention name (both estimators pooled)
    compare(["--tracking-uri", paper_store, "--experiment", "paper", "--out", str(tmp_path / "last")])
    last = {(r["method"], r["column"]): r for r in csv.DictReader((tmp_path / "last" / "comparison.csv").open())}
    assert float(last[("steer", "eval/math500/mean_at_1")]["mean"]) == pytest.approx((0.80 + 0.65) / 2)
    assert int(last[("steer", "eval/math500/mean_at_1")]["n"]) == 4


def test_select_by_leaves_out_runs_without_the_metric(paper_store, tmp_path):
    with pytest.raises(SystemExit, match="no runs"):
        compare(["--tracking-uri", paper_store, "--experiment", "paper", "--out", str(tmp_path / "x"),
                 "--select-by", "eval/nope/mean_at_1"])
    from experiments.compare import best_step

    assert best_step([(0, 0.2), (10, 0.5), (20, 0.5)]) == 10  # ties: the earliest
    assert best_step([(0, 0.2), (10, 0.5)], "min") == 0


def test_paired_against_grpo_matches_a_paired_t_interval(store, tmp_path):
    """Per-seed differences against scipy's paired t-test interval; unpaired seeds are left out."""
    from experiments.compare import RunData, paired_differences

    grpo, steer = [0.50, 0.60, 0.70], [0.60, 0.80, 1.10]        # differences 0.1, 0.2, 0.4
    runs = [RunData("grpo", str(seed), {"acc": g, "h": 0.2}) for seed, g in zip((1, 2, 3), grpo)]
    runs += [RunData("steer", str(seed), {"acc": s, "h": 0.3}) for seed, s in zip((1, 2, 3), steer)]
    runs.append(RunData("steer", "9", {"acc": 5.0, "h": 5.0}))  # no grpo run with seed 9: not paired
    methods, columns, cells = paired_differences(runs, "grpo")
    assert methods == ["steer"] and set(columns) == {"acc", "h"}
    mean, ci, n, differences = cells[("steer", "acc")]
    reference = stats.ttest_rel(steer, grpo).confidence_interval(0.95)
    assert n == 3 and differences == pytest.approx([0.1, 0.2, 0.4])
    assert mean == pytest.approx((reference.low + reference.high) / 2)
    assert ci == pytest.approx((reference.high - reference.low) / 2)
    assert cells[("steer", "h")][:3] == pytest.approx((0.1, 0.0, 3))
    with pytest.raises(ValueError, match="no runs of the baseline 'rloo'"):
        paired_differences(runs, "rloo")
    with pytest.raises(ValueError, match="two 'grpo' runs with seed 1"):
        paired_differences(runs + [RunData("grpo", "1", {"acc": 0.0})], "grpo")

    # through the command line, on the store: steer ran seeds 1 and 2 (+0.05 each), the late mean joins the table
    out = tmp_path / "paired"
    paths = compare(["--tracking-uri", store, "--out", str(out), "--paired-against", "grpo"])
    assert {"paired.md", "paired.csv"} <= {p.name for p in paths}
    rows = {(r["method"], r["column"]): r for r in csv.DictReader((out / "paired.csv").open())}
    assert set(r[0] for r in rows) == {"steer"}
    assert float(rows[("steer", "eval/arithmetic/mean_at_4")]["mean"]) == pytest.approx(0.05)
    assert int(rows[("steer", "eval/arithmetic/mean_at_4")]["n"]) == 2
    assert "| steer | +0.000 ± 0.000 (n=2) | +0.050 ± 0.000 (n=2) |" in (out / "paired.md").read_text()  # orders, mean@4
    table_rows = {(r["method"], r["column"]): r for r in csv.DictReader((out / "comparison.csv").open())}
    assert float(table_rows[("grpo", "actor/entropy (late mean)")]["mean"]) == pytest.approx(0.82)  # 5 steps < LATE_STEPS
    with pytest.raises(SystemExit, match="--paired-against: no runs of the baseline 'nope'"):
        compare(["--tracking-uri", store, "--out", str(tmp_path / "bad"), "--paired-against", "nope"])


def test_study_trajectory_tables(store, tmp_path):
    """experiments/study/trajectory.py: eval metrics by step and the entropy's early/late slopes."""
    from experiments.study.trajectory import main as trajectory, quarter_slopes, slope_per_100

    assert slope_per_100([(0, 1.0), (10, 0.9), (20, 0.8)]) == pytest.approx(-1.0)
    history = [(s, 1.0 - 0.01 * s) for s in range(50)] + [(s, 0.5) for s in range(50, 100)]
    early, late = quarter_slopes(history)
    assert early == pytest.approx(-1.0) and late == pytest.approx(0.0, abs=1e-12)  # flattened
    text = trajectory(["--tracking-uri", store, "--metrics", "eval/arithmetic/mean_at_4"])
    lines = text.splitlines()
    assert "| arm | n | step 0 | step 4 |" in lines
    # grpo seeds: 0.2 at step 0 for all, then 0.5 / 0.6 / 0.7 at step 4
    half = stats.t.ppf(0.975, 2) * 0.1 / math.sqrt(3)
    assert f"| grpo | 3 | 0.200 ± 0.000 | 0.600 ± {half:.3f} |" in lines
    # training entropy falls 0.1 per step in every run: -10 per 100 steps early and late, ratio 1
    assert "| grpo | 3 | -10.000 ± 0.000 | -10.000 ± 0.000 | 1.000 ± 0.000 |" in lines
