"""The update's forward + backward in its four token layouts: padded (the default), shared prompts
(``algorithm.share_prompt_prefix``), packed (``algorithm.pack_sequences``) and both at once,
and with ``--compile`` the last also with ``model.compile=true`` (``packed_shared_compiled``: its
warm-up call compiles; needs a C++ compiler).

For each layout: the token slots that go through the decoder's projections and MLPs (nearly all of
the arithmetic; counted by a hook on the first layer's query projection) and the median seconds of
a forward + backward (``response_logprobs_and_entropy`` then ``backward``), under bf16 autocast with
eager attention (``--float32`` for float32 SDPA). The layouts alternate round by round.

Shapes (``--shape``), each ``n`` samples of ``prompts`` prompts:

- ``fixed`` / ``variable``: ``bench_vs_trl.py``'s workloads (8 x 8 samples, 24-token prompts;
  responses up to 48 tokens of which ~62% reach the limit, or geometric lengths up to 128);
- ``paper``: the STEER paper's step shape scaled to one micro-batch: 1 prompt of 200 tokens x 8
  samples, responses spread uniformly over 1-1,200 tokens (``--paper-rows`` groups).

    python experiments/benchmarks/bench_update_layouts.py [--shape fixed variable paper] [--size large] [--rounds 5] [--compile]
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
COMPILED = {"packed_shared_compiled": {"pack": True, "share_prompts": True, "compiled": True}}  # with --compile


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
    parser.add_argument("--compile", action="store_true", help="also packed_shared with model.compile=true")
    args = parser.parse_args(argv)
    layouts = {**LAYOUTS, **(COMPILED if args.compile else {})}
    torch.set_num_threads(args.threads)
    hidden, layers, heads = SIZES[args.size]
    policy = build_tiny_policy(build_char_tokenizer(), hidden_size=hidden, num_layers=layers, num_heads=heads,
                               max_positions=2048).train()
    if not args.float32:
        policy.config._attn_implementation = "eager"
    slots: list[int] = []
    count = lambda module, inputs, output: slots.append(inputs[0].shape[:-1].numel())  # noqa: E731
    results = {}
    for shape in args.shape:
        ids, mask, width = batch(shape, torch.Generator().manual_seed(0), args.paper_groups)

        def step(options: dict) -> None:
            policy.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=not args.float32):
                logprobs, entropy = response_logprobs_and_entropy(policy, ids, mask, width, **options)
            (logprobs.sum() + entropy.sum()).backward()

        seconds = {name: [] for name in layouts}
        counted = {}
        hook = policy.model.layers[0].self_attn.q_proj.register_forward_hook(count)
        for name, options in LAYOUTS.items():  # the slots each layout runs (and a warm-up)
            slots.clear()
            step(options)
            counted[name] = sum(slots)
        hook.remove()  # a hook would split the compiled graphs: the compiled layout runs those of packed_shared
        for name, options in COMPILED.items() if args.compile else ():
            counted[name] = counted["packed_shared"]
            step(options)  # compiles
        for _ in range(args.rounds):
            for name, options in layouts.items():
                tick = time.perf_counter()
                step(options)
                seconds[name].append(time.perf_counter() - tick)
        real = int(mask.sum())
        print(f"{shape}: {ids.shape[0]} rows, {ids.shape[1]} columns, {real} real tokens; {args.size}, "
              f"{'float32 sdpa' if args.float32 else 'bf16 + eager'}, {args.threads} threads, load average "
              f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
        print(f"  {'layout':<22} {'token slots':>11} {'vs padded':>9} {'median s':>9} {'vs padded':>9}")
        for name in layouts:
            median = statistics.median(seconds[name])
            print(f"  {name:<22} {counted[name]:11d} {counted[name] / counted['padded']:9.2f} {median:9.4f} "
                  f"{median / statistics.median(seconds['padded']):9.2f}")
        results[shape] = {"slots": counted, "median_s": {k: statistics.median(v) for k, v in seconds.items()}}
    return results


if __name__ == "__main__":
    main()
