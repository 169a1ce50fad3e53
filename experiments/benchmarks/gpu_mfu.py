"""Training-step tokens/s and model FLOPs utilisation (MFU) of a ~0.5B Qwen2-shaped policy in bf16.

Prepared for a GPU machine (issue 13, item 7): one command, a few minutes, nothing to download.

    python experiments/benchmarks/gpu_mfu.py [--steps 4] [--warmup 1] [--peak-tflops 989] [--json out.json] [overrides ...]

The policy is the tiny builder at Qwen2.5-0.5B's decoder shape (hidden 896, 24 layers, 14 heads, 2 KV
heads, MLP 4864; random init, no warm-up) with the character tokenizer, so its parameter count is the
decoder's (~0.36B; the 151,936-token embedding of the real model is left out, which makes the head
cheap and the MFU a statement about the decoder). The RL step is the project's own
(:mod:`bench_step`): rollout with the HF engine, reward, old log-probs, update, on the embedded task
with 64 prompts x 8 samples and 256 new tokens (a random policy rarely stops early), float32 master
weights and bfloat16 compute (``bf16-mixed``; bfloat16 parameters would not hold the updates).

FLOPs are counted per response token, with N the non-embedding parameters, L the layers, d the
hidden size and S the mean sequence length seen by attention (response tokens only, so a lower
bound): forward ``2N + 4 L d S`` (the attention score and value products over S/2 positions on
average, causal), backward twice the forward. Update MFU = 3 forwards per trained token / update
seconds; step MFU adds one forward per token for the old log-probs (when that pass runs) and one
per generated token for the rollout, over the whole step. Peak: ``--peak-tflops`` (dense bf16;
default from the device name: H100/H200 989, A100 312), so the numbers stay comparable across
machines. Tokens/s are response tokens per second of step time, as in bench_step.py.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_step  # noqa: E402

SHAPE = {"hidden_size": 896, "num_layers": 24, "num_heads": 14, "num_kv_heads": 2, "intermediate_size": 4864}
WORKLOAD = [
    "model.warmup=null", "model.dtype=float32", "model.compute_dtype=bfloat16", "model.tiny.max_positions=512",
    *(f"{'+' if key == 'intermediate_size' else ''}model.tiny.{key}={value}" for key, value in SHAPE.items()),
    "algorithm.prompts_per_step=64", "algorithm.minibatch_prompts=32", "algorithm.n=8",
    "rollout.max_new_tokens=256",
]
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


def forward_flops_per_token(parameters: int, layers: int, hidden: int, sequence: float) -> float:
    """Forward FLOPs of one token: the matmuls with the weights (2 per parameter) plus causal attention."""
    return 2.0 * parameters + 4.0 * layers * hidden * sequence


def mfu(result: dict, rows: int, non_embedding: int, layers: int, hidden: int, peak_tflops: float) -> dict:
    """Update and whole-step MFU of one bench_step result (see the module docstring)."""
    tokens = result["generated_tokens_per_step"]
    sequence = tokens / rows if rows else 0.0
    forward = forward_flops_per_token(non_embedding, layers, hidden, sequence) * tokens
    phases = result["phase_median_s"]
    update_flops = 3.0 * forward
    old_pass = forward if phases.get("old_logprobs", 0.0) > 1e-3 else 0.0  # reused when it is ~0 s
    step_flops = update_flops + old_pass + forward  # + the rollout's forward per generated token
    peak = peak_tflops * 1e12
    return {
        "forward_tflops_per_step": forward / 1e12,
        "update_mfu": update_flops / max(phases.get("update", 0.0), 1e-12) / peak,
        "step_mfu": step_flops / result["step_median_s"] / peak,
        "update_tokens_per_s": tokens / max(phases.get("update", 0.0), 1e-12),
    }


def default_peak(device_name: str) -> float | None:
    return next((value for key, value in PEAK_TFLOPS.items() if key in device_name), None)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak of the device (default: from its name)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides after the workload's (e.g. a smaller shape on CPU)")
    args = parser.parse_args(argv)

    import torch

    name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    peak = args.peak_tflops or default_peak(name)
    if peak is None:
        raise SystemExit(f"no known bf16 peak for {name!r}: pass --peak-tflops")
    result = bench_step.measure([*WORKLOAD, *args.overrides], args.warmup, args.steps)
    from steer.models.tiny import build_char_tokenizer

    cfg = bench_step.compose([*WORKLOAD, *args.overrides])  # the shapes the measured run used
    hidden, layers = int(cfg.model.tiny.hidden_size), int(cfg.model.tiny.num_layers)
    rows = int(cfg.algorithm.prompts_per_step) * int(cfg.algorithm.n)
    non_embedding = result["parameters"] - len(build_char_tokenizer()) * hidden  # tied embeddings: counted once
    result.update(mfu(result, rows, non_embedding, layers, hidden, peak), device=name, peak_tflops=peak,
                  non_embedding_parameters=non_embedding, step_rows=rows)
    print(bench_step.format_table(result))
    print(f"device {name}, peak {peak:.0f} TFLOPS bf16; {non_embedding / 1e6:.1f}M non-embedding parameters")
    print(f"update: {result['update_tokens_per_s']:.0f} trained tokens/s, MFU {100 * result['update_mfu']:.1f}%")
    print(f"whole RL step: {result['generated_tokens_per_s']:.0f} tokens/s, MFU {100 * result['step_mfu']:.1f}%")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    sys.path.insert(0, str(bench_step.REPO / "src"))
    main()
