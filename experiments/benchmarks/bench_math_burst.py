"""The math-verify worker pool under a burst of slow answers (tests/rewards/slow_verifier.py: each
check waits ``--delay`` x the timeout, then runs the real math-verify check in the real worker
loop under the real timer).

For each worker count, one "step" scores ``--count`` answers (three in four correct) with
``score_safely``, as the trainer does, and prints: the step's seconds, the bound
timeout x rounds (rounds = ceil(count / workers)), the ideal delay x timeout x rounds, answers
scored correct vs expected (no score may be lost), timeouts and errors. Cold-start cost (spawning
the workers, which import sympy) is printed separately. Reports the load average: under load the
checks themselves take longer than the injected delay.

Usage: ``PYTHONPATH=src python experiments/benchmarks/bench_math_burst.py [--count 64]
[--timeout 1.0] [--delay 0.9] [--workers 1 2 4 8]``
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # for tests.rewards.*

from steer.rewards.base import score_safely  # noqa: E402
from steer.rewards.math import MathReward  # noqa: E402
from tests.rewards.slow_verifier import slow_worker_main  # noqa: E402
from tests.rewards.test_math_load import ANSWERS, burst  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=64)
    parser.add_argument("--timeout", type=float, default=1.0)
    parser.add_argument("--delay", type=float, default=0.9, help="each check's wait, as a fraction of the timeout")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args()
    print(f"load average {os.getloadavg()}; {args.count} answers per step, timeout {args.timeout} s, "
          f"each check {args.delay} x timeout")
    print(f"{'workers':>7s} {'cold_s':>6s} {'step_s':>7s} {'bound_s':>7s} {'ideal_s':>7s} {'correct':>9s} "
          f"{'timeouts':>8s} {'errors':>6s}")
    for workers in args.workers:
        reward = MathReward(num_workers=workers, timeout_s=args.timeout)
        reward._worker_target = slow_worker_main
        try:
            started = time.monotonic()
            warm, warm_refs, _ = burst(len(ANSWERS) * workers, delay=0.0)
            reward(warm, warm_refs)
            cold = time.monotonic() - started
            responses, references, expected = burst(args.count, args.delay)
            rounds = math.ceil(args.count / workers)
            for _ in range(args.steps):
                started = time.monotonic()
                output = score_safely(reward, responses, references)
                step = time.monotonic() - started
                correct = sum(output.correct)
                lost = sum(e and not c for e, c in zip(expected, output.correct))
                print(f"{workers:7d} {cold:6.1f} {step:7.2f} {args.timeout * rounds:7.2f} "
                      f"{args.delay * args.timeout * rounds:7.2f} {correct:4d}/{sum(expected):<4d} "
                      f"{output.num_timeouts:8d} {output.num_errors:6d}" + (f"  LOST {lost}" if lost else ""))
        finally:
            reward.close()
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
