"""RL step time of the embedded default under CPU contention: thread count and OpenMP wait policy.

Each run is a fresh process (the OpenMP runtime reads ``OMP_WAIT_POLICY`` once, when torch loads it)
that trains the embedded default (full-size tiny policy, 16 prompts x 8 samples, 32 new tokens,
2 optimiser steps per batch; a barely warmed policy so that every response runs to the token limit;
probe, evaluation and logging off) for ``--steps`` RL steps and reports the median step seconds after
the first. Settings run interleaved (A B C D A B C D ...), first with a competing CPU hog
(``python -c "while True: pass"``, one core's worth) and then without; the load average is printed
beside every row.

    python experiments/benchmarks/bench_threads.py [--steps 6] [--repeats 2] [--settings 1 2 2:PASSIVE auto]

A setting is ``<threads>[:<OMP_WAIT_POLICY>]`` or ``<threads>:spin<N>`` (``GOMP_SPINCOUNT=N``: libgomp
spins N times before a waiting thread sleeps); ``auto`` is ``threads: auto`` (steer.app.choose_threads).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
WORKLOAD = [
    "model.warmup.max_steps=2", "model.warmup.eval_every=2", "model.warmup.eval_prompts=8",
    "eval.benchmarks=null", "callbacks.entropy_probe=null", "callbacks.checkpoint=null", "callbacks.progress=null",
    "logger=none", "+trainer.enable_progress_bar=false",
]


def child(steps: int, threads: str) -> dict:
    sys.path.insert(0, str(REPO / "src"))
    sys.path.insert(0, str(REPO))
    import torch

    from steer.app import train
    from steer.module import RLVRModule
    from tests.conftest import compose

    durations: list[float] = []
    original = RLVRModule.training_step

    def timed(self, batch, batch_idx):
        start = time.perf_counter()
        result = original(self, batch, batch_idx)
        durations.append(time.perf_counter() - start)
        return result

    RLVRModule.training_step = timed
    with tempfile.TemporaryDirectory() as folder:
        train(compose([*WORKLOAD, f"algorithm.steps={steps}", f"threads={threads}"], Path(folder)))
    return {"median_step_s": statistics.median(durations[1:] or durations), "steps": len(durations), "torch_threads": torch.get_num_threads()}


def run_setting(setting: str, steps: int, cache: str) -> dict:
    threads, _, policy = setting.partition(":")
    env = dict(os.environ, STEER_CACHE=cache)
    env.pop("OMP_WAIT_POLICY", None)
    env.pop("GOMP_SPINCOUNT", None)
    if policy.startswith("spin"):  # libgomp: spin this many times before sleeping
        env["GOMP_SPINCOUNT"] = policy[len("spin"):]
    elif policy:
        env["OMP_WAIT_POLICY"] = policy
    command = [sys.executable, __file__, "--child", json.dumps({"steps": steps, "threads": threads})]
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO)
    if done.returncode != 0:
        raise RuntimeError(f"{setting}: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--settings", nargs="*", default=["1", "2", "2:PASSIVE", "auto"])
    parser.add_argument("--no-hog", action="store_true", help="skip the contended half")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        spec = json.loads(args.child)
        print(json.dumps(child(spec["steps"], spec["threads"])))
        return
    cache = tempfile.mkdtemp(prefix="steer-bench-threads-")
    run_setting("1", 1, cache)  # builds the (barely) warmed policy once, outside the timings
    print(f"cores {len(os.sched_getaffinity(0))}, load average {os.getloadavg()}", flush=True)
    print(f"{'hog':>4} {'setting':>10} {'torch threads':>13} {'median s/step':>13} {'load 1m':>7}", flush=True)
    results: dict[tuple[bool, str], list[float]] = {}
    for hog in ([] if args.no_hog else [True]) + [False]:
        competitor = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if hog else None
        try:
            time.sleep(2 if hog else 0)
            for _ in range(args.repeats):
                for setting in args.settings:
                    row = run_setting(setting, args.steps, cache)
                    results.setdefault((hog, setting), []).append(row["median_step_s"])
                    print(f"{'yes' if hog else 'no':>4} {setting:>10} {row['torch_threads']:>13} {row['median_step_s']:13.3f} "
                          f"{os.getloadavg()[0]:7.2f}", flush=True)
        finally:
            if competitor is not None:
                competitor.kill()
                competitor.wait()
    print("\nmedian over repeats, and ratio to threads=1 in the same condition:")
    for hog in sorted({h for h, _ in results}, reverse=True):
        base = statistics.median(results[(hog, "1")]) if (hog, "1") in results else None
        for setting in args.settings:
            value = statistics.median(results[(hog, setting)])
            ratio = f"{value / base:.2f}" if base else "-"
            print(f"{'hog' if hog else 'no hog':>7} {setting:>10} {value:8.3f} s/step  x{ratio}")


if __name__ == "__main__":
    main()
