"""Paper-style comparison of MLflow runs: method x benchmark table (mean +- 95% CI over seeds) and
overlaid entropy / accuracy curves per intervention.

    python experiments/compare.py --tracking-uri sqlite:///multirun/DATE/TIME/mlflow.db \
        [--tracking-uri sqlite:///another/mlflow.db] --experiment steer-lab \
        [--filter "params.algorithm.steps = '600'"] [--methods grpo steer ...] --out DIR \
        [--select-by eval/aime24/mean_at_32] [--label-by algorithm.estimator intervention.name] \
        [--paired-against grpo]

A run's method is its param ``intervention.name`` (or the params named by ``--label-by``, joined by
" / ") and its seed the param ``seed`` (runs are named ``<intervention>_seed<seed>``). Table
columns: every ``eval/<benchmark>/mean_at_<k>`` (and, where logged, ``pass_at_<j>`` for j > 1,
``distinct_solutions`` and ``solution_entropy``) at the run's last logged step, the training token
entropy (``actor/entropy``) at the first and last step and averaged over the last
``LATE_STEPS`` logged steps (``actor/entropy (late mean)``, steadier than one step), and the held-out entropy
(``eval/<benchmark>/entropy``) at the last evaluation. With ``--select-by METRIC`` the eval columns
are read at the evaluation where METRIC was best instead (checkpoint selection, as the STEER paper
picks the checkpoint with the best AIME24 score), and a ``selected step`` column says which.
The 95% CI is Student's t half-width ``t_{0.975, n-1} s / sqrt(n)`` over the seeds (blank for a
single seed). Writes ``comparison.md``, ``comparison.csv``, ``entropy_curves.png``,
``accuracy_curves.png`` and, where pass@j or solution diversity were logged, ``diversity_curves.png``;
``--paired-against METHOD`` also writes ``paired.md`` / ``paired.csv``: every other method minus
METHOD, run by run on the same seed (same warm-up, prompts and sampling stream when the runs were
seeded alike), mean ± 95% CI over those per-seed differences — the test of "does this arm differ
from the baseline" that unpaired intervals blur with the seeds' own spread.
``--log-artifacts`` also logs them to a run named ``comparison`` of the (first) store, so that a
sweep's overlay plots open in the MLflow UI next to its runs (that run is tagged
``steer.kind=comparison`` and never counted as a method).
"""

from __future__ import annotations

import argparse
import csv
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import mlflow
import numpy as np
from scipy import stats

from steer.tracking import open_store

KIND_TAG, COMPARISON = "steer.kind", "comparison"
EVAL_ACCURACY = re.compile(r"^eval/(?P<benchmark>[^/]+)/mean_at_(?P<k>\d+)$")
# Held-out columns beside mean@k: pass@j for j > 1 (pass_at_1 equals mean@k) and solution diversity.
EVAL_EXTRA = re.compile(r"^eval/[^/]+/(pass_at_(?!1$)\d+|distinct_solutions|solution_entropy)$")
LATE_STEPS = 10
"""Training steps averaged by the ``actor/entropy (late mean)`` column."""


@dataclass
class RunData:
    method: str
    seed: str
    final: dict[str, float]
    """Column name -> value of this run."""
    curves: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    """Metric name -> history, for the overlay plots."""


def method_of(run, label_by: Sequence[str] = ("intervention.name",)) -> str:
    """The run's row label: the values of the params ``label_by``, joined by " / "."""
    params = run.data.params
    if all(key in params for key in label_by):
        return " / ".join(params[key] for key in label_by)
    run_name = run.data.tags.get("mlflow.runName", run.info.run_id)
    return run_name.rsplit("_seed", 1)[0]


def best_step(history: Sequence[tuple[int, float]], mode: str = "max") -> int:
    """The step where ``history`` is best (the earliest of ties): the selected checkpoint."""
    if mode not in ("max", "min"):
        raise ValueError(f"select mode must be 'max' or 'min', got {mode!r}")
    sign = 1.0 if mode == "max" else -1.0
    return max(history, key=lambda point: (sign * point[1], -point[0]))[0]


