"""The same GRPO workload in this project and in TRL's ``GRPOTrainer``, interleaved run by run.

Workload (both systems): a random-init Qwen2 built by the project's own tiny-model builder (same
architecture, same parameter count, same character tokenizer) at two sizes, the embedded arithmetic
task's first prompts rendered by the chat template, 8 prompts x 8 samples = 64 completions per
optimiser step, at most 48 new tokens, temperature 1, one optimiser step per rollout batch, the same
learning rate (constant), AdamW, gradient clipping at 1, token-mean (DAPO) loss with clip 0.2, no KL
term (TRL ``beta=0``: no reference model), float32 on CPU (``--trl-bf16 --trl-attn eager`` gives TRL
the arithmetic of ``model.compute_dtype=bfloat16 model.attn_implementation=eager``), 2 torch threads, the project's math
reward for both, no evaluation, no entropy probe, no logging, no checkpoints. Ours runs with its
default ``reuse_freed_memory=true`` (glibc's malloc thresholds fixed, see ``steer.allocator``);
``--trl-reuse-freed-memory`` gives TRL's process the same thresholds (glibc's ``MALLOC_*`` variables).

Each run is its own subprocess (imports, thread pools and allocator state equal), the two systems
alternate run by run (ours, TRL, TRL, ours, ours, TRL, ...: the start order flips every pair so
a drifting load favours neither), and the machine's load average is printed beside
every run. Reported per size: whole-process wall time for ``--steps`` RL steps (interpreter start
to exit), median step time after ``--warmup`` steps (ours: the step clock of bench_step.py; TRL: a
``TrainerCallback`` timing ``on_step_begin`` -> ``on_step_end``, which includes its generation),
and ratio = ours / TRL of both (median over the pairs).

TRL lives only in its own venv (``make bench-trl`` or ``bash scripts/install_bench_trl.sh``)::

    python experiments/benchmarks/bench_vs_trl.py --pairs 3 [--sizes small large] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
TRL_PYTHON = REPO / ".venv-trl" / "bin" / "python"

# hidden, layers, heads of the tiny Qwen2 (character tokenizer): 305,568 and 2,382,528 parameters (vocabulary 100).
SIZES = {"small": (96, 2, 4), "large": (192, 4, 4)}
PROMPTS, SAMPLES = 8, 8
# Response lengths, the same for both systems. fixed: a random-init policy samples its 100 tokens about
# uniformly, so EOS ends ~38% of the responses before the 48-token limit and the rest run to it.
# variable: the same policy with a bias on the EOS logit (with_eos_bias) that makes EOS about 1/32
# likely at every token: lengths spread geometrically from 1 to the 128-token limit (median ~22,
# mean ~31, ~2% truncated), the long tail of real RLVR responses.
WORKLOADS = {"fixed": {"new_tokens": 48, "eos_probability": None}, "variable": {"new_tokens": 128, "eos_probability": 1 / 32}}


def with_eos_bias(model, eos_token_id: int, probability: float | None):
    """``model`` whose output head adds a bias to the EOS logit only: with near-uniform logits (a
    random-init policy) EOS then has about ``probability`` at every position. The head keeps its
    (tied) weight; the bias is a parameter like any other. None: the model unchanged."""
    import math

    import torch

    if probability is None:
        return model
    head = model.get_output_embeddings()
    biased = torch.nn.Linear(head.in_features, head.out_features, bias=True, dtype=head.weight.dtype)
    biased.weight = head.weight
    with torch.no_grad():
        biased.bias.zero_()
        biased.bias[eos_token_id] = math.log(probability * (head.out_features - 1) / (1 - probability))
    model.set_output_embeddings(biased)
    return model


def our_overrides(size: str, threads: int, workload_name: str = "fixed") -> list[str]:
    hidden, layers, heads = SIZES[size]
    return [
        "model.warmup=null",  # random init, as TRL gets it
        f"model.tiny.hidden_size={hidden}",
        f"model.tiny.num_layers={layers}",
        f"model.tiny.num_heads={heads}",
        "model.tiny.max_positions=256",  # prompts + 128 new tokens
        f"algorithm.prompts_per_step={PROMPTS}",
        f"algorithm.minibatch_prompts={PROMPTS}",  # one optimiser step per rollout batch, as TRL
        f"algorithm.n={SAMPLES}",
        f"rollout.max_new_tokens={WORKLOADS[workload_name]['new_tokens']}",
        f"threads={threads}",
    ]


def workload(size: str, steps: int, threads: int, workload_name: str = "fixed") -> dict:
    """What the TRL worker needs, taken from the composed config of our run (so both see the same
    model settings, prompts, learning rate, clipping and reward)."""
    sys.path.insert(0, str(HERE))
    from bench_step import compose
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from steer.data.prompts import render_prompt
    from steer.models.tiny import build_char_tokenizer

    cfg = compose(our_overrides(size, threads, workload_name))
    tokenizer = build_char_tokenizer()
    prompts = instantiate(cfg.data.train)
    records = [prompts[i] for i in range(PROMPTS * steps)]  # our data order: step t takes t*8 .. t*8+7
    return {
        "size": size,
        "tiny": OmegaConf.to_container(cfg.model.tiny, resolve=True),
        "prompts": [render_prompt(r, tokenizer, bool(cfg.data.use_chat_template)) for r in records],
        "references": [r.reference for r in records],
        "reward": OmegaConf.to_container(cfg.reward, resolve=True),
        "lr": float(cfg.algorithm.lr),
        "weight_decay": float(cfg.algorithm.weight_decay),
        "betas": list(cfg.algorithm.betas),
        "grad_clip": float(cfg.algorithm.grad_clip),
        "clip_low": float(cfg.algorithm.clip.low),
        "clip_high": float(cfg.algorithm.clip.high),
        "temperature": float(cfg.rollout.temperature),
        "top_p": float(cfg.rollout.top_p),
        "seed": int(cfg.seed),
        "steps": steps,
        "threads": threads,
        "new_tokens": WORKLOADS[workload_name]["new_tokens"],
        "eos_probability": WORKLOADS[workload_name]["eos_probability"],
    }


# ---------------------------------------------------------------------------------------- workers
def run_ours(size: str, steps: int, warmup: int, threads: int, workload_name: str = "fixed", extra: list[str] = ()) -> dict:
    sys.path.insert(0, str(HERE))
    from bench_step import measure

    import steer.models.tiny as tiny

    build, probability = tiny.build_tiny_policy, WORKLOADS[workload_name]["eos_probability"]
    tiny.build_tiny_policy = lambda tokenizer, **kw: with_eos_bias(build(tokenizer, **kw), tokenizer.eos_token_id, probability)
    result = measure([*our_overrides(size, threads, workload_name), *extra], warmup=warmup, steps=steps - warmup)
    return {"step_median_s": result["step_median_s"], "parameters": result["parameters"],
            "phase_median_s": result["phase_median_s"], "generated_tokens_per_step": result["generated_tokens_per_step"],
            "step_s": result["step_s"], "setup_s": result["setup_s"]}


def run_trl(spec: dict, warmup: int) -> dict:
    import torch

    torch.set_num_threads(spec["threads"])
    from datasets import Dataset
    from hydra.utils import instantiate
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from steer.models.tiny import build_char_tokenizer, build_tiny_policy
    from steer.rewards.base import score_safely

    tokenizer = build_char_tokenizer()
    model = with_eos_bias(build_tiny_policy(tokenizer, **spec["tiny"]), tokenizer.eos_token_id, spec["eos_probability"])
    if spec.get("attn_implementation"):
        model.set_attn_implementation(spec["attn_implementation"])
    reward = instantiate(spec["reward"])

    def math_reward(prompts, completions, reference, **_):
        clock.tokens.append(sum(len(c) for c in completions))  # characters = tokens (EOS left out)
        return list(score_safely(reward, completions, reference).scores)

    class StepTimes(TrainerCallback):
        def __init__(self) -> None:
            self.seconds: list[float] = []
            self.tokens: list[int] = []  # sampled per step (the reward sees every completion once)
            self._start = 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            self._start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.seconds.append(time.perf_counter() - self._start)

    generation_batch = PROMPTS * SAMPLES
    config = GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="trl-bench-"),
        per_device_train_batch_size=generation_batch,  # 64 completions in one optimiser step ...
        gradient_accumulation_steps=1,
        generation_batch_size=generation_batch,  # ... from one generation of 8 prompts x 8
        num_generations=SAMPLES,
        num_iterations=1,
        max_completion_length=spec["new_tokens"],
        max_steps=spec["steps"],
        learning_rate=spec["lr"],
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=spec["weight_decay"],
        adam_beta1=spec["betas"][0],
        adam_beta2=spec["betas"][1],
        max_grad_norm=spec["grad_clip"],
        beta=0.0,  # no KL term, no reference model (as ours with algorithm.kl.coef=0)
        epsilon=spec["clip_low"],
        epsilon_high=spec["clip_high"],
        loss_type="dapo",  # token-mean over the batch (ours: loss_aggregation=token-mean)
        temperature=spec["temperature"],
        top_p=spec["top_p"],
        top_k=0,
        shuffle_dataset=False,  # our order of prompts
        use_cpu=True,
        bf16=spec.get("bf16", False),  # --trl-bf16: accelerate's bf16 autocast (float32 weights), as our compute_dtype
        fp16=False,
        gradient_checkpointing=False,  # TRL's default is on; ours does not recompute
        report_to="none",
        logging_strategy="no",
        save_strategy="no",
        eval_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=spec["seed"],
    )
    dataset = Dataset.from_dict({"prompt": spec["prompts"], "reference": spec["references"]})
    clock = StepTimes()
    trainer = GRPOTrainer(model=model, reward_funcs=[math_reward], args=config, train_dataset=dataset,
                          processing_class=tokenizer, callbacks=[clock])
    trainer.train()
    if len(clock.seconds) != spec["steps"]:
        raise RuntimeError(f"TRL made {len(clock.seconds)} optimiser steps, expected {spec['steps']}")
    return {"step_median_s": statistics.median(clock.seconds[warmup:]), "parameters": sum(p.numel() for p in model.parameters()),
            "step_s": clock.seconds, "generated_tokens_per_step": statistics.median(clock.tokens[warmup:]) if clock.tokens else None,
            "malloc_mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_")}


# ---------------------------------------------------------------------------------------- driver
def launch(command: list[str], env: dict) -> tuple[float, dict, str]:
    """Run one worker; its whole-process wall time, its JSON result and the tail of its log."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as handle:
        out = Path(handle.name)
    start = time.perf_counter()
    done = subprocess.run([*command, "--out", str(out)], cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"worker failed ({done.returncode}): {' '.join(command)}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    result = json.loads(out.read_text())
    out.unlink()
    return wall, result, done.stderr[-2000:]


def parse_variant(text: str) -> tuple[str, list[str]]:
    """``name=override override ...`` (``default=`` is ours as configured)."""
    name, _, overrides = text.partition("=")
    if not name:
        raise argparse.ArgumentTypeError(f"--ours wants NAME=OVERRIDES, got {text!r}")
    return name, overrides.split()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", choices=sorted(SIZES), default=["small", "large"])
    parser.add_argument("--workloads", nargs="+", choices=list(WORKLOADS), default=list(WORKLOADS))
    parser.add_argument("--ours", type=parse_variant, action="append",
                        help="a configuration of ours, NAME='override ...' (repeatable; default: default=, ours as configured)")
    parser.add_argument("--pairs", type=int, default=3, help="runs of each system per size (interleaved)")
    parser.add_argument("--steps", type=int, default=12, help="RL steps (= optimiser steps) per run")
    parser.add_argument("--warmup", type=int, default=2, help="steps left out of the median step time")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--trl-bf16", action="store_true", help="TRL with bf16=True (bf16 autocast) instead of float32")
    parser.add_argument("--trl-attn", help="TRL's model with this attn_implementation (e.g. eager) instead of its own SDPA")
    parser.add_argument("--trl-reuse-freed-memory", action="store_true",
                        help="TRL's process with the malloc thresholds ours sets (reuse_freed_memory, via glibc's MALLOC_* variables)")
    parser.add_argument("--trl-python", type=Path, default=TRL_PYTHON, help="python of the venv with trl")
    parser.add_argument("--json", type=Path, help="write every run and the ratios here")
    parser.add_argument("--worker", choices=["ours", "trl"], help=argparse.SUPPRESS)
    parser.add_argument("--size", choices=sorted(SIZES), help=argparse.SUPPRESS)
    parser.add_argument("--workload", choices=list(WORKLOADS), default="fixed", help=argparse.SUPPRESS)
    parser.add_argument("--extra", default="", help=argparse.SUPPRESS)
    parser.add_argument("--spec", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    sys.path.insert(0, str(REPO / "src"))

    if args.worker == "ours":
        result = run_ours(args.size, args.steps, args.warmup, args.threads, args.workload, args.extra.split())
        args.out.write_text(json.dumps(result))
        return
    if args.worker == "trl":
        args.out.write_text(json.dumps(run_trl(json.loads(args.spec.read_text()), args.warmup)))
        return

    args.trl_python = args.trl_python.absolute()  # not resolve(): the venv's python is a symlink to the base one
    if not args.trl_python.exists():
        sys.exit(f"no TRL venv at {args.trl_python}: run `make bench-trl` (or bash scripts/install_bench_trl.sh) first")
    if args.warmup >= args.steps:
        sys.exit(f"--warmup ({args.warmup}) must be below --steps ({args.steps})")
    variants = dict(args.ours or [("default", [])])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
               TOKENIZERS_PARALLELISM="false")
    trl_env = env
    if args.trl_reuse_freed_memory:  # the same thresholds as steer.allocator, read by glibc at TRL's start
        from steer.allocator import MMAP_THRESHOLD, TRIM_THRESHOLD

        trl_env = dict(env, MALLOC_MMAP_THRESHOLD_=str(MMAP_THRESHOLD), MALLOC_TRIM_THRESHOLD_=str(TRIM_THRESHOLD))
    common = ["--steps", str(args.steps), "--warmup", str(args.warmup), "--threads", str(args.threads)]
    report = {"steps": args.steps, "warmup": args.warmup, "threads": args.threads, "trl_bf16": args.trl_bf16, "trl_attn": args.trl_attn,
              "trl_reuse_freed_memory": args.trl_reuse_freed_memory,
              "variants": {name: overrides for name, overrides in variants.items()}, "results": {}}
    print(f"{'workload':>8} {'size':>5} {'system':>12} {'pair':>4} {'params':>9} {'wall_s':>7} {'step_med_s':>10} "
          f"{'tokens/step':>11}  load average", flush=True)
    systems = ["trl", *variants]
    for workload_name in args.workloads:
        for size in args.sizes:
            spec_file = Path(tempfile.mkdtemp(prefix="bench-vs-trl-")) / f"{size}.json"
            spec_file.write_text(json.dumps({**workload(size, args.steps, args.threads, workload_name), "bf16": args.trl_bf16,
                                             "attn_implementation": args.trl_attn}))
            runs = {system: [] for system in systems}
            for pair in range(args.pairs):
                # Forwards, then backwards: a load that rises or falls during the run favours no system.
                for system in (systems if pair % 2 == 0 else systems[::-1]):
                    if system == "trl":
                        command = [str(args.trl_python), str(Path(__file__).resolve()), "--worker", "trl", "--spec", str(spec_file), *common]
                    else:
                        command = [sys.executable, str(Path(__file__).resolve()), "--worker", "ours", "--size", size,
                                   "--workload", workload_name, f"--extra={' '.join(variants[system])}", *common]
                    load = os.getloadavg()
                    wall, result, _ = launch(command, trl_env if system == "trl" else env)
                    result.update(wall_s=wall, load_average=list(load))
                    runs[system].append(result)
                    tokens = result.get("generated_tokens_per_step")
                    print(f"{workload_name:>8} {size:>5} {system:>12} {pair:>4} {result['parameters']:>9,} {wall:7.2f} "
                          f"{result['step_median_s']:10.4f} {tokens if tokens is not None else float('nan'):11.0f}  "
                          f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}", flush=True)
            trl = runs["trl"]
            summary = {"parameters": trl[0]["parameters"], "trl": {"wall_s_median": statistics.median(r["wall_s"] for r in trl),
                                                                  "step_s_median": statistics.median(r["step_median_s"] for r in trl)},
                       "ours": {}, "runs": runs}
            for name in variants:
                ours = runs[name]
                wall_ratios = [a["wall_s"] / b["wall_s"] for a, b in zip(ours, trl)]
                step_ratios = [a["step_median_s"] / b["step_median_s"] for a, b in zip(ours, trl)]
                summary["ours"][name] = {
                    "parameters": ours[0]["parameters"],
                    "wall_s_median": statistics.median(r["wall_s"] for r in ours),
                    "step_s_median": statistics.median(r["step_median_s"] for r in ours),
                    "ratio_wall": statistics.median(wall_ratios), "ratio_step": statistics.median(step_ratios),
                    "ratio_wall_pairs": wall_ratios, "ratio_step_pairs": step_ratios,
                }
            report["results"].setdefault(workload_name, {})[size] = summary
    print(f"\nratio = ours / TRL (median over {args.pairs} interleaved pairs; {args.steps} RL steps per run, "
          f"step medians after {args.warmup} warm-up steps, {args.threads} threads)")
    print(f"{'workload':>8} {'size':>5} {'ours':>12} {'wall ours':>9} {'wall trl':>8} {'ratio':>6} {'step ours':>9} {'step trl':>8} {'ratio':>6}")
    for workload_name, sizes in report["results"].items():
        for size, s in sizes.items():
            for name, o in s["ours"].items():
                print(f"{workload_name:>8} {size:>5} {name:>12} {o['wall_s_median']:9.2f} {s['trl']['wall_s_median']:8.2f} "
                      f"{o['ratio_wall']:6.2f} {o['step_s_median']:9.3f} {s['trl']['step_s_median']:8.3f} {o['ratio_step']:6.2f}")
    print(f"load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
