"""The HF engine's decoding loop (``steer.rollout.decode.sample``, functional decoder) as it runs
today against two earlier ways of running it:

- ``today``: float32 arithmetic (autocast off around the loop, even under bf16 autocast) in
  ``torch.inference_mode`` (no version counters or autograd bookkeeping per operator);
- ``today_bf16``: the same loop with ``dtype=bfloat16`` (``rollout.engine.dtype=bfloat16``): the
  joined projections cast to bf16 once per call, the key/value buffers held in bf16, the rest
  (norms, residual stream, attention) in float32;
- ``no_grad``: the same loop under ``torch.no_grad`` (as before inference mode);
- ``bf16_autocast``: the loop under ``torch.no_grad`` inside bf16 autocast with autocast left on
  around every operator, as ``model.compute_dtype=bfloat16`` ran it before (every weight cast anew
  at every step).

The TRL benchmark's fixed shape (8 prompts x 8 samples, 24-token prompts, 48 new tokens) at its two
sizes; the modes alternate round by round, each round the median of ``--calls`` calls with the same
seed. Printed: the median over rounds and every round.

    python experiments/benchmarks/bench_sampling_modes.py [--rounds 7] [--calls 3] [--sizes small large]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))

from steer.models.tiny import build_char_tokenizer, build_tiny_policy  # noqa: E402
from steer.rollout import decode  # noqa: E402

SIZES = {"small": (96, 2), "large": (192, 4)}  # hidden, layers (4 heads): bench_vs_trl.py's sizes
PROMPTS, SAMPLES, PROMPT_TOKENS, NEW_TOKENS = 8, 8, 24, 48
MODES = ("bf16_autocast", "no_grad", "today", "today_bf16")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", choices=sorted(SIZES), default=["small", "large"])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=NEW_TOKENS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    tokenizer = build_char_tokenizer()
    rows = PROMPTS * SAMPLES
    results = {}
    for size in args.sizes:
        hidden, layers = SIZES[size]
        policy = build_tiny_policy(tokenizer, hidden_size=hidden, num_layers=layers, num_heads=4, max_positions=256).eval()
        generator = torch.Generator().manual_seed(0)
        prompt_ids = torch.randint(5, 90, (PROMPTS, PROMPT_TOKENS), generator=generator).repeat_interleave(SAMPLES, 0)
        prompt_mask = torch.ones_like(prompt_ids, dtype=torch.bool)

        def loop(mode: str):
            if mode.startswith("today"):
                return decode.sample(policy, prompt_ids, prompt_mask, args.new_tokens, tokenizer.eos_token_id,
                                     tokenizer.pad_token_id, group=SAMPLES,
                                     dtype=torch.bfloat16 if mode == "today_bf16" else None)
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "bf16_autocast"):
                steps = decode.functional_steps(policy, prompt_ids, prompt_mask, args.new_tokens, SAMPLES)
                return decode._draw(steps, rows, prompt_ids.device, args.new_tokens, tokenizer.eos_token_id,
                                    tokenizer.pad_token_id, 1.0, 1.0)

        seconds = {mode: [] for mode in MODES}
        for round_ in range(args.rounds):
            for mode in MODES:
                calls = []
                for _ in range(args.calls):
                    torch.manual_seed(round_)
                    start = time.perf_counter()
                    loop(mode)
                    calls.append(time.perf_counter() - start)
                seconds[mode].append(statistics.median(calls))
        results[size] = {name: statistics.median(values) for name, values in seconds.items()}
        print(f"{size} ({sum(p.numel() for p in policy.parameters()):,} parameters), {rows} rows x {args.new_tokens} tokens: "
              + ", ".join(f"{name} {statistics.median(values):.4f} s (rounds {' '.join(f'{v:.3f}' for v in values)})"
                          for name, values in seconds.items()), flush=True)
    return results


if __name__ == "__main__":
    main()
