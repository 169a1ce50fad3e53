"""The update's forward + backward in its four token layouts: padded (the default), shared prompts
(``algorithm.share_prompt_prefix``), packed (``algorithm.pack_sequences``) and both at once.

For each layout: the token slots that go through the decoder's projections and MLPs (nearly all of
the arithmetic; counted by a hook on the first layer's query projection) and the median seconds of
a forward + backward (``response_logprobs_and_entropy`` then ``backward``), under bf16 autocast with
eager attention (``--float32`` for float32 SDPA). The layouts alternate round by round.

Shapes (``--shape``), each ``n`` samples of ``prompts`` prompts:

- ``fixed`` / ``variable``: ``bench_vs_trl.py``'s workloads (8 x 8 samples, 24-token prompts;
  responses up to 48 tokens of which ~62% reach the limit, or geometric lengths up to 128);
- ``paper``: the STEER paper's step shape scaled to one micro-batch: 1 prompt of 200 tokens x 8
  samples, responses spread uniformly over 1-1,200 tokens (``--paper-rows`` groups).

    python experiments/benchmarks/bench_update_layouts.py [--shape fixed variable paper] [--size large] [--rounds 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))

from steer.algo.logprobs import response_logprobs_and_entropy  # noqa: E402
from steer.models.tiny import build_char_tokenizer, build_tiny_policy  # noqa: E402

SIZES = {"small": (96, 2, 4), "large": (192, 4, 4)}  # bench_vs_trl.py's sizes
LAYOUTS = {"padded": {}, "shared": {"share_prompts": True}, "packed": {"pack": True},
           "packed_shared": {"pack": True, "share_prompts": True}}


def batch(shape: str, generator: torch.Generator, paper_groups: int = 1) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``(input_ids, attention_mask, response width)``: left-padded prompts, right-padded responses."""
    if shape == "paper":
        groups, n, prompt, width = paper_groups, 8, 200, 1200
        lengths = torch.randint(1, width + 1, (groups * n,), generator=generator)
    else:
        groups, n, prompt = 8, 8, 24
        width = 48 if shape == "fixed" else 128
        if shape == "fixed":
            full = torch.rand(groups * n, generator=generator) < 0.62
            lengths = torch.where(full, torch.full((groups * n,), width), torch.randint(1, width, (groups * n,), generator=generator))
        else:
            # Geometric with p = 1/32 (bench_vs_trl.py's EOS bias), by inverting its distribution function.
            uniform = torch.rand(groups * n, generator=generator)
            lengths = (torch.log1p(-uniform) / torch.log1p(torch.tensor(-1 / 32))).floor().long().add(1).clamp(max=width)
    ids = torch.randint(5, 90, (groups * n, prompt + width), generator=generator)
    ids[:, :prompt] = ids[::n, :prompt].repeat_interleave(n, 0)
    mask = torch.ones_like(ids)
    mask[:, prompt:] = (torch.arange(width)[None] < lengths[:, None]).long()
    width = int(lengths.max())
    return (ids * mask)[:, : prompt + width], mask[:, : prompt + width], width


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", nargs="+", choices=["fixed", "variable", "paper"], default=["fixed", "variable", "paper"])
    parser.add_argument("--size", choices=sorted(SIZES), default="large")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--paper-groups", type=int, default=1)
    parser.add_argument("--float32", action="store_true", help="float32 SDPA instead of bf16 autocast with eager attention")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    hidden, layers, heads = SIZES[args.size]
    policy = build_tiny_policy(build_char_tokenizer(), hidden_size=hidden, num_layers=layers, num_heads=heads,
                               max_positions=2048).train()
    if not args.float32:
        policy.config._attn_implementation = "eager"
    slots: list[int] = []
    policy.model.layers[0].self_attn.q_proj.register_forward_hook(lambda module, inputs, output: slots.append(inputs[0].shape[:-1].numel()))
    results = {}
    for shape in args.shape:
        ids, mask, width = batch(shape, torch.Generator().manual_seed(0), args.paper_groups)

        def step(options: dict) -> None:
            policy.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=not args.float32):
                logprobs, entropy = response_logprobs_and_entropy(policy, ids, mask, width, **options)
            (logprobs.sum() + entropy.sum()).backward()

        seconds = {name: [] for name in LAYOUTS}
        counted = {}
        for name, options in LAYOUTS.items():  # warm-up, and the slots each layout runs
            slots.clear()
            step(options)
            counted[name] = sum(slots)
        for _ in range(args.rounds):
            for name, options in LAYOUTS.items():
                tick = time.perf_counter()
                step(options)
                seconds[name].append(time.perf_counter() - tick)
        real = int(mask.sum())
        print(f"{shape}: {ids.shape[0]} rows, {ids.shape[1]} columns, {real} real tokens; {args.size}, "
              f"{'float32 sdpa' if args.float32 else 'bf16 + eager'}, {args.threads} threads, load average "
              f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
        print(f"  {'layout':<14} {'token slots':>11} {'vs padded':>9} {'median s':>9} {'vs padded':>9}")
        for name in LAYOUTS:
            median = statistics.median(seconds[name])
            print(f"  {name:<14} {counted[name]:11d} {counted[name] / counted['padded']:9.2f} {median:9.4f} "
                  f"{median / statistics.median(seconds['padded']):9.2f}")
        results[shape] = {"slots": counted, "median_s": {k: statistics.median(v) for k, v in seconds.items()}}
    return results


if __name__ == "__main__":
    main()
