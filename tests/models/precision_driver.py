"""Train a config as a user composes it, with only the model shrunk, and report how far its weights moved.

    python tests/models/precision_driver.py OUT.json MODEL_DIR "OVERRIDES" [...] [--unchecked "OVERRIDES" ...]

Each argument after ``MODEL_DIR`` is one run: the user's overrides (``+experiment=steer_math`` or
``model=hf``), separated by spaces. Every run is trained twice through :func:`steer.app.train`:
as configured (its ``model.dtype``, ``model.compute_dtype``, ``trainer.precision``, strategy and
``algorithm.lr``), and as the float32 reference (float32 parameters *and* compute, all else equal).
Runs after ``--unchecked`` train with the precision start-up check switched off (the tests'
negative control: bfloat16 parameters). ``OUT.json`` maps each run to the share of weights that moved, the mean |Δw| of both, the dtype the
optimiser stepped and the trainer's precision.

What is swapped, and why none of it decides the outcome:

- the model: a tiny Qwen2 saved as a Hugging Face folder (``model.path``; sizes only);
- sizes: steps, prompts, samples, mini-batches, micro-batches, response length, data limit, ranks
  (FSDP runs on one CPU process, where it keeps float32 shards and still casts compute to bf16);
- the device: ``trainer.accelerator=cpu``;
- the rollout engine and the reward: :class:`ScriptedRollout` and :class:`ParityReward` give the
  same responses and rewards to both runs, with rewards that differ within each group. A random
  tiny model earns no DAPO reward, so the real reward would give zero advantages and no gradient
  at all; and the reference run must see the same batch for its drift to be comparable;
- evaluation, checkpoints, probe and logger are off (nothing they do touches the update).
"""

from __future__ import annotations

import json
import shlex
import sys
import zlib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO))

import lightning as L  # noqa: E402
import torch  # noqa: E402

from steer.rewards.base import RewardOutput  # noqa: E402
from steer.rollout.base import RolloutBatch, SamplingParams  # noqa: E402
from tests.distributed.ddp_driver import compose, scripted_batch  # noqa: E402

SIZES = [
    "algorithm.steps=2",
    "algorithm.n=2",
    "algorithm.prompts_per_step=4",
    "algorithm.minibatch_prompts=2",  # 2 optimiser steps per RL step, 4 in all
    "algorithm.micro_batch_size=2",
    "rollout.max_new_tokens=12",
    "rollout.max_prompt_length=2048",  # the tiny model's tokenizer has one token per character
    "trainer.accelerator=cpu",
    "trainer.devices=1",
    "~eval.benchmarks",
    "callbacks.checkpoint=null",
    "callbacks.progress=null",
    "callbacks.entropy_probe=null",
    "logger=none",
    "threads=1",
    "+trainer.enable_progress_bar=false",
    "rollout.engine._target_=tests.models.precision_driver.ScriptedRollout",
    "reward._target_=tests.models.precision_driver.ParityReward",
]
FLOAT32_REFERENCE = ["model.dtype=float32", "model.compute_dtype=float32"]


class ScriptedRollout:
    """Responses that are a pure function of the prompt's ids: 2-11 random printable tokens, then EOS."""

    def __init__(self, policy=None, pad_token_id: int = 0, eos_token_id: int = 1, **_) -> None:
        self.pad, self.eos = pad_token_id, eos_token_id
        self.low = max(pad_token_id, eos_token_id) + 2  # skip the special tokens

    def sync_weights(self, policy) -> None:
        self.vocab = policy.get_input_embeddings().num_embeddings

    def generate(self, prompt_token_ids, params: SamplingParams) -> RolloutBatch:
        responses = []
        for ids in prompt_token_ids:
            generator = torch.Generator().manual_seed(zlib.crc32(bytes(str(list(ids)), "ascii")))
            for _ in range(params.n):
                length = int(torch.randint(2, 12, (), generator=generator))
                tokens = torch.randint(self.low, self.vocab, (length,), generator=generator).tolist()
                responses.append((tokens + [self.eos])[: params.max_new_tokens])
        return scripted_batch(prompt_token_ids, responses, params.n, self.pad, self.eos)


