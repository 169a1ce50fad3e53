"""Pool the entropy probe's per-token data of a study, per arm: which predictor tracks the measured
entropy change, how much of the change is spill-over, and what the STEER-type weights look like.

With the parameter-space predictor in the data (``<grad_theta H, Delta theta>`` of the actual
update), it also splits the per-token predictors' error: ``parameter_space/r2`` (face value, no
fitted scale) is the share of the measured change that first order explains (the rest is higher
order), and ``<predictor>/pearson_to_parameter_space`` how well a per-token predictor tracks the
exact first-order change (its shortfall is the shared-weight coupling it leaves out).

    python experiments/study/analyse_probe.py multirun/study/main > probe_analysis.md

Reads every ``<part>/<n>_<arm>_seed<k>/entropy_probe/probe_data.npz`` below the study folder.
Per-run numbers are averaged over the arm's seeds (each run has its own fitted scale).
"""

from __future__ import annotations

import re
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))

from steer.probe import entropy_dynamics as ed  # noqa: E402

RUN = re.compile(r"^\d+_(?P<arm>.+)_seed(?P<seed>\d+)$")
STATS = ("pearson", "spearman", "sign_agreement", "pearson_top10", "sign_agreement_top10")
EXACT = ("scale", "r2", "relative_error_unscaled")
"""Face-value columns of the parameter-space predictor (its fitted scale should be near 1)."""


def run_statistics(data: dict[str, np.ndarray]) -> dict[str, float]:
    measured = torch.from_numpy(data["measured"]).double()
    everything = torch.ones_like(measured, dtype=torch.bool)
    out: dict[str, float] = {}
    for name in (name for name in ed.PREDICTORS if name in data):
        result = ed.compare_prediction(torch.from_numpy(data[name]).double(), measured, everything)
        for key in STATS:
            out[f"{name}/{key}"] = result[key]
    if ed.PARAMETER_SPACE in data:
        exact = torch.from_numpy(data[ed.PARAMETER_SPACE]).double()
        result = {**ed.compare_prediction(exact, measured, everything), **ed.absolute_agreement(exact, measured, everything)}
        for key in EXACT:
            out[f"{ed.PARAMETER_SPACE}/{key}"] = result[key]
        for name in ed.PER_TOKEN_PREDICTORS:
            out[f"{name}/pearson_to_parameter_space"] = ed.pearson(torch.from_numpy(data[name]).double(), exact)
        zero = torch.from_numpy(data["advantage"] == 0)
        if bool(zero.any()):  # the spill-over states: does first order account for what they move?
            out[f"{ed.PARAMETER_SPACE}/zero_adv_pearson"] = ed.pearson(exact[zero], measured[zero])
    zero = data["advantage"] == 0
    if zero.any():
        out["spill_ratio"] = float(np.abs(data["measured"][zero]).mean() / np.abs(data["measured"]).mean())
    for key in data:
        if key.startswith("steer_weights/"):
            weights = data[key]
            out["weight_mean"] = float(weights.mean())
            out["weight_below_0_99"] = float((weights < 0.99).mean())
    return out


def main(folder: str) -> None:
    per_arm: dict[str, list[dict[str, float]]] = defaultdict(list)
    for path in sorted(Path(folder).glob("*/*/entropy_probe/probe_data.npz")):
        match = RUN.match(path.parents[1].name)
        if match:
            with np.load(path) as data:
                per_arm[match["arm"]].append(run_statistics({k: data[k] for k in data.files}))
    present = {key for runs in per_arm.values() for r in runs for key in r}
    columns = [f"{p}/{s}" for p in ed.PREDICTORS for s in STATS]
    columns += [f"{ed.PARAMETER_SPACE}/{s}" for s in (*EXACT, "zero_adv_pearson")] + [f"{p}/pearson_to_parameter_space" for p in ed.PER_TOKEN_PREDICTORS]
    columns = [c for c in columns if c in present] + ["spill_ratio", "weight_mean", "weight_below_0_99"]
    print("| arm | runs | " + " | ".join(columns) + " |")
    print("|---" * (len(columns) + 2) + "|")
    for arm, runs in per_arm.items():
        cells = []
        for column in columns:
            values = [r[column] for r in runs if column in r and np.isfinite(r[column])]
            cells.append(f"{np.mean(values):.3f}" if values else "")
        print(f"| {arm} | {len(runs)} | " + " | ".join(cells) + " |")
    pooled = [r for runs in per_arm.values() for r in runs]
    print()
    print("All runs, mean over runs:")
    def mean_of(key: str) -> float:
        values = [r[key] for r in pooled if key in r and np.isfinite(r[key])]
        return float(np.mean(values)) if values else float("nan")

    for name in ed.PREDICTORS:
        if any(f"{name}/pearson" in r for r in pooled):
            print(f"- {name}: " + ", ".join(f"{s} {mean_of(f'{name}/{s}'):.3f}" for s in STATS))
    if any(f"{ed.PARAMETER_SPACE}/r2" in r for r in pooled):
        print(f"- {ed.PARAMETER_SPACE} at face value: " + ", ".join(f"{s} {mean_of(f'{ed.PARAMETER_SPACE}/{s}'):.3f}" for s in EXACT)
              + " (1 - r2: the higher-order share of the measured change's variance)")
        print("- per-token predictors vs the exact first-order change (shared-weight coupling they miss): "
              + ", ".join(f"{p} r {mean_of(f'{p}/pearson_to_parameter_space'):.3f}" for p in ed.PER_TOKEN_PREDICTORS))
    spill = [r["spill_ratio"] for r in pooled if "spill_ratio" in r]
    if spill:
        print(f"- spill-over: mean |measured dH| at zero-advantage states / at all states = {np.mean(spill):.2f}")


if __name__ == "__main__":
    main(sys.argv[1])
