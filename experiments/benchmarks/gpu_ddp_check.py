"""GPU check of data parallelism (DDP, NCCL) and FSDP: run on a machine with >= 2 GPUs.

    python experiments/benchmarks/gpu_ddp_check.py [--out /tmp/gpu_ddp_check] [--devices 2]

With one GPU it runs every launch with one rank (the strategies' code paths, not the comparison
across ranks).

1. DDP: every case of tests/distributed/ddp_driver.py (grpo, steer / clip_cov / kl_cov with
   scope: global) on 1 GPU and on N GPUs over the same global batch; gradients and parameters after
   each RL step must agree to float32 rounding (TF32 off), and the logged metrics too.
2. FSDP (trainer=fsdp: FSDP2 full sharding, activation checkpointing) on N GPUs in float32 against
   1 GPU, exactly as DDP; then with bf16 mixed precision: loss, entropy and gradient norm within bf16
   tolerance of float32.

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
        # float32 FSDP (the fsdp_steer case: STEER scope global, micro-batches, activation
        # checkpointing) must match 1 GPU exactly, like DDP; then bf16 mixed precision to bf16 tolerance.
        launch(args.out / "fsdp_one", 1, "fsdp_steer")
        launch(args.out / "fsdp_many", args.devices, "fsdp_steer", "--trainer", "fsdp")
        ok &= compare_exact("fsdp_steer", torch.load(args.out / "fsdp_one" / "fsdp_steer.pt"),
                            torch.load(args.out / "fsdp_many" / "fsdp_steer.pt"))
        bf16 = ["fsdp_steer", "--trainer", "fsdp", "--override", "trainer.strategy.mixed_precision=bfloat16"]
        launch(args.out / "fsdp_bf16", args.devices, *bf16)
        one, many = torch.load(args.out / "fsdp_one" / "fsdp_steer.pt"), torch.load(args.out / "fsdp_bf16" / "fsdp_steer.pt")
        for step, (a, b) in enumerate(zip(one["steps"], many["steps"])):
            for key in ("actor/policy_loss", "actor/entropy", "actor/grad_norm"):
                close = abs(a["metrics"][key] - b["metrics"][key]) <= 1e-3 + 3e-2 * abs(a["metrics"][key])
                ok &= close
                print(f"FSDP bf16 step {step} {key}: float32 {a['metrics'][key]:.6f}, bf16 {b['metrics'][key]:.6f}: {'ok' if close else 'MISMATCH'}")
    print("ALL OK" if ok else "FAILED")
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
