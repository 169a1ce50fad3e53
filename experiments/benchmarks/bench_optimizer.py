"""AdamW step time, torch's default loop vs ``fused=True`` (what RLVRModule.configure_optimizers
picks where torch has the kernel), on the tiny policy's shapes and a SmolLM2-135M-shaped model.

The two optimisers step the same parameters (own copies) in one process, interleaved A B A B, so
machine noise hits both; prints the median milliseconds per step, the ratio fused / loop, the
largest weight difference after all steps, and the load average.

    python experiments/benchmarks/bench_optimizer.py [--steps 40] [--threads 1]
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

SIZES = {
    "h128-L2": dict(vocab_size=100, hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4),
    "h256-L4": dict(vocab_size=100, hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4),
    "smollm2-135M": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3),
}


def measure(name: str, shape: dict, steps: int) -> dict:
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(**shape, tie_word_embeddings=True))
    copies = {"loop": model, "fused": copy.deepcopy(model)}
    optimizers = {kind: torch.optim.AdamW(m.parameters(), lr=1e-4, fused=(kind == "fused")) for kind, m in copies.items()}
    generator = torch.Generator().manual_seed(1)
    times: dict[str, list[float]] = {kind: [] for kind in copies}
    for step in range(steps):
        grads = [torch.randn(p.shape, generator=generator) * 1e-3 for p in model.parameters()]
        for kind in (("loop", "fused") if step % 2 == 0 else ("fused", "loop")):
            for p, g in zip(copies[kind].parameters(), grads):
                p.grad = g.clone()
            start = time.perf_counter()
            optimizers[kind].step()
            times[kind].append(time.perf_counter() - start)
    difference = max((a - b).abs().max().item() for a, b in zip(copies["loop"].parameters(), copies["fused"].parameters()))
    loop, fused = (statistics.median(times[k][2:]) * 1e3 for k in ("loop", "fused"))
    return {"model": name, "params_M": sum(p.numel() for p in model.parameters()) / 1e6, "loop_ms": loop,
            "fused_ms": fused, "ratio": fused / loop, "max_abs_diff": difference}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--sizes", nargs="*", default=list(SIZES))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, threads {args.threads}, load average before {os.getloadavg()}")
    print(f"{'model':>14} {'params M':>9} {'loop ms':>9} {'fused ms':>9} {'fused/loop':>10} {'max |dw|':>9}")
    for name in args.sizes:
        row = measure(name, SIZES[name], args.steps)
        print(f"{row['model']:>14} {row['params_M']:9.2f} {row['loop_ms']:9.2f} {row['fused_ms']:9.2f} {row['ratio']:10.2f} {row['max_abs_diff']:9.1e}")
    print(f"load average after {os.getloadavg()}")


if __name__ == "__main__":
    main()
