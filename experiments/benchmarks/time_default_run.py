"""Wall time and outcome of the embedded default run (`python src/run.py`) on 2 CPU cores.

Each seed runs in its own process pinned to two cores (``taskset``), with an empty warm-up cache,
so the time includes the supervised warm-up. Seeds run one after another unless ``--parallel``
(use that only on a machine with at least 2 free cores per seed). Prints one row per seed:
wall seconds, held-out accuracy (mean over 4 samples) and held-out entropy before and after RL.

    python experiments/benchmarks/time_default_run.py --seeds 1 2 3 [--parallel] [-- extra overrides]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def launch(seed: int, cores: str, out: Path, overrides: list[str]) -> subprocess.Popen:
    env = dict(os.environ, STEER_CACHE=tempfile.mkdtemp(prefix=f"steer-cache-{seed}-"))
    command = ["taskset", "-c", cores, sys.executable, str(REPO / "src" / "run.py"), f"seed={seed}",
               "callbacks.progress=null", f"hydra.run.dir={out}", *overrides]
    log = open(out.with_suffix(".log"), "w")
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--parallel", action="store_true", help="run the seeds at once, 2 cores each")
    parser.add_argument("--out", type=Path, default=Path(tempfile.mkdtemp(prefix="steer-timing-")))
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    jobs = []
    for index, seed in enumerate(args.seeds):
        cores = f"{2 * index},{2 * index + 1}" if args.parallel else "0,1"
        start = time.perf_counter()
        job = launch(seed, cores, args.out / f"seed{seed}", args.overrides)
        jobs.append((seed, job, start))
        if not args.parallel:
            job.wait()
            jobs[-1] = (seed, job, start, time.perf_counter() - start)
    if args.parallel:
        jobs = [(seed, job, start, (job.wait(), time.perf_counter() - start)[1]) for seed, job, start in jobs]
    print(f"{'seed':>4} {'wall_s':>7} {'rc':>3} {'acc_before':>10} {'acc_after':>9} {'H_before':>8} {'H_after':>8}")
    for seed, job, _, wall in jobs:
        results_file = args.out / f"seed{seed}" / "eval_results.jsonl"
        rows = [json.loads(line) for line in results_file.read_text().splitlines()] if results_file.exists() else []
        if len(rows) < 2:
            print(f"{seed:>4} {wall:7.1f} {job.returncode:>3}  (no evaluation results; see {args.out}/seed{seed}.log)")
            continue
        first, last = rows[0]["metrics"], rows[-1]["metrics"]
        accuracy_key = next(k for k in first if k.startswith("mean_at_"))
        print(f"{seed:>4} {wall:7.1f} {job.returncode:>3} {first[accuracy_key]:10.3f} {last[accuracy_key]:9.3f} "
              f"{first['entropy']:8.3f} {last['entropy']:8.3f}")


if __name__ == "__main__":
    main()