def collect_runs(tracking_uris: Sequence[str], experiment: str, filter_string: str = "",
                 curve_keys: Sequence[str] = ("actor/entropy", "reward/accuracy"),
                 extra_last: Sequence[str] = (), extra_mean: Sequence[str] = (),
                 select_by: str | None = None, select_mode: str = "max",
                 label_by: Sequence[str] = ("intervention.name",)) -> list[RunData]:
    """Read every run of ``experiment`` in each store, with its table values and curves.

    ``extra_last`` metrics join the table with their last value (column ``<key>``), ``extra_mean``
    ones with their mean over all logged steps (column ``<key> (run mean)``). With ``select_by``,
    the eval columns hold their value at the step where that metric is best (``select_mode``); a
    run that never logged it is left out, with a message.
    """
    runs: list[RunData] = []
    for uri in tracking_uris:
        client = mlflow.MlflowClient(tracking_uri=uri)
        found = client.get_experiment_by_name(experiment)
        if found is None:
            continue
        for run in client.search_runs([found.experiment_id], filter_string=filter_string, max_results=10_000):
            if run.data.tags.get(KIND_TAG) == COMPARISON:  # our own logged comparison, not a method
                continue
            metrics = run.data.metrics
            final: dict[str, float] = {}
            curves: dict[str, list[tuple[int, float]]] = {}
            keys = list(curve_keys) + [k for k in metrics if k.startswith("eval/")]
            for key in dict.fromkeys(keys):
                if key in metrics:
                    curves[key] = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
            selected = None
            if select_by is not None:
                if not curves.get(select_by):
                    print(f"left out run {run.info.run_name or run.info.run_id}: no metric {select_by!r} to select by")
                    continue
                selected = best_step(curves[select_by], select_mode)
                final["selected step"] = float(selected)
            for key, value in metrics.items():
                if selected is not None and key.startswith("eval/"):
                    if selected not in dict(curves[key]):
                        continue  # this benchmark was not evaluated at the selected step
                    value = dict(curves[key])[selected]
                if EVAL_ACCURACY.match(key) or EVAL_EXTRA.match(key):
                    final[key] = value
                elif key.startswith("eval/") and key.endswith("/entropy"):
                    final[f"{key} (end)" if selected is None else f"{key} (selected)"] = value
            for key in extra_last:
                if key in metrics:
                    final[key] = metrics[key]
            for key in extra_mean:
                if key in metrics:
                    history = client.get_metric_history(run.info.run_id, key)
                    final[f"{key} (run mean)"] = float(np.mean([m.value for m in history]))
            if curves.get("actor/entropy"):
                final["actor/entropy (start)"] = curves["actor/entropy"][0][1]
                final["actor/entropy (end)"] = curves["actor/entropy"][-1][1]
                final["actor/entropy (late mean)"] = float(np.mean([v for _, v in curves["actor/entropy"][-LATE_STEPS:]]))
            runs.append(RunData(method_of(run, label_by), run.data.params.get("seed", "?"), final, curves))
    return runs


def mean_and_ci(values: Sequence[float]) -> tuple[float, float]:
    """Mean and the Student-t 95% half-width (NaN for fewer than 2 values)."""
    array = np.asarray(values, dtype=np.float64)
    if array.size == 0:
        return math.nan, math.nan
    if array.size < 2:
        return float(array.mean()), math.nan
    half = stats.t.ppf(0.975, array.size - 1) * array.std(ddof=1) / math.sqrt(array.size)
    return float(array.mean()), float(half)


def table(runs: Sequence[RunData], methods: Sequence[str] | None = None) -> tuple[list[str], list[str], dict]:
    """``(methods, columns, cells)`` with ``cells[(method, column)] = (mean, ci, n, values)``."""
    methods = list(methods or dict.fromkeys(r.method for r in runs))
    accuracy = sorted({c for r in runs for c in r.final if EVAL_ACCURACY.match(c) or EVAL_EXTRA.match(c)})
    entropy = sorted({c for r in runs for c in r.final if not (EVAL_ACCURACY.match(c) or EVAL_EXTRA.match(c))})
    columns = accuracy + entropy
    cells = {}
    for method in methods:
        for column in columns:
            values = [r.final[column] for r in runs if r.method == method and column in r.final]
            cells[(method, column)] = (*mean_and_ci(values), len(values), values)
    return methods, columns, cells


