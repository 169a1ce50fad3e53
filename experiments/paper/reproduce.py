"""Reproduce one table of the STEER paper (Hao et al. 2025, arXiv 2510.10150) with one command:
every row is a run of ``src/run.py``, one Hydra multirun per experiment file, then
``experiments/compare.py`` writes the table (mean ± 95% CI over seeds) from the MLflow stores.

    python experiments/paper/reproduce.py --table main                 # all rows, seed 1
    python experiments/paper/reproduce.py --table main --seeds 1,2,3 --out results/main
    python experiments/paper/reproduce.py --table extreme --rows grpo_extreme,steer_extreme
    python experiments/paper/reproduce.py --table main --dry-run       # print the commands only
    python experiments/paper/reproduce.py --table main -- trainer.devices=8   # extra Hydra overrides

Tables (rows = intervention presets; which rows the paper's tables hold is as quoted in issue 12):
  main     Qwen2.5-Math-7B: GRPO, the eight entropy baselines and STEER (steer_math), plus RLOO and
           OPO each with and without STEER (steer_math_rloo, steer_math_opo)
  models   the same GRPO rows on Qwen2.5-Math-1.5B and Qwen2.5-14B (steer_math_1p5b, steer_math_14b)
  extreme  the extreme clip eps_low 0.99 / eps_high 5 (steer_math_extreme): GRPO, entropy bonus,
           Clip-Cov and STEER under it
  code     Qwen2.5-Coder on HumanEval+, MBPP+ and LiveCodeBench (steer_code), the GRPO rows

Results: ``OUT/<experiment>/`` holds each multirun (run folders, ``mlflow.db``), ``OUT/table/``
the table (``comparison.md``, ``comparison.csv``) and the entropy/accuracy curves. Math tables
read each run at its best-AIME24 evaluation (the paper's checkpoint selection).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from experiments.compare import main as compare  # noqa: E402

BASELINES = ["grpo", "clip_higher", "entropy_bonus", "clip_cov", "kl_cov", "fork_tokens", "entropy_adv",
             "w_reinforce", "steer"]


@dataclass(frozen=True)
class Table:
    parts: tuple[tuple[str, tuple[str, ...]], ...]
    """(experiment file, intervention presets) per multirun."""
    label_by: tuple[str, ...]
    """Params that name a row in the table."""
    select_by: str | None
    """Metric whose best evaluation is reported (checkpoint selection); None: the last one."""


TABLES: dict[str, Table] = {
    "main": Table((("steer_math", tuple(BASELINES)), ("steer_math_rloo", ("grpo", "steer")),
                   ("steer_math_opo", ("grpo", "steer"))),
                  ("algorithm.estimator", "intervention.name"), "eval/aime24/mean_at_32"),
    "models": Table((("steer_math_1p5b", tuple(BASELINES)), ("steer_math_14b", tuple(BASELINES))),
                    ("model.path", "intervention.name"), "eval/aime24/mean_at_32"),
    "extreme": Table((("steer_math_extreme", ("grpo_extreme", "entropy_bonus_extreme", "clip_cov_extreme",
                                              "steer_extreme")),),
                     ("intervention.name",), "eval/aime24/mean_at_32"),
    # The paper's checkpoint rule for code is not stored here: the last evaluation is reported.
    "code": Table((("steer_code", tuple(BASELINES)),), ("intervention.name",), None),
}


def commands(table: str, seeds: str, out: Path, rows: Sequence[str] | None = None,
             extra: Sequence[str] = ()) -> list[list[str]]:
    """One ``src/run.py -m`` command per experiment file of ``table`` (rows filtered by ``rows``)."""
    if table not in TABLES:
        raise SystemExit(f"unknown table {table!r}; valid: {', '.join(TABLES)}")
    result = []
    for experiment, presets in TABLES[table].parts:
        chosen = [p for p in presets if rows is None or p in rows]
        if not chosen:
            continue
        # seed first: Hydra sweeps the last override fastest, so every row finishes seed 1 first
        result.append([sys.executable, str(REPO / "src" / "run.py"), "-m", f"+experiment={experiment}",
                       f"seed={seeds}", f"intervention={','.join(chosen)}",
                       f"hydra.sweep.dir={out / experiment}", *extra])
    if not result:
        raise SystemExit(f"no row of table {table!r} matches --rows {','.join(rows or [])}")
    return result


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--table", required=True, choices=sorted(TABLES))
    parser.add_argument("--seeds", default="1", help="comma-separated, e.g. 1,2,3")
    parser.add_argument("--rows", default=None, help="comma-separated intervention presets to keep (default: all)")
    parser.add_argument("--out", default=None, help="default: multirun/paper/<table>-<UTC time>")
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    parser.add_argument("extra", nargs="*", help="Hydra overrides for every run (after --)")
    args = parser.parse_args(argv)
    out = Path(args.out or f"multirun/paper/{args.table}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}").resolve()
    rows = args.rows.split(",") if args.rows else None
    todo = commands(args.table, args.seeds, out, rows, args.extra)
    for command in todo:
        print(" ".join(command), flush=True)
    if args.dry_run:
        return out
    status = 0
    for command in todo:  # one after another: each run takes the whole node
        status |= subprocess.run(command, cwd=os.getcwd(), check=False).returncode
    table = TABLES[args.table]
    stores = sorted(out.glob("*/mlflow.db"))
    compare_args = [arg for db in stores for arg in ("--tracking-uri", f"sqlite:///{db}")]
    compare_args += ["--out", str(out / "table"), "--label-by", *table.label_by]
    if table.select_by:
        compare_args += ["--select-by", table.select_by]
    compare(compare_args)
    if status:
        raise SystemExit(f"some runs failed (exit status {status}); the table holds the others: {out / 'table'}")
    return out / "table"


if __name__ == "__main__":
    main()
