"""Check MathReward against every ground truth of the math benchmarks, and time it.

For every row of each file, the response ``The answer is \\boxed{<ground truth>}`` must score correct
(the verifier agrees with itself on the benchmark's own answers), and the ground truth of another
row (a different answer) must score wrong. Printed per file:

- ``gt``: correct % of the true answer, with ``MathReward(mode="math_verify")`` (fast path included);
- ``mv``: correct % of math-verify alone (no string fast path): shows ground truths math-verify
  cannot parse or cannot prove equal to themselves;
- ``strict``: correct % with ``mode="dapo_strict"``;
- ``wrong``: % of wrong answers accepted (false positives; some are real equivalences);
- ``[unparsed]``: distinct ground truths that math-verify cannot turn into a sympy expression (they
  can only match by string);
- samples/s of the reward for the true answers (mostly the fast path) and the wrong answers (all
  through math-verify) with ``num_workers=0`` and ``num_workers=2``.

Usage: ``python experiments/benchmarks/bench_math_reward.py [--data-dir ../shared/data/math]``
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from steer.data.verl_parquet import load_verl_parquet
from steer.rewards.math import (
    MathReward,
    checked_math_verify,
    extract_answer,
    normalize_answer,
    parse_expression,
)

FILES = ("aime24", "aime25", "amc23", "math500", "minerva_math", "olympiadbench", "DAPO-Math-17k")
DEFAULT_DATA_DIR = Path(__file__).resolve().parents[3] / "shared" / "data" / "math"


def boxed(answer: str) -> str:
    return f"The answer is \\boxed{{{answer}}}"


def wrong_answers(references: list[str]) -> list[str]:
    """For each row, the next row's ground truth whose normalised form differs (cyclically)."""
    wrong = []
    for index, reference in enumerate(references):
        for offset in range(1, len(references)):
            candidate = references[(index + offset) % len(references)]
            if normalize_answer(candidate) != normalize_answer(reference):
                wrong.append(candidate)
                break
        else:
            wrong.append("\\text{no other answer}")
    return wrong


def timed(reward: MathReward, responses: list[str], references: list[str]):
    parse_expression.cache_clear()  # the parent's cache would flatter num_workers=0 on later runs
    started = time.perf_counter()
    output = reward(responses, references)
    return output, len(responses) / (time.perf_counter() - started)


def percent(flags: list[bool]) -> str:
    return f"{100.0 * sum(flags) / len(flags):.2f}"


def bench_file(path: Path, timeout_s: float) -> list[str]:
    references = [str(record.reference) for record in load_verl_parquet(path, dedupe=False)]
    responses = [boxed(reference) for reference in references]
    wrong = wrong_answers(references)
    wrong_responses = [boxed(answer) for answer in wrong]

    throughput = {}
    outputs = {}
    for workers in (0, 2):
        reward = MathReward(mode="math_verify", timeout_s=timeout_s, num_workers=workers)
        reward(["\\boxed{x}"], ["y"])  # import sympy / start the workers outside the timing
        outputs[("gt", workers)], throughput[("gt", workers)] = timed(reward, responses, references)
        outputs[("wrong", workers)], throughput[("wrong", workers)] = timed(reward, wrong_responses, references)
        reward.close()
    strict = MathReward(mode="dapo_strict")(responses, references)

    # math-verify alone, once per distinct ground truth
    unique = list(dict.fromkeys(references))
    mv_status = {gt: checked_math_verify(extract_answer(boxed(gt)) or "", gt, timeout_s) for gt in unique}
    mv_correct = [mv_status[gt][1] for gt in references]

    gt_out, wrong_out = outputs[("gt", 0)], outputs[("wrong", 0)]
    lines = [
        f"{path.stem:>14} rows={len(references):>6} gt={percent(gt_out.correct):>6}% "
        f"(w2 {percent(outputs[('gt', 2)].correct)}%) mv={percent(mv_correct):>6}% "
        f"strict={percent(strict.correct):>6}% wrong={percent(wrong_out.correct):>5}% | samples/s "
        f"gt w0 {throughput[('gt', 0)]:.0f} w2 {throughput[('gt', 2)]:.0f}, "
        f"wrong w0 {throughput[('wrong', 0)]:.0f} w2 {throughput[('wrong', 2)]:.0f} | "
        f"errors/timeouts w0 {wrong_out.num_errors}/{wrong_out.num_timeouts} "
        f"w2 {outputs[('wrong', 2)].num_errors}/{outputs[('wrong', 2)].num_timeouts}"
    ]
    for name, output in (("gt", gt_out), ("gt w2", outputs[("gt", 2)]), ("strict", strict)):
        for index, ok in enumerate(output.correct):
            if not ok:
                lines.append(f"    [{name}] row {index}: ground truth {references[index]!r} scored wrong")
    for gt, (status, ok) in mv_status.items():
        if not ok:
            parsed = parse_expression(gt)
            why = "parses to " + repr(list(parsed)) if any(not isinstance(p, str) for p in parsed) else "no sympy parse"
            rows = [i for i, r in enumerate(references) if r == gt]
            shown = f"{rows[:3]}{'...' if len(rows) > 3 else ''}"
            lines.append(f"    [mv] rows {shown}: {gt!r} not equal to itself ({status}; {why})")
    unparsed = [gt for gt in unique if not any(not isinstance(item, str) for item in parse_expression(gt))]
    if unparsed:
        lines.append(f"    [unparsed] {len(unparsed)} distinct ground truths without a sympy parse: {unparsed}")
    if any(out.num_errors or out.num_timeouts for out in outputs.values()):  # find which samples
        for index, (answer, reference) in enumerate(zip(wrong, references)):
            status, _ = checked_math_verify(answer, reference, timeout_s)
            if status != "ok":
                lines.append(f"    [wrong] row {index}: {status} checking {answer!r} against {reference!r}")
    for index, ok in enumerate(wrong_out.correct):
        if ok:
            lines.append(f"    [wrong] row {index}: {wrong[index]!r} accepted for ground truth {references[index]!r}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    parser.add_argument("--files", nargs="*", default=list(FILES))
    parser.add_argument("--timeout-s", type=float, default=5.0)
    args = parser.parse_args()
    for name in args.files:
        for line in bench_file(args.data_dir / f"{name}.parquet", args.timeout_s):
            print(line, flush=True)


if __name__ == "__main__":
    main()