def paired_differences(runs: Sequence[RunData], baseline: str,
                       methods: Sequence[str] | None = None) -> tuple[list[str], list[str], dict]:
    """``(methods, columns, cells)`` with ``cells[(method, column)] = (mean, ci, n, differences)``:
    ``method - baseline`` per seed, over the seeds both ran (each seed's baseline run once)."""
    methods, columns, _ = table(runs, methods)
    base: dict[str, dict[str, float]] = {}
    for run in runs:
        if run.method == baseline:
            if run.seed in base:
                raise ValueError(f"two {baseline!r} runs with seed {run.seed}: a paired difference needs one per seed")
            base[run.seed] = run.final
    if not base:
        raise ValueError(f"no runs of the baseline {baseline!r}; methods: {sorted({r.method for r in runs})}")
    others = [m for m in methods if m != baseline]
    cells = {}
    for method in others:
        for column in columns:
            differences = [r.final[column] - base[r.seed][column] for r in runs
                           if r.method == method and column in r.final and column in base.get(r.seed, {})]
            cells[(method, column)] = (*mean_and_ci(differences), len(differences), differences)
    return others, columns, cells


def write_paired(runs: Sequence[RunData], out: Path, baseline: str, methods: Sequence[str] | None = None,
                 at: str = "the last step") -> tuple[Path, Path]:
    methods, columns, cells = paired_differences(runs, baseline, methods)
    title = (f"Paired difference method − {baseline} per seed, mean ± 95% CI (Student t) over seeds; "
             f"accuracy = held-out mean@k at {at}.")
    return _write_cells(out, "paired", title, methods, columns, cells, signed=True, baseline=baseline)


def _cell(mean: float, ci: float, n: int, signed: bool = False) -> str:
    if n == 0:
        return ""
    value = f"{mean:+.3f}" if signed else f"{mean:.3f}"
    return f"{value} ± {ci:.3f} (n={n})" if math.isfinite(ci) else f"{value} (n={n})"


def write_table(runs: Sequence[RunData], out: Path, methods: Sequence[str] | None = None,
                at: str = "the last step") -> tuple[Path, Path]:
    methods, columns, cells = table(runs, methods)
    title = f"Mean ± 95% CI (Student t) over seeds; accuracy = held-out mean@k at {at}."
    return _write_cells(out, "comparison", title, methods, columns, cells)