class ParityReward:
    """1 for a response of even length, 0 for odd: rewards that vary within groups (any reward preset's
    knobs are accepted and ignored)."""

    def __init__(self, **_) -> None:
        pass

    def __call__(self, responses, references) -> RewardOutput:
        scores = [float(len(response) % 2 == 0) for response in responses]
        return RewardOutput(scores=scores, correct=[score > 0 for score in scores])


def _full(tensor: torch.Tensor) -> torch.Tensor:
    """A float64 copy of the whole tensor in CPU memory (FSDP shards gathered; on a GPU the copies
    stay out of the device memory that gpu_precision.py measures)."""
    tensor = tensor.detach()
    return (tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor).to("cpu", torch.float64, copy=True)


class WeightDrift(L.Callback):
    """The policy's parameters before and after training (FSDP shards gathered), compared; the
    result is written to ``out_file`` as JSON."""

    def __init__(self, out_file: str) -> None:
        self.out_file = Path(out_file)

    def on_train_start(self, trainer, module) -> None:
        self.initial = {name: _full(p) for name, p in module.policy.named_parameters()}
        self.dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in module.policy.parameters()})

    def on_train_end(self, trainer, module) -> None:
        moved = total = 0
        drift = 0.0
        for name, parameter in module.policy.named_parameters():
            delta = (_full(parameter) - self.initial[name]).abs()
            moved += int((delta > 0).sum())
            total += delta.numel()
            drift += float(delta.sum())
        states = {str(v.dtype).removeprefix("torch.") for s in trainer.optimizers[0].state.values()
                  for k, v in s.items() if torch.is_tensor(v) and k in ("exp_avg", "exp_avg_sq")}
        result = {"moved": moved / total, "mean_abs_drift": drift / total, "parameter_dtypes": self.dtypes,
                  "optimizer_state_dtypes": sorted(states), "optimizer_steps": module.rl_step * module.optimizer_steps_per_batch}
        if trainer.is_global_zero:
            self.out_file.write_text(json.dumps(result))


def train(overrides: list[str], output_dir: Path, precision_check: bool = True) -> dict:
    """Train ``overrides`` with :func:`steer.app.train`; the weights' drift and the last step's metrics.
    ``precision_check=False`` leaves the precision start-up check out: the failure it refuses,
    measured on purpose (the negative control)."""
    import steer.startup
    from steer.app import train as train_config

    output_dir.mkdir(parents=True, exist_ok=True)
    drift_file = output_dir / "weight_drift.json"
    recorder = ["+callbacks.weight_drift._target_=tests.models.precision_driver.WeightDrift",
                f"+callbacks.weight_drift.out_file={drift_file}"]
    cfg = compose([*overrides, *recorder], output_dir)
    checks = list(steer.startup.STARTUP_CHECKS)
    if not precision_check:
        steer.startup.STARTUP_CHECKS.remove(steer.startup.check_precision)
    try:
        metrics = train_config(cfg)
    finally:
        steer.startup.STARTUP_CHECKS[:] = checks
    return {**json.loads(drift_file.read_text()), "last_step": metrics, "trainer_precision": str(cfg.trainer.precision),
            "model_dtype": cfg.model.dtype, "compute_dtype": cfg.model.compute_dtype, "lr": cfg.algorithm.lr,
            "strategy": str((cfg.trainer.get("strategy") or {}).get("_target_", "single device"))}


def main(argv: list[str]) -> None:
    out, model_dir, runs = Path(argv[0]), argv[1], argv[2:]
    unchecked = runs[runs.index("--unchecked") + 1:] if "--unchecked" in runs else []
    runs = runs[: runs.index("--unchecked")] if "--unchecked" in runs else runs
    torch.set_num_threads(1)
    results = {}
    for index, run in enumerate([*runs, *unchecked]):
        base = [*shlex.split(run), f"model.path={model_dir}", "model.gguf_file=null", *SIZES]
        results[run] = {
            "configured": train(base, out.parent / f"run{index}", precision_check=run in runs),
            "float32": train([*base, *FLOAT32_REFERENCE], out.parent / f"run{index}_float32"),
        }
        print(run, json.dumps(results[run]), flush=True)
    out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main(sys.argv[1:])
