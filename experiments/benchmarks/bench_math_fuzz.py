"""Fuzz the math reward: answer extraction, normalisation and MathReward on generated hostile
strings (tests/rewards/math_fuzz.py), in the calling process and in worker processes.

Checks that no exception escapes and that every call returns within its budget (``--timeout`` for
the math-verify check plus ``--slack`` for extraction and bookkeeping), and prints throughput and
the slowest calls per string family. A failure exits non-zero.

Main-process mode scores every string one call at a time, cycling through the three modes.
Worker mode scores the first ``--worker-count`` strings in batches of ``--batch`` with
``num_workers`` processes; a batch's budget is (timeout + kill grace) x ceil(batch / workers).

Usage: ``PYTHONPATH=src python experiments/benchmarks/bench_math_fuzz.py [--count 10000]
[--seed 0] [--timeout 1.0] [--worker-count 500]``
"""

from __future__ import annotations

import argparse
import math
import os
import resource
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # for tests.rewards.math_fuzz

from steer.rewards.math import KILL_GRACE_S, MODES, MathReward, extract_answer, normalize_answer  # noqa: E402
from tests.rewards.math_fuzz import fuzz_pairs  # noqa: E402


def main_process(triples, timeout_s: float, slack_s: float) -> int:
    rewards = {mode: MathReward(mode=mode, num_workers=0, timeout_s=timeout_s) for mode in MODES}
    for reward in rewards.values():  # import math-verify and sympy outside the timing
        reward(["\\boxed{x+1}"], ["1+x"])
    by_family: dict[str, list[float]] = defaultdict(list)
    failures, over_budget, timeouts, errors, correct = [], [], 0, 0, 0
    started = time.monotonic()
    for index, (family, response, reference) in enumerate(triples):
        mode = MODES[index % len(MODES)]
        t0 = time.monotonic()
        try:
            answer = extract_answer(response)
            if answer is not None:
                normalize_answer(answer)
            output = rewards[mode]([response], [reference])
        except BaseException as error:  # noqa: BLE001 - exactly what we are looking for
            failures.append((index, family, repr(error)[:200]))
            continue
        elapsed = time.monotonic() - t0
        by_family[family].append(elapsed)
        timeouts += output.num_timeouts
        errors += output.num_errors
        correct += output.correct[0]
        if elapsed > timeout_s + slack_s:
            over_budget.append((index, family, round(elapsed, 2)))
    total = time.monotonic() - started
    print(f"main process: {len(triples)} strings in {total:.1f} s = {len(triples) / total:.0f} strings/s; "
          f"math-verify timeouts {timeouts}, check errors {errors} (scored wrong), correct {correct}")
    print(f"  {'family':20s} {'n':>6s} {'mean_ms':>8s} {'p99_ms':>8s} {'max_s':>6s}")
    for family, times in sorted(by_family.items()):
        times.sort()
        p99 = times[min(len(times) - 1, int(0.99 * len(times)))]
        print(f"  {family:20s} {len(times):6d} {1000 * sum(times) / len(times):8.1f} {1000 * p99:8.1f} {times[-1]:6.2f}")
    print(f"  exceptions escaped: {len(failures)} {failures[:5]}")
    print(f"  over budget ({timeout_s} + {slack_s} s): {len(over_budget)} {over_budget[:5]}")
    return len(failures) + len(over_budget)


def worker_mode(triples, timeout_s: float, num_workers: int, batch: int) -> int:
    reward = MathReward(mode="math_verify", num_workers=num_workers, timeout_s=timeout_s)
    reference_reward = MathReward(mode="math_verify", num_workers=0, timeout_s=timeout_s)
    problems = 0
    try:
        reward(["\\boxed{1}"], ["1"])  # start the workers outside the timing
        started = time.monotonic()
        worst_ratio = 0.0
        disagreements = 0
        for first in range(0, len(triples), batch):
            chunk = triples[first : first + batch]
            responses = [response for _, response, _ in chunk]
            references = [reference for _, _, reference in chunk]
            t0 = time.monotonic()
            output = reward(responses, references)
            elapsed = time.monotonic() - t0
            budget = (timeout_s + KILL_GRACE_S) * math.ceil(len(chunk) / num_workers) + 5.0
            worst_ratio = max(worst_ratio, elapsed / budget)
            problems += elapsed > budget
            # where neither side timed out, the pool must agree with the in-process check
            expected = reference_reward(responses, references)
            if output.num_timeouts == 0 and expected.num_timeouts == 0:
                disagreements += output.correct != expected.correct
        total = time.monotonic() - started
        print(f"workers ({num_workers}): {len(triples)} strings in {total:.1f} s (with the in-process "
              f"cross-check); worst batch time / budget {worst_ratio:.2f}; batches disagreeing {disagreements}")
    except BaseException as error:  # noqa: BLE001
        print(f"workers: exception escaped: {error!r}")
        problems += 1
    finally:
        reward.close()
    return problems + disagreements


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=1.0)
    parser.add_argument("--slack", type=float, default=1.0, help="extra seconds a call may take")
    parser.add_argument("--worker-count", type=int, default=500)
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--memory-gb", type=float, default=8.0, help="address-space cap of this process")
    args = parser.parse_args()
    limit = int(args.memory_gb * (1 << 30))  # a runaway sympy allocation must not take the machine
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    triples = fuzz_pairs(args.count, args.seed)
    chars = sum(len(r) for _, r, _ in triples)
    print(f"{len(triples)} generated strings (seed {args.seed}), {chars / 1e6:.1f} M characters; "
          f"load average {os.getloadavg()}")
    problems = main_process(triples, args.timeout, args.slack)
    problems += worker_mode(triples[: args.worker_count], args.timeout, args.num_workers, args.batch)
    print(f"load average after: {os.getloadavg()}")
    raise SystemExit(1 if problems else 0)


if __name__ == "__main__":
    main()