def _write_cells(out: Path, stem: str, title: str, methods: Sequence[str], columns: Sequence[str], cells: dict,
                 signed: bool = False, baseline: str | None = None) -> tuple[Path, Path]:
    """``<stem>.md`` (methods x columns) and ``<stem>.csv`` (one row per cell, with its values; a
    ``baseline`` column for paired differences)."""
    markdown = ["| method | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for method in methods:
        markdown.append(f"| {method} | " + " | ".join(_cell(*cells[(method, c)][:3], signed=signed) for c in columns) + " |")
    md_path = out / f"{stem}.md"
    md_path.write_text(title + "\n\n" + "\n".join(markdown) + "\n")
    lead = ["method"] + (["baseline"] if baseline is not None else [])
    csv_path = out / f"{stem}.csv"
    with csv_path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow([*lead, "column", "mean", "ci95", "n", "differences" if baseline is not None else "values"])
        for method in methods:
            for column in columns:
                mean, ci, n, values = cells[(method, column)]
                row = [method] + ([baseline] if baseline is not None else [])
                writer.writerow([*row, column, mean, ci, n, " ".join(f"{v:.6g}" for v in values)])
    return md_path, csv_path


def _mean_curve(curves: list[list[tuple[int, float]]]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Mean, min and max over runs at the steps every run has."""
    common = sorted(set.intersection(*(set(s for s, _ in c) for c in curves)))
    values = np.array([[dict(c)[s] for s in common] for c in curves], dtype=np.float64)
    return np.array(common), values.mean(0), values.min(0), values.max(0)


def plot_curves(runs: Sequence[RunData], out: Path, methods: Sequence[str] | None = None, smooth: int = 10) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(methods or dict.fromkeys(r.method for r in runs))
    accuracy_keys = sorted({k for r in runs for k in r.curves if EVAL_ACCURACY.match(k)})
    panels = [("entropy_curves", ["actor/entropy"] + sorted({k for r in runs for k in r.curves if k.startswith("eval/") and k.endswith("/entropy")})),
              ("accuracy_curves", accuracy_keys + ["reward/accuracy"]),
              ("diversity_curves", sorted({k for r in runs for k in r.curves if EVAL_EXTRA.match(k)}))]
    bases = list(dict.fromkeys(m.replace("_extreme", "") for m in methods))
    colors = {base: plt.cm.tab10(i % 10) for i, base in enumerate(bases)}
    written = []
    for name, keys in panels:
        keys = [k for k in keys if any(k in r.curves for r in runs)]
        if not keys:
            continue
        fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 3.6), squeeze=False)
        for ax, key in zip(axes[0], keys):
            for method in methods:
                curves = [r.curves[key] for r in runs if r.method == method and r.curves.get(key)]
                if not curves:
                    continue
                steps, mean, low, high = _mean_curve(curves)
                if key in ("actor/entropy", "reward/accuracy") and smooth > 1 and mean.size >= smooth:
                    kernel = np.ones(smooth) / smooth
                    pad = lambda v: np.convolve(np.concatenate([np.full(smooth - 1, v[0]), v]), kernel, mode="valid")  # noqa: E731
                    mean, low, high = pad(mean), pad(low), pad(high)
                color = colors[method.replace("_extreme", "")]  # an arm and its extreme-clip variant share a colour
                ax.plot(steps, mean, color=color, label=f"{method} (n={len(curves)})", linewidth=1.2,
                        marker="o" if len(steps) <= 20 else None, linestyle="--" if "extreme" in method else "-")
                ax.fill_between(steps, low, high, color=color, alpha=0.12)
            ax.set_title(key + (f" ({smooth}-step mean)" if key in ("actor/entropy", "reward/accuracy") else ""), fontsize=9)
            ax.set_xlabel("RL step")
        axes[0][0].legend(fontsize=6)
        fig.tight_layout()
        path = out / f"{name}.png"
        fig.savefig(path, dpi=80)
        plt.close(fig)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tracking-uri", action="append", required=True, help="repeat to merge several stores")
    parser.add_argument("--experiment", default="steer-lab")
    parser.add_argument("--filter", default="", help="MLflow search filter, e.g. \"params.seed != '4'\"")
    parser.add_argument("--methods", nargs="*", default=None, help="row order (default: order of appearance)")
    parser.add_argument("--out", default="comparison")
    parser.add_argument("--extra-last", nargs="*", default=[], help="more metrics as columns, last value")
    parser.add_argument("--extra-mean", nargs="*", default=[], help="more metrics as columns, mean over steps")
    parser.add_argument("--select-by", default=None,
                        help="read the eval columns at the evaluation where this metric is best, e.g. eval/aime24/mean_at_32")
    parser.add_argument("--select-mode", choices=("max", "min"), default="max")
    parser.add_argument("--label-by", nargs="+", default=["intervention.name"],
                        help="params whose values name a row, e.g. algorithm.estimator intervention.name")
    parser.add_argument("--paired-against", default=None, metavar="METHOD",
                        help="also write paired.md/.csv: every method minus METHOD on the same seed")
    parser.add_argument("--log-artifacts", action="store_true",
                        help="log the table and plots to a run named 'comparison' of the first store")
    args = parser.parse_args(argv)
    args.tracking_uri = [open_store(uri) for uri in args.tracking_uri]  # a moved folder finds its artifacts
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = collect_runs(args.tracking_uri, args.experiment, args.filter,
                        extra_last=args.extra_last, extra_mean=args.extra_mean,
                        select_by=args.select_by, select_mode=args.select_mode, label_by=args.label_by)
    if not runs:
        raise SystemExit(f"no runs of experiment {args.experiment!r} in {args.tracking_uri} (filter {args.filter!r})")
    methods = args.methods or sorted(dict.fromkeys(r.method for r in runs))
    at = f"the evaluation with the best {args.select_by} ({args.select_mode})" if args.select_by else "the last step"
    paths = [*write_table(runs, out, methods, at), *plot_curves(runs, out, methods)]
    print((out / "comparison.md").read_text())
    if args.paired_against is not None:
        try:
            paths += write_paired(runs, out, args.paired_against, methods, at)
        except ValueError as error:
            raise SystemExit(f"--paired-against: {error}") from None
        print((out / "paired.md").read_text())
    if args.log_artifacts:
        run_id = log_comparison(args.tracking_uri[0], args.experiment, paths)
        print(f"logged to run 'comparison' ({run_id}) of {args.tracking_uri[0]}")
    return paths


def log_comparison(tracking_uri: str, experiment: str, paths: Sequence[Path]) -> str:
    """Log ``paths`` as artifacts of the store's ``comparison`` run (created once, then reused)."""
    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    found = client.search_runs([experiment_id], filter_string=f"tags.`{KIND_TAG}` = '{COMPARISON}'", max_results=1)
    if found:
        run_id = found[0].info.run_id
    else:
        run_id = client.create_run(experiment_id, run_name=COMPARISON, tags={KIND_TAG: COMPARISON}).info.run_id
        client.set_terminated(run_id, "FINISHED")
    for path in paths:
        client.log_artifact(run_id, str(path))
    return run_id


if __name__ == "__main__":
    main()
