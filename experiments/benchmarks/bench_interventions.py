"""What each entropy intervention costs: every preset of ``conf/intervention/`` against ``grpo``.

Two measurements, both interleaved across presets (round r runs every preset once, in an order
rotated by r), so that machine noise hits every preset alike:

1. **Step time** on the embedded default (``python src/run.py``'s config; its warm-up is cached):
   ``--rounds`` rounds of ``--steps`` measured RL steps (after one warm-up step) per preset, each
   assembled by :func:`bench_step.measure` in this process. Overhead = median step of the preset
   minus that of ``grpo``. Under load a few steps cannot resolve 2%: read it beside (2).
2. **Loss + backward alone**: one optimiser step's :func:`steer.algo.policy_loss.policy_loss` and
   its backward on :class:`PolicyTokens` of the embedded default's shape (one mini-batch: 8 prompts
   x 8 samples, 40 response positions, vocabulary 100), log-probs and entropies taken from a logits
   leaf so that the backward runs through the entropy/log-prob head as in training; ``--repeats``
   interleaved repeats. Presets whose interventions need a no-grad pass over the whole mini-batch
   (``needs_minibatch_pass``, e.g. ``scope: global``) have that :func:`begin_minibatch` call timed
   separately. Overhead per RL step = (preset - grpo) x optimiser steps per RL step, in ms and in %
   of grpo's median step time from (1) (or ``--step-ms`` with ``--skip-steps``). Target: <= 2%.

    python experiments/benchmarks/bench_interventions.py [--rounds 2 --steps 3 --repeats 300] [--json out.json]
    python experiments/benchmarks/bench_interventions.py --quick   # seconds: a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_step import compose, measure  # noqa: E402


def presets() -> list[str]:
    """Every preset of conf/intervention/, grpo first (the baseline)."""
    names = sorted(p.stem for p in (REPO / "conf" / "intervention").glob("*.yaml"))
    return ["grpo"] + [name for name in names if name != "grpo"]


def rotated(items: list[str], r: int) -> list[str]:
    shift = r % len(items)
    return items[shift:] + items[:shift]


# ------------------------------------------------------------------------------- 1. step time
def step_times(names: list[str], rounds: int, steps: int, overrides: list[str]) -> dict[str, list[float]]:
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in rotated(names, r):
            result = measure([f"intervention={name}", *overrides], warmup=1, steps=steps)
            seconds[name].extend(result["step_s"])
            print(f"  round {r} {name:<24} median step {result['step_median_s'] * 1e3:8.1f} ms  "
                  f"load {os.getloadavg()[0]:.2f}", flush=True)
    return seconds


# ------------------------------------------------------------------------ 2. loss + backward
class LossCase:
    """One preset's interventions and the inputs of one optimiser step (fresh graph every call)."""

    def __init__(self, name: str, overrides: list[str], sequences: int, width: int, vocab: int, seed: int) -> None:
        from steer.algo.interventions.base import ClipConfig
        from steer.algo.policy_loss import LossTotals
        from steer.app import build_interventions

        cfg = compose([f"intervention={name}", *overrides])
        self.name = name
        self.interventions = build_interventions(cfg)
        self.needs_pass = any(i.needs_minibatch_pass for i in self.interventions)
        clip = cfg.algorithm.clip
        self.clip = ClipConfig(clip.low, clip.high, clip.dual)
        self.aggregation = str(cfg.algorithm.loss_aggregation)
        self.steps_per_rl_step = int(cfg.algorithm.epochs) * (int(cfg.algorithm.prompts_per_step) // int(cfg.algorithm.minibatch_prompts))
        generator = torch.Generator().manual_seed(seed)
        self.logits = torch.randn(sequences, width, vocab, generator=generator)
        self.targets = torch.randint(vocab, (sequences, width), generator=generator)
        lengths = torch.randint(width // 4, width + 1, (sequences,), generator=generator)
        self.mask = torch.arange(width)[None, :] < lengths[:, None]
        group = int(cfg.algorithm.n)
        rewards = (torch.rand(sequences // group, group, generator=generator) < 0.4).float()
        advantages = (rewards - rewards.mean(-1, keepdim=True)) / (rewards.std(-1, keepdim=True) + 1e-6)
        self.advantages = advantages.view(-1, 1).expand(-1, width)
        # pi_old a little away from pi_theta, so that ratios are not all 1 and clipping is exercised.
        self.noise = 0.05 * torch.randn(sequences, width, generator=generator)
        self.totals = LossTotals(tokens=float(self.mask.sum()), sequences=float(sequences), max_response_length=width)

    def tokens(self, logits: torch.Tensor):
        from steer.algo.interventions.base import PolicyTokens
        from steer.algo.logprobs import logprobs_and_entropy_from_logits

        logprobs, entropy = logprobs_and_entropy_from_logits(logits, self.targets)
        old = (logprobs.detach() + self.noise) * self.mask
        return PolicyTokens(logprobs=logprobs, entropy=entropy, old_logprobs=old, old_entropy=entropy.detach() * self.mask,
                            advantages=self.advantages, mask=self.mask)

    def minibatch_pass(self) -> float:
        """Seconds of the no-grad whole-mini-batch pass (0 when no intervention needs one)."""
        from steer.algo.policy_loss import begin_minibatch

        if not self.needs_pass:
            return 0.0
        start = time.perf_counter()
        with torch.no_grad():
            begin_minibatch(self.tokens(self.logits), self.clip, self.interventions)
        return time.perf_counter() - start

    def loss_and_backward(self) -> float:
        from steer.algo.policy_loss import policy_loss

        logits = self.logits.clone().requires_grad_(True)
        start = time.perf_counter()
        loss, _ = policy_loss(self.tokens(logits), self.clip, self.interventions, self.aggregation, self.totals)
        loss.backward()
        seconds = time.perf_counter() - start
        if logits.grad is None or not torch.isfinite(logits.grad).all():
            raise RuntimeError(f"{self.name}: no finite gradient reached the logits")
        return seconds


def loss_times(names: list[str], repeats: int, overrides: list[str], sequences: int, width: int, vocab: int):
    cases = {name: LossCase(name, overrides, sequences, width, vocab, seed=0) for name in names}
    for case in cases.values():  # warm-up: first calls allocate and pick kernels
        case.minibatch_pass(), case.loss_and_backward()
    loss = {name: [] for name in names}
    passes = {name: [] for name in names}
    for r in range(repeats):
        for name in rotated(names, r):
            passes[name].append(cases[name].minibatch_pass())
            loss[name].append(cases[name].loss_and_backward())
    return cases, loss, passes


# -------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2, help="step-time rounds (every preset once per round)")
    parser.add_argument("--steps", type=int, default=3, help="measured RL steps per preset and round")
    parser.add_argument("--repeats", type=int, default=300, help="interleaved loss+backward repeats per preset")
    parser.add_argument("--presets", nargs="+", help="only these presets (grpo is always added)")
    parser.add_argument("--skip-steps", action="store_true", help="loss + backward only")
    parser.add_argument("--step-ms", type=float, help="grpo step time for the %% column when --skip-steps")
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny model, 1 round of 1 step, 5 repeats")
    parser.add_argument("--json", type=Path)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every preset (e.g. threads=1)")
    args = parser.parse_args(argv)
    names = presets() if not args.presets else ["grpo"] + [p for p in args.presets if p != "grpo"]
    overrides = list(args.overrides)
    if args.quick:
        args.rounds, args.steps, args.repeats = 1, 1, 5
        overrides = ["model.warmup=null", "model.tiny.hidden_size=32", "model.tiny.num_layers=1", "algorithm.n=4",
                     "algorithm.prompts_per_step=4", "algorithm.minibatch_prompts=2", "rollout.max_new_tokens=16", *overrides]
    load_before = os.getloadavg()
    cfg = compose(overrides)
    sequences = int(cfg.algorithm.minibatch_prompts) * int(cfg.algorithm.n)
    width = int(cfg.rollout.max_new_tokens)
    from steer.models.tiny import build_char_tokenizer

    vocab = len(build_char_tokenizer()) if cfg.model.get("path") is None else int(os.environ.get("BENCH_VOCAB", "49152"))

    result: dict = {"presets": names, "overrides": overrides, "load_average_before": list(load_before)}
    step_ms = args.step_ms
    if not args.skip_steps:
        print(f"1. step time, {args.rounds} round(s) x {args.steps} step(s) per preset (after 1 warm-up step)", flush=True)
        seconds = step_times(names, args.rounds, args.steps, overrides)
        medians = {name: statistics.median(values) * 1e3 for name, values in seconds.items()}
        step_ms = medians["grpo"]
        result["step_ms_median"] = medians
        result["step_ms_all"] = {name: [s * 1e3 for s in values] for name, values in seconds.items()}

    print(f"2. loss + backward alone: {sequences} sequences x {width} positions x vocabulary {vocab}, "
          f"{args.repeats} interleaved repeats", flush=True)
    cases, loss, passes = loss_times(names, args.repeats, overrides, sequences, width, vocab)
    per_step = cases["grpo"].steps_per_rl_step
    loss_ms = {name: statistics.median(values) * 1e3 for name, values in loss.items()}
    pass_ms = {name: statistics.median(values) * 1e3 for name, values in passes.items()}
    result.update(loss_backward_ms_median=loss_ms, minibatch_pass_ms_median=pass_ms, optimizer_steps_per_rl_step=per_step,
                  needs_minibatch_pass={name: case.needs_pass for name, case in cases.items()})

    header = f"{'preset':<24} {'loss+bwd ms':>11} {'+ms/step':>9} {'% step':>7} {'pass ms':>8}"
    if not args.skip_steps:
        header += f" {'step ms':>9} {'+ms':>8} {'%':>7}"
    print(f"\ngrpo step {step_ms:.1f} ms" if step_ms else "", f"(+ms/step = loss+backward overhead x {per_step} optimiser steps per RL step)")
    print(header)
    rows = {}
    for name in names:
        extra = (loss_ms[name] - loss_ms["grpo"] + pass_ms[name]) * per_step
        row = {"loss_backward_ms": loss_ms[name], "overhead_ms_per_rl_step": extra, "minibatch_pass_ms": pass_ms[name],
               "overhead_pct_of_step": 100 * extra / step_ms if step_ms else None}
        pct = f"{row['overhead_pct_of_step']:+6.2f}%" if step_ms else "-"
        passed = f"{pass_ms[name]:8.3f}" if cases[name].needs_pass else "-"
        line = f"{name:<24} {loss_ms[name]:11.3f} {extra:+9.3f} {pct:>7} {passed:>8}"
        if not args.skip_steps:
            delta = result["step_ms_median"][name] - step_ms
            row.update(step_ms=result["step_ms_median"][name], step_overhead_ms=delta, step_overhead_pct=100 * delta / step_ms)
            line += f" {result['step_ms_median'][name]:9.1f} {delta:+8.1f} {100 * delta / step_ms:+6.1f}%"
        rows[name] = row
        print(line)
    result["table"] = rows
    result["load_average_after"] = list(os.getloadavg())
    print(f"load average {' '.join(f'{x:.2f}' for x in load_before)} -> {' '.join(f'{x:.2f}' for x in result['load_average_after'])}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    sys.path.insert(0, str(REPO / "src"))
    main()
