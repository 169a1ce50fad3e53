"""Saving of the old-log-prob forward the first mini-batch's update replaces.

One process trains a workload alternately with the reuse (the default) and with phase 4's forward
over every row forced back on, run by run (A B A B ...), and prints the median RL-step seconds of
each, the ratio reuse / full, and the load average. Workloads:

- ``trl``: the TRL comparison's (tiny policy barely warmed up, 8 prompts x 8 samples, at most 48 new
  tokens, one optimiser step per batch, probe/evaluation/logging off): phase 4 is skipped;
- ``default``: the embedded default (its cached warm-up, 16 x 8 samples, 2 optimiser steps per
  batch, the entropy probe on; evaluation, logging and checkpoints off): phase 4 scores half the rows.

    python experiments/benchmarks/bench_old_logprobs.py [--workload trl] [--steps 6] [--repeats 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO))

TRL_WORKLOAD = [
    "algorithm.n=8", "algorithm.prompts_per_step=8", "algorithm.minibatch_prompts=8", "rollout.max_new_tokens=48",
    "model.warmup.max_steps=2", "model.warmup.eval_every=2", "model.warmup.eval_prompts=8",
    "eval.benchmarks=null", "callbacks.entropy_probe=null", "callbacks.checkpoint=null", "callbacks.progress=null",
    "logger=none", "+trainer.enable_progress_bar=false",
]
DEFAULT_WORKLOAD = [
    "eval.benchmarks=null", "callbacks.checkpoint=null", "callbacks.progress=null", "logger=none",
    "+trainer.enable_progress_bar=false", "callbacks.entropy_probe.figures=[]",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--workload", choices=["trl", "default"], default="trl")
    args = parser.parse_args()
    if args.workload == "trl":  # a 2-step warm-up in a cache of its own; the default's is the user's cache
        os.environ.setdefault("STEER_CACHE", tempfile.mkdtemp(prefix="steer-bench-old-"))
    workload = TRL_WORKLOAD if args.workload == "trl" else DEFAULT_WORKLOAD
    from steer.app import train
    from steer.module import RLVRModule
    from tests.conftest import compose

    durations: list[float] = []
    original_step = RLVRModule.training_step
    original_reuse = RLVRModule.reuse_update_logprobs

    def timed(self, batch, batch_idx):
        start = time.perf_counter()
        original_step(self, batch, batch_idx)
        durations.append(time.perf_counter() - start)

    RLVRModule.training_step = timed
    results: dict[str, list[float]] = {"reuse": [], "full": []}
    phase4: dict[str, list[float]] = {"reuse": [], "full": []}
    print(f"load average before {os.getloadavg()}", flush=True)
    for repeat in range(args.repeats):
        for kind in (("reuse", "full") if repeat % 2 == 0 else ("full", "reuse")):
            RLVRModule.reuse_update_logprobs = original_reuse if kind == "reuse" else property(lambda self: False)
            durations.clear()
            with tempfile.TemporaryDirectory() as folder:
                metrics = train(compose([*workload, f"algorithm.steps={args.steps}", f"threads={args.threads}"], Path(folder)))
            results[kind].append(statistics.median(durations[1:]))
            phase4[kind].append(metrics["time/old_logprobs_s"])
            print(f"{kind:>6} median step {results[kind][-1]:.3f} s  (last step's old_logprobs phase {metrics['time/old_logprobs_s']:.3f} s)  load {os.getloadavg()[0]:.2f}", flush=True)
    reuse, full = statistics.median(results["reuse"]), statistics.median(results["full"])
    print(f"median s/step: reuse {reuse:.3f}, full {full:.3f}; ratio reuse/full {reuse / full:.3f}; load average after {os.getloadavg()}")


if __name__ == "__main__":
    main()
