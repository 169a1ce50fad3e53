"""Count the benchmark answers the math reward's number rule and delimiter handling affect.

1. Large integers: for every distinct integer ground truth g of each file, is the wrong answer g+1
   accepted? Before (the previous rule: plain numbers within a relative tolerance of 1e-6, as
   floats) and now (``numbers_equal``: integers exactly), and through ``MathReward`` in the
   ``math_verify`` and ``either`` modes.
2. Display delimiters: ground truths written as ``\\[...\\]``, ``\\(...\\)``, ``$...$`` or ``$$...$$``;
   how many a correct boxed answer (the ground truth without its delimiters) now scores correct.

Usage: ``PYTHONPATH=src python experiments/benchmarks/count_answer_rules.py [--data-dir ../shared/data/math]``
"""

from __future__ import annotations

import argparse
import math
import re
from pathlib import Path

import pyarrow.parquet as pq

from steer.rewards.math import MathReward, _strip_math_delimiters, numbers_equal

DEFAULT_DATA_DIR = Path(__file__).resolve().parents[3] / "shared" / "data" / "math"
_INTEGER_RE = re.compile(r"-?\d+")


def previous_rule(answer: str, reference: str) -> bool:
    """The rule before the fix: both plain numbers, compared as floats within 1e-6 relative."""
    return math.isclose(float(answer), float(reference), rel_tol=1e-6)


def ground_truths(path: Path) -> list[str]:
    column = pq.read_table(path, columns=["reward_model"]).column(0).to_pylist()
    return list(dict.fromkeys(str(row["ground_truth"]) for row in column))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    args = parser.parse_args()
    rewards = {mode: MathReward(mode=mode, num_workers=0) for mode in ("math_verify", "either")}
    print(f"{'file':22s} {'distinct':>8s} {'ints':>6s} {'g+1 ok before':>13s} {'share':>6s} {'now':>4s} "
          f"{'reward now (mv/either)':>22s} {'delimited':>9s} {'boxed ok now':>12s}")
    for path in sorted(args.data_dir.glob("*.parquet")):
        truths = ground_truths(path)
        integers = [g.strip() for g in truths if _INTEGER_RE.fullmatch(g.strip())]
        wrong = [str(int(g) + 1) for g in integers]
        before = sum(previous_rule(w, g) for w, g in zip(wrong, integers))
        now = sum(bool(numbers_equal(w, g)) for w, g in zip(wrong, integers))
        rewarded = [
            sum(rewards[mode]([f"\\boxed{{{w}}}" for w in wrong], integers).correct) if integers else 0
            for mode in ("math_verify", "either")
        ]
        delimited = [g for g in truths if _strip_math_delimiters(g) != g.strip().rstrip(".").strip()]
        delimited = [g for g in delimited if g.strip().startswith(("$", "\\[", "\\("))]
        boxed_ok = (
            sum(rewards["math_verify"]([f"\\boxed{{{_strip_math_delimiters(g)}}}" for g in delimited], delimited).correct)
            if delimited else 0
        )
        share = before / len(truths) if truths else 0.0
        print(f"{path.stem:22s} {len(truths):8d} {len(integers):6d} {before:13d} {share:6.1%} {now:4d} "
              f"{rewarded[0]:>11d}/{rewarded[1]:<10d} {len(delimited):9d} {boxed_ok:12d}")


if __name__ == "__main__":
    main()
