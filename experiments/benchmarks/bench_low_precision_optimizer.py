"""Can a low-precision optimiser stand in for float32 master weights? AdamW on bfloat16 parameters,
plain and with Kahan-compensated updates (torch-optimi), against AdamW on float32 parameters.

    pip install --no-deps torch-optimi==0.3.3      # not a project dependency
    python experiments/benchmarks/bench_low_precision_optimizer.py [--steps 10 100 1000] [--size 200000]

The workload is the STEER paper's optimiser (lr 1e-6, betas 0.9/0.999, eps 1e-8, weight decay 0.01)
on weights drawn like a fine-tuned decoder's: N(0, 0.02) matrices plus 1,000 norm gains at 1.0. Every
variant sees the same gradients (unit Gaussian noise plus a constant 0.5, so updates accumulate).
What the forward pass uses is the parameter tensor itself, so that is what is compared: the share of
weights that moved, the mean |Δw| against float32's, the mean |Δw − Δw_float32| against float32's
mean |Δw|, and whether the norm gains moved.

Why a compensated optimiser can still lag: its buffer carries the rounding error, but the bfloat16
parameter changes only once the buffered sum passes half a spacing of its neighbours, 6.1e-5 for a
weight of 0.02 (61 steps of lr 1e-6) and 3.9e-3 for a gain at 1.0 (3,900 steps).
"""

from __future__ import annotations

import argparse

import torch

VARIANTS = ("float32", "bfloat16", "bfloat16 + Kahan (torch-optimi)")


def initial_weights(size: int, gains: int = 1000) -> torch.Tensor:
    weights = torch.randn(size, generator=torch.Generator().manual_seed(0)) * 0.02
    weights[:gains] = 1.0
    return weights


def train(variant: str, start: torch.Tensor, steps: int) -> torch.Tensor:
    """The parameter (as float32) after ``steps`` AdamW steps of ``variant``."""
    settings = {"lr": 1e-6, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.01}
    weight = torch.nn.Parameter(start.clone() if variant == "float32" else start.bfloat16())
    if variant.endswith("(torch-optimi)"):
        import optimi

        optimizer = optimi.AdamW([weight], kahan_sum=True, foreach=False, **settings)
    else:
        optimizer = torch.optim.AdamW([weight], **settings)
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        weight.grad = (torch.randn(start.shape, generator=generator) + 0.5).to(weight.dtype)
        optimizer.step()
        optimizer.zero_grad()
    return weight.detach().float()


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--size", type=int, default=200_000)
    args = parser.parse_args(argv)
    try:
        import optimi  # noqa: F401
        variants = VARIANTS
    except ImportError:
        print("torch-optimi is not installed (pip install --no-deps torch-optimi==0.3.3): its row is skipped")
        variants = VARIANTS[:2]
    start, rows = initial_weights(args.size), []
    print(f"{'steps':>5s}  {'optimiser':32s} {'moved':>7s} {'drift/f32':>9s} {'error/f32':>9s} {'gains moved':>11s}")
    for steps in args.steps:
        reference = train("float32", start, steps) - start
        for variant in variants:
            initial = start if variant == "float32" else start.bfloat16().float()
            delta = train(variant, start, steps) - initial
            row = {"steps": steps, "variant": variant, "moved": (delta != 0).float().mean().item(),
                   "drift_ratio": delta.abs().mean().item() / reference.abs().mean().item(),
                   "error_ratio": (delta - reference).abs().mean().item() / reference.abs().mean().item(),
                   "gains_moved": (delta[:1000] != 0).float().mean().item()}
            rows.append(row)
            print(f"{steps:5d}  {variant:32s} {row['moved']:7.2%} {row['drift_ratio']:9.3f} {row['error_ratio']:9.3f} "
                  f"{row['gains_moved']:11.1%}")
    return rows


if __name__ == "__main__":
    main()
