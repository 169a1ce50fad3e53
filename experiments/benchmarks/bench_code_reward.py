"""Check CodeReward against every canonical solution of HumanEval+ and MBPP+, and time it.

For each benchmark:

- load: seconds to load it, most of it running the canonical solutions once to get the expected
  outputs (and tests dropped because the canonical solution itself fails on them);
- canonical: pass rate of the canonical solutions against all plus tests (base + EvalPlus inputs),
  with the ids of the tasks that fail and why (known-broken tasks on this machine);
- broken: pass rate of a deliberately broken solution (the entry point returns None) — it should
  be 0 except on tasks where any return value counts — and the share of single tests it passes
  (tests whose expected output is None or falsy-by-oracle);
- samples/s of ``CodeReward`` on the canonical and on the broken responses.

Usage: ``python experiments/benchmarks/bench_code_reward.py [--data-dir ../shared/data/code]
[--num-workers 2] [--limit N]``
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from steer.data.code import load_evalplus
from steer.rewards.code import CheckResult, CodeReward

DEFAULT_DATA_DIR = Path(__file__).resolve().parents[3] / "shared" / "data" / "code"


def fenced(code: str) -> str:
    return f"Here is my solution.\n```python\n{code}\n```"


def broken_solution(entry_point: str) -> str:
    return f"def {entry_point}(*args, **kwargs):\n    return None\n"


def timed(
    reward: CodeReward, responses: list[str], references: list[dict]
) -> tuple[list[CheckResult | None], float]:
    """Per-sample results (what ``reward(...)`` scores) and samples/s."""
    started = time.perf_counter()
    results = reward.check_batch(responses, references)
    return results, len(responses) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--limit", type=int, default=None, help="first N tasks of each benchmark only")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="  %(levelname)s %(message)s")

    reward = CodeReward(num_workers=args.num_workers)
    for name in ("humaneval_plus", "mbpp_plus"):
        print(f"== {name}")
        started = time.perf_counter()
        records = load_evalplus(name, data_dir=args.data_dir, num_workers=args.num_workers)[: args.limit]
        references = [record.reference for record in records]
        num_tests = sum(len(reference["inputs"]) for reference in references)
        dropped = {r["task_id"]: r["dropped_tests"] for r in references if r["dropped_tests"]}
        load_s = time.perf_counter() - started
        print(f"load: {load_s:.1f} s, {len(records)} tasks, {num_tests} tests, dropped {dropped}")

        results, rate = timed(reward, [fenced(r["canonical_solution"]) for r in references], references)
        passed = [result is not None and result.all_passed for result in results]
        print(f"canonical: {sum(passed) / len(passed):.2%} pass, {rate:.2f} samples/s")
        for reference, result in zip(references, results, strict=True):
            if result is None:
                print(f"  FAIL {reference['task_id']}: the check raised")
            elif not result.all_passed:
                passed_tests = f"{sum(result.passed)}/{len(result.passed)} tests pass"
                print(f"  FAIL {reference['task_id']}: {result.detail} ({passed_tests})")

        broken = [fenced(broken_solution(r["entry_point"])) for r in references]
        results, rate = timed(reward, broken, references)
        passing = [
            r["task_id"]
            for r, result in zip(references, results, strict=True)
            if result is None or result.all_passed
        ]
        test_share = sum(result.fraction for result in results if result is not None) / len(results)
        print(
            f"broken: {len(passing) / len(results):.2%} pass all tests {passing}, "
            f"{test_share:.2%} of tests pass, {rate:.2f} samples/s"
        )


if __name__ == "__main__":
    main()
