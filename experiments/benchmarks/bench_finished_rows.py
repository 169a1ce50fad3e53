"""The decoding loop with and without dropping finished rows (``steer.rollout.decode.COMPACT_FRACTION``).

Three random-init tiny Qwen2 policies, each sampling one prompt x ``rows`` (runs of 8 samples) with
the functional decoder, 2 threads: ``default-like`` (the embedded default's shape: hidden 128, 2
layers, 128 rows, 64 new tokens, EOS ~1/30 per token), ``variable-large`` (bench_vs_trl.py's variable
workload at 2.38M parameters: 64 rows, 128 new tokens, EOS ~1/32) and ``fixed-large`` (its fixed
workload: 64 rows, 48 new tokens, no EOS bias, EOS ~1/100). The EOS bias is bench_vs_trl.py's
``with_eos_bias``. Each setting samples ``--repeats`` times with seeds 0.., the settings
interleaved repeat by repeat; printed: the median seconds per call and the mean rows per step.

    python experiments/benchmarks/bench_finished_rows.py [--repeats 5] [--fractions 0 8 4 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1] / "src"))
sys.path.insert(0, str(HERE))

import steer.rollout.decode as decode  # noqa: E402
from bench_vs_trl import with_eos_bias  # noqa: E402
from steer.models.tiny import build_char_tokenizer, build_tiny_policy  # noqa: E402

CASES = {  # hidden, layers, EOS probability, rows, new tokens
    "default-like": (128, 2, 1 / 30, 128, 64),
    "variable-large": (192, 4, 1 / 32, 64, 128),
    "fixed-large": (192, 4, None, 64, 48),
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--fractions", type=int, nargs="+", default=[0, 8, 4, 2], help="COMPACT_FRACTION values; 0: never drop")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    tokenizer = build_char_tokenizer()
    prompt = tokenizer("Q: Compute 12+30+7.\nA: ").input_ids
    print(f"{'case':>15} " + " ".join(f"{'F=' + str(f) + ' s':>9} {'rows':>6}" for f in args.fractions))
    for name, (hidden, layers, eos, rows, new_tokens) in CASES.items():
        policy = build_tiny_policy(tokenizer, hidden_size=hidden, num_layers=layers, num_heads=4, max_positions=256)
        policy = with_eos_bias(policy, tokenizer.eos_token_id, eos).eval()
        ids = torch.tensor([prompt] * rows)
        mask = torch.ones_like(ids, dtype=torch.bool)
        seconds = {f: [] for f in args.fractions}
        row_steps = {f: [] for f in args.fractions}
        draw = decode.gumbel_max
        for repeat in range(args.repeats):
            for fraction in args.fractions:
                decode.COMPACT_FRACTION = fraction
                counted: list[int] = []
                decode.gumbel_max = lambda logprobs: counted.append(logprobs.shape[0]) or draw(logprobs)
                torch.manual_seed(repeat)
                start = time.perf_counter()
                decode.sample(policy, ids, mask, new_tokens, tokenizer.eos_token_id, tokenizer.pad_token_id, group=8)
                seconds[fraction].append(time.perf_counter() - start)
                row_steps[fraction].append(sum(counted) / len(counted))
                decode.gumbel_max = draw
        print(f"{name:>15} " + " ".join(f"{statistics.median(seconds[f]):9.4f} {statistics.mean(row_steps[f]):6.1f}"
                                        for f in args.fractions), flush=True)


if __name__ == "__main__":
    main()
