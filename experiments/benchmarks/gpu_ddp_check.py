"""GPU check of data parallelism (DDP, NCCL) and FSDP: run on a machine with >= 2 GPUs.

    python experiments/benchmarks/gpu_ddp_check.py [--out /tmp/gpu_ddp_check] [--devices 2]

With one GPU it runs every launch with one rank (the strategies' code paths, not the comparison
across ranks).

1. DDP: every case of tests/distributed/ddp_driver.py (grpo, steer / clip_cov / kl_cov with
   scope: global) on 1 GPU and on N GPUs over the same global batch; gradients and parameters after
   each RL step must agree to float32 rounding (TF32 off), and the logged metrics too.
2. FSDP (trainer=fsdp: full sharding, bf16 mixed precision, activation checkpointing) on N GPUs
   with a 4-layer Qwen2 saved to a local folder (no hub access needed), against 1 GPU with the
   same bf16 mixed precision: the step's loss, entropy and gradient norm must agree to bf16 tolerance,
   and the policy must change.

Prints one line per comparison and the wall time of each launch; exits 1 on any failure.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

DRIVER = REPO / "tests" / "distributed" / "ddp_driver.py"
INVARIANT = ("reward/", "actor/", "response/", "batch/")


def launch(out: Path, devices: int, *args: str) -> float:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "STEER_CACHE": str(out / "cache"),
           "NVIDIA_TF32_OVERRIDE": "0"}  # float32 matmuls in float32: the tolerance below assumes it
    start = time.perf_counter()
    result = subprocess.run([sys.executable, str(DRIVER), str(out), str(devices), "--accelerator", "gpu", *args],
                            env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode:
        print(result.stdout[-3000:], result.stderr[-6000:])
        raise SystemExit(f"FAILED: launch {out.name} ({devices} GPUs {' '.join(args)}) exited {result.returncode}")
    print(f"launch {out.name}: {devices} GPU(s) {' '.join(args)}: {seconds:.1f} s")
    return seconds


def compare_exact(case: str, one: dict, many: dict, rtol: float = 1e-4, atol: float = 1e-6) -> bool:
    worst_grad = worst_param = 0.0
    ok = True
    for a, b in zip(one["steps"], many["steps"]):
        for name, grad in a["grads"].items():
            worst_grad = max(worst_grad, float((b["grads"][name].cpu() - grad.cpu()).abs().max() / grad.abs().max().clamp(min=1e-12)))
            ok &= torch.allclose(b["grads"][name].cpu(), grad.cpu(), rtol=rtol, atol=atol)
        for name, param in a["params"].items():
            worst_param = max(worst_param, float((b["params"][name].cpu() - param.cpu()).abs().max()))
            ok &= torch.allclose(b["params"][name].cpu(), param.cpu(), rtol=rtol, atol=atol)
        for key, value in a["metrics"].items():
            if key.startswith(INVARIANT) and not abs(b["metrics"][key] - value) <= atol + rtol * abs(value):
                print(f"  {case}: metric {key} {value} vs {b['metrics'][key]}")
                ok = False
    print(f"DDP {case}: max |grad diff| / max |grad| {worst_grad:.2e}, max |param diff| {worst_param:.2e}: {'ok' if ok else 'MISMATCH'}")
    return ok


def save_small_qwen2(folder: Path) -> None:
    from steer.models.tiny import build_char_tokenizer, build_tiny_policy

    tokenizer = build_char_tokenizer()
    build_tiny_policy(tokenizer, hidden_size=256, num_layers=4, num_heads=4).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path("/tmp/gpu_ddp_check"))
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--skip-fsdp", action="store_true")
    args = parser.parse_args()
    if torch.cuda.device_count() < 1:
        raise SystemExit("needs a GPU")
    if torch.cuda.device_count() < args.devices:
        # One GPU still runs both strategies' code paths (wrapping, NCCL, FSDP units, clipping) with
        # one rank; the comparison across ranks needs >= 2 GPUs.
        print(f"only {torch.cuda.device_count()} GPU(s): running DDP and FSDP with {torch.cuda.device_count()} rank(s)")
        args.devices = torch.cuda.device_count()
    from tests.distributed.ddp_driver import CASES

    ok = True
    launch(args.out / "ddp_one", 1)
    launch(args.out / "ddp_many", args.devices, "--trainer", "ddp")
    for case in CASES:
        ok &= compare_exact(case, torch.load(args.out / "ddp_one" / f"{case}.pt"), torch.load(args.out / "ddp_many" / f"{case}.pt"))

    if not args.skip_fsdp:
        folder = args.out / "qwen2_4layer"
        save_small_qwen2(folder)
        common = ["grpo", "--override", f"model.path={folder}", "--override", "trainer.precision=bf16-mixed"]
        # The training step first (no evaluation), then the same run with the evaluation callback,
        # which generates outside the root FSDP forward (the part most likely to need work).
        launch(args.out / "fsdp_one", 1, *common, "--no-eval")
        launch(args.out / "fsdp_many", args.devices, *common, "--trainer", "fsdp", "--no-eval")
        # (with one GPU, "--trainer fsdp" still wraps every decoder layer in FSDP with one rank)
        one, many = torch.load(args.out / "fsdp_one" / "grpo.pt"), torch.load(args.out / "fsdp_many" / "grpo.pt")
        for step, (a, b) in enumerate(zip(one["steps"], many["steps"])):
            for key in ("actor/policy_loss", "actor/entropy", "actor/grad_norm", "reward/mean"):
                close = abs(a["metrics"][key] - b["metrics"][key]) <= 1e-3 + 3e-2 * abs(a["metrics"][key])
                ok &= close
                print(f"FSDP step {step} {key}: 1 GPU {a['metrics'][key]:.6f}, {args.devices} GPUs FSDP {b['metrics'][key]:.6f}: {'ok' if close else 'MISMATCH'}")
        ok &= len(many["steps"]) == 3
        try:
            launch(args.out / "fsdp_many_eval", args.devices, *common, "--trainer", "fsdp")
            evaluated = torch.load(args.out / "fsdp_many_eval" / "grpo.pt")["eval"]
            print(f"FSDP with evaluation: {len(evaluated)} evaluations, prompts {[m['prompts'] for _, m in evaluated]}")
        except SystemExit as failure:
            print(failure)
            ok = False
    print("ALL OK" if ok else "FAILED")
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
