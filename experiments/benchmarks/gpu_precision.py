"""GPU check of float32 master weights in the paper's layout: `+experiment=steer_math` (its lr 1e-6,
FSDP, float32 master weights, bf16 compute; HF rollouts, since vLLM is not installed on the lent
GPU machines) for a few RL steps on ONE GPU with a
~0.36B decoder of Qwen2.5-0.5B's shape. Prepared to take under 10 minutes on an H100; nothing to
download (random init, character tokenizer, saved once as a Hugging Face folder).

    python experiments/benchmarks/gpu_precision.py [--steps 2] [--json out.json]
    python experiments/benchmarks/gpu_precision.py --cpu-smoke     # the same path at toy size on a CPU

Three trainings, each through :func:`steer.app.train` on the composed config:

1. ``configured``: the experiment as written (only sizes, the device count, the reward and the rollout engine swapped);
2. ``float32``: the same with float32 compute (``model.compute_dtype=float32``): the reference drift;
3. ``bfloat16 parameters``: ``model.dtype=bfloat16`` with the precision start-up check switched
   off, the failure the check exists for (the tests' negative control, here on a GPU).

The reward is :class:`ParityReward` (1 for an even-length response): a random model earns no DAPO
reward, and zero advantages would give no gradient to measure. For each training it prints the
share of weights that moved, the mean |Δw| against the float32 reference, generated tokens/s
(response tokens per second of rollout), trained tokens/s and update MFU (response tokens through
forward + backward, 3 forwards' FLOPs, per second of update; see gpu_mfu.py for the FLOP count),
and the peak GPU memory (``torch.cuda.max_memory_allocated``) against the start-up estimate
(:mod:`steer.models.memory`) of that layout. All numbers are the last RL step's (the first warms up).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

SHAPE = {"hidden_size": 896, "num_layers": 24, "num_heads": 14, "num_kv_heads": 2, "intermediate_size": 4864}
"""Qwen2.5-0.5B's decoder (its 151,936-token embedding replaced by the character tokenizer's)."""
SMOKE_SHAPE = {"hidden_size": 32, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "intermediate_size": 64}

GPU_SIZES = ["algorithm.prompts_per_step=16", "algorithm.minibatch_prompts=8", "algorithm.n=8",
             "algorithm.micro_batch_size=16", "rollout.max_new_tokens=256", "trainer.devices=1"]
SMOKE_SIZES = ["algorithm.prompts_per_step=4", "algorithm.minibatch_prompts=2", "algorithm.n=2",
               "algorithm.micro_batch_size=2", "rollout.max_new_tokens=8", "trainer.devices=1", "trainer.accelerator=cpu",
               "rollout.max_prompt_length=2048", "threads=1"]
QUIET = ["~eval.benchmarks", "callbacks.checkpoint=null", "callbacks.progress=null", "callbacks.entropy_probe=null",
         "logger=none", "+trainer.enable_progress_bar=false", "reward._target_=tests.models.precision_driver.ParityReward"]
TRAININGS = {
    "configured": [],
    "float32": ["model.compute_dtype=float32"],
    "bfloat16 parameters": ["model.dtype=bfloat16"],
}


def save_model(folder: Path, shape: dict) -> None:
    from steer.models.tiny import build_char_tokenizer, build_tiny_policy

    tokenizer = build_char_tokenizer()
    build_tiny_policy(tokenizer, **shape, max_positions=4096).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def run(name: str, overrides: list[str], out_dir: Path) -> dict:
    """One training; its drift, last-step metrics, peak GPU memory and the layout's estimate."""
    import torch

    from gpu_mfu import default_peak, forward_flops_per_token
    from steer.models.memory import architecture_for, estimate_for_config
    from tests.models import precision_driver

    gpu = torch.cuda.is_available()
    if gpu:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    # bfloat16 parameters: the failure the start-up check refuses, measured on purpose
    result = precision_driver.train(overrides, out_dir, precision_check=name != "bfloat16 parameters")
    cfg = precision_driver.compose(overrides, out_dir)
    estimate = estimate_for_config(cfg, torch.cuda.get_device_properties(0).total_memory if gpu else None, gpu=gpu)
    metrics = result["last_step"]
    rows = cfg.algorithm.prompts_per_step * cfg.algorithm.n
    tokens = metrics["response/length_mean"] * rows
    arch = architecture_for(str(cfg.model.path))
    non_embedding = arch.parameters - arch.embedding_parameters  # tied embeddings: the head is the same matrix
    forward = forward_flops_per_token(non_embedding, arch.num_hidden_layers, arch.hidden_size, metrics["response/length_mean"]) * tokens
    update_s, rollout_s = metrics["time/update_s"], metrics["time/rollout_s"]
    device = torch.cuda.get_device_name(0) if gpu else "cpu"
    peak = default_peak(device)
    return {
        "moved": result["moved"], "mean_abs_drift": result["mean_abs_drift"], "parameter_dtypes": result["parameter_dtypes"],
        "generated_tokens_per_s": tokens / rollout_s, "trained_tokens_per_s": tokens / update_s,
        "update_mfu": 3 * forward / update_s / (peak * 1e12) if peak else None,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if gpu else None,
        "estimated_peak_gib": estimate.peak / 2**30 if estimate else None,
        "estimate": estimate.render() if estimate else None, "device": device,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=2, help="RL steps per training (numbers are the last step's)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--cpu-smoke", action="store_true", help="toy shape and sizes on the CPU (checks the plumbing)")
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="gpu-precision-"))
    save_model(work / "model", SMOKE_SHAPE if args.cpu_smoke else SHAPE)
    # rollout=hf: the lent GPU machines have no vLLM (the experiment's own engines are rehearsed on
    # CPU by tests/test_paper_rehearsal.py); this check is about the update's precision.
    base = ["+experiment=steer_math", "rollout=hf", f"model.path={work / 'model'}", f"algorithm.steps={args.steps}",
            *(SMOKE_SIZES if args.cpu_smoke else GPU_SIZES), *QUIET]
    results = {name: run(name, [*base, *extra], work / name.replace(" ", "_")) for name, extra in TRAININGS.items()}
    reference = results["float32"]["mean_abs_drift"]
    print(f"device {results['configured']['device']}; +experiment=steer_math at lr 1e-6, {args.steps} RL steps")
    print(f"{'training':22s} {'params':9s} {'moved':>7s} {'drift/f32':>9s} {'gen tok/s':>10s} {'train tok/s':>11s} "
          f"{'MFU':>6s} {'peak GiB':>9s} {'est. GiB':>9s}")
    for name, r in results.items():
        fmt = lambda value, spec: format(value, spec) if value is not None else "-"  # noqa: E731
        print(f"{name:22s} {','.join(r['parameter_dtypes']):9s} {r['moved']:7.2%} {r['mean_abs_drift'] / reference:9.3f} "
              f"{r['generated_tokens_per_s']:10.0f} {r['trained_tokens_per_s']:11.0f} {fmt(r['update_mfu'], '6.1%')} "
              f"{fmt(r['peak_memory_gib'], '9.1f')} {fmt(r['estimated_peak_gib'], '9.1f')}")
    if results["configured"]["estimate"]:
        print(results["configured"]["estimate"])
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
