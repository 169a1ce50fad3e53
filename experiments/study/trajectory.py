"""How a study's arms move over training: held-out metrics at every evaluation step, and whether the
training entropy has flattened (its slope early against late), mean ± 95% CI over seeds.

    python experiments/study/trajectory.py multirun/study/<run> [--metrics eval/arithmetic/entropy ...]

Reads every ``part*/mlflow.db`` of the study folder (``run_study.sh``'s layout), or one store given as
``--tracking-uri``. Prints markdown: one table per held-out metric (arms x evaluation steps), then the
training token entropy's least-squares slope (per 100 RL steps) over the first and the last quarter of
each run's steps. A late slope near 0 against a clearly negative early one is what "the entropy curve
has flattened" means here.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script: the repository root

from experiments.compare import RunData, collect_runs, mean_and_ci  # noqa: E402

DEFAULT_METRICS = ("eval/arithmetic/mean_at_32", "eval/arithmetic/pass_at_16", "eval/arithmetic/pass_at_32",
                   "eval/arithmetic/entropy", "eval/arithmetic/distinct_solutions", "eval/arithmetic/solution_entropy")


def slope_per_100(points: Sequence[tuple[int, float]]) -> float:
    """Least-squares slope of ``(step, value)`` points, per 100 steps (NaN for fewer than 2)."""
    if len(points) < 2:
        return float("nan")
    steps, values = np.asarray(points, dtype=np.float64).T
    return float(np.polyfit(steps, values, 1)[0] * 100)


def quarter_slopes(history: Sequence[tuple[int, float]]) -> tuple[float, float]:
    """Slopes over the first and the last quarter of the logged steps."""
    quarter = max(2, len(history) // 4)
    return slope_per_100(history[:quarter]), slope_per_100(history[-quarter:])


def _fmt(values: Sequence[float], signed: bool = False) -> str:
    values = [v for v in values if np.isfinite(v)]
    if not values:
        return ""
    mean, ci = mean_and_ci(values)
    text = f"{mean:+.3f}" if signed else f"{mean:.3f}"
    return f"{text} ± {ci:.3f}" if np.isfinite(ci) else text


def metric_table(runs: Sequence[RunData], metric: str, methods: Sequence[str]) -> list[str]:
    steps = sorted({s for r in runs for s, _ in r.curves.get(metric, [])})
    if not steps:
        return []
    lines = [f"**{metric}** by evaluation step (mean ± 95% CI over seeds)", "",
             "| arm | n | " + " | ".join(f"step {s}" for s in steps) + " |", "|---" * (len(steps) + 2) + "|"]
    for method in methods:
        curves = [dict(r.curves[metric]) for r in runs if r.method == method and r.curves.get(metric)]
        if curves:
            cells = [_fmt([c[s] for c in curves if s in c]) for s in steps]
            lines.append(f"| {method} | {len(curves)} | " + " | ".join(cells) + " |")
    return lines + [""]


def slope_table(runs: Sequence[RunData], methods: Sequence[str], key: str = "actor/entropy") -> list[str]:
    lines = [f"**{key}**: least-squares slope per 100 RL steps over the first and last quarter of the steps", "",
             "| arm | n | first quarter | last quarter | late / early |", "|---|---|---|---|---|"]
    for method in methods:
        slopes = [quarter_slopes(r.curves[key]) for r in runs if r.method == method and len(r.curves.get(key, [])) >= 4]
        if slopes:
            early, late = zip(*slopes)
            ratio = [lt / er for er, lt in slopes if er != 0]
            lines.append(f"| {method} | {len(slopes)} | {_fmt(early, True)} | {_fmt(late, True)} | {_fmt(ratio)} |")
    return lines + [""]


def report(runs: Sequence[RunData], metrics: Sequence[str], methods: Sequence[str] | None = None) -> str:
    methods = list(methods or sorted(dict.fromkeys(r.method for r in runs)))
    lines: list[str] = []
    for metric in metrics:
        lines += metric_table(runs, metric, methods)
    lines += slope_table(runs, methods)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", nargs="?", help="a run_study.sh output folder (its part*/mlflow.db stores)")
    parser.add_argument("--tracking-uri", action="append", default=[], help="a store instead of (or beside) a folder")
    parser.add_argument("--experiment", default="steer-lab")
    parser.add_argument("--metrics", nargs="*", default=list(DEFAULT_METRICS))
    parser.add_argument("--methods", nargs="*", default=None, help="row order (default: sorted)")
    args = parser.parse_args(argv)
    uris = list(args.tracking_uri)
    if args.folder:
        uris += [f"sqlite:///{db.resolve()}" for db in sorted(Path(args.folder).glob("part*/mlflow.db"))]
    if not uris:
        raise SystemExit("no stores: give a study folder with part*/mlflow.db, or --tracking-uri")
    runs = collect_runs(uris, args.experiment, curve_keys=("actor/entropy",))
    if not runs:
        raise SystemExit(f"no runs of experiment {args.experiment!r} in {uris}")
    text = report(runs, args.metrics, args.methods)
    print(text)
    return text


if __name__ == "__main__":
    main()
