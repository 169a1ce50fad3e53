"""A few RL steps of the embedded default on one process or on several CPU processes (Lightning
DDP, gloo), saving on rank 0 what the data-parallel tests compare.

    python tests/distributed/ddp_driver.py OUT_DIR DEVICES [CASE ...] [--accelerator gpu]
        [--trainer ddp|fsdp|default] [--override key=value ...]

For each case (an intervention with ``scope: global``) it writes ``OUT_DIR/<case>.pt``: the reduced
metrics of every RL step, the gradients of each step's last optimiser step and the parameters
after it. Lightning's own launcher starts the other ranks by re-running this command.

Rollouts come from :class:`ScriptedRollout`, a deterministic function of each prompt: sampling
with the policy would draw different random numbers on 1 and 2 processes, and the point here is
that the *update* is the same for the same global batch.
"""

from __future__ import annotations

import re
import sys
import zlib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO))

import lightning as L  # noqa: E402
import torch  # noqa: E402
from hydra.utils import instantiate  # noqa: E402

from steer.rollout.base import RolloutBatch, SamplingParams, left_pad  # noqa: E402
from tests.conftest import TINY_RUN  # noqa: E402

# The tests' tiny embedded default (tests/conftest.py), here with 2 optimiser steps per RL step and
# 2 prompts of each mini-batch per rank.
OVERRIDES = [
    *TINY_RUN,
    "algorithm.steps=3",
    "algorithm.prompts_per_step=8",
    "algorithm.minibatch_prompts=4",
    "rollout.max_new_tokens=16",
    "eval.every_n_steps=2",
    "eval.benchmarks.arithmetic.samples_per_prompt=2",
    "data.task.num_heldout=6",
    "logger=none",
]
# scope: global everywhere (the selections must not depend on how a mini-batch is split); bands and
# shares wide enough that Clip-Cov and KL-Cov select many tokens of these short batches.
CASES = {
    "grpo": ["intervention=grpo"],
    # Micro-batches too: 4 sequences, i.e. 2 per rank's mini-batch share and 4 in one process.
    "steer": ["intervention=steer", "intervention.components.steer.scope=global", "algorithm.micro_batch_size=4"],
    "clip_cov": [
        "intervention=clip_cov", "intervention.components.clip_cov.scope=global", "intervention.components.clip_cov.ratio=0.1",
        "intervention.components.clip_cov.omega_low=-1000", "intervention.components.clip_cov.omega_high=1000",
    ],
    # Each prompt's forward once for its samples, in micro-batches of 2 rows that cut every group of
    # n = 4 in two: the same update on 1 and 2 processes.
    "steer_shared": ["intervention=steer", "intervention.components.steer.scope=global", "algorithm.micro_batch_size=2",
                     "algorithm.share_prompt_prefix=true"],
    # Packed and shared at once (the hand-applied layers of steer.algo.packed_shared), groups cut as above.
    "steer_packed_shared": ["intervention=steer", "intervention.components.steer.scope=global", "algorithm.micro_batch_size=2",
                            "algorithm.share_prompt_prefix=true", "algorithm.pack_sequences=true"],
    "kl_cov": ["intervention=kl_cov", "intervention.components.kl_cov.scope=global", "intervention.components.kl_cov.ratio=0.1",
               "algorithm.micro_batch_size=4"],
    # Token-budget micro-batches (rows sorted by length; ranks may need different counts, and make
    # as many as the rank that needs most), under FSDP also packed: the same update on 1 and 2 processes.
    "steer_tokens": ["intervention=steer", "intervention.components.steer.scope=global", "algorithm.micro_batch_tokens=90"],
    "fsdp_tokens": ["intervention=steer", "intervention.components.steer.scope=global", "algorithm.micro_batch_tokens=90",
                    "algorithm.pack_sequences=true", "model.path=MODEL", "trainer.strategy.mixed_precision=null"],
    # FSDP on several ranks (one process: no sharding) with a saved copy of the tiny model, float32
    # throughout so that it can match exactly; activation checkpointing on.
    "fsdp_steer": ["intervention=steer", "intervention.components.steer.scope=global", "algorithm.micro_batch_size=4",
                   "model.path=MODEL", "trainer.strategy.mixed_precision=null"],
}
TRAINER_OF_CASE = {"fsdp_steer": "fsdp", "fsdp_tokens": "fsdp"}  # with more than one device; other cases: ddp


class ScriptedRollout:
    """Responses that are a pure function of the prompt: for sample ``j`` of ``Compute a+b+c.``,
    a right or wrong boxed sum (about half right) after a few filler digits, then EOS."""

    def __init__(self, tokenizer, eos_token_id: int, pad_token_id: int) -> None:
        self.tokenizer, self.eos, self.pad = tokenizer, eos_token_id, pad_token_id

    def sync_weights(self, policy) -> None:
        pass

    def generate(self, prompt_token_ids, params: SamplingParams) -> RolloutBatch:
        responses = []
        for ids in prompt_token_ids:
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
            terms = re.search(r"Compute ([0-9+]+)\.", text).group(1)
            total = sum(int(t) for t in terms.split("+"))
            generator = torch.Generator().manual_seed(zlib.crc32(bytes(str(list(ids)), "ascii")))
            for _ in range(params.n):
                right = bool(torch.rand((), generator=generator) < 0.5)
                filler = "".join(str(int(d)) for d in torch.randint(0, 10, (int(torch.randint(0, 6, (), generator=generator)),), generator=generator))
                answer = total if right else total + 1
                tokens = self.tokenizer.encode(f"{filler}\\boxed{{{answer}}}", add_special_tokens=False)
                responses.append((tokens + [self.eos])[: params.max_new_tokens])
        return scripted_batch(prompt_token_ids, responses, params.n, self.pad, self.eos)


def scripted_batch(prompt_token_ids, responses: list[list[int]], n: int, pad: int, eos: int) -> RolloutBatch:
    """Scripted responses (``n`` adjacent rows per prompt) as a RolloutBatch: prompts padded on the
    left, responses on the right, zero sampler log-probs, truncated where a response lacks EOS."""
    prompt_ids, prompt_mask = left_pad([ids for ids in prompt_token_ids for _ in range(n)], pad)
    width = max(len(r) for r in responses)
    response_ids = torch.full((len(responses), width), pad, dtype=torch.long)
    response_mask = torch.zeros((len(responses), width), dtype=torch.bool)
    for row, response in enumerate(responses):
        response_ids[row, : len(response)] = torch.tensor(response)
        response_mask[row, : len(response)] = True
    truncated = torch.tensor([r[-1] != eos for r in responses])
    return RolloutBatch(prompt_ids, prompt_mask, response_ids, response_mask, torch.zeros(response_ids.shape), truncated)


def _full(tensor: torch.Tensor) -> torch.Tensor:
    """A detached copy of the whole tensor (FSDP shards are gathered: every rank must call this)."""
    tensor = tensor.detach()
    return (tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor).clone()


class Recorder(L.Callback):
    """Keeps, after every RL step, the reduced metrics, the gradients of its last optimiser step and the parameters."""

    def __init__(self) -> None:
        self.steps: list[dict] = []
        self.initial: dict[str, torch.Tensor] = {}

    def on_train_start(self, trainer, module) -> None:
        self.initial = {k: _full(p) for k, p in module.policy.named_parameters()}

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx: int) -> None:
        self.steps.append({
            "metrics": dict(module.last_metrics),
            "grads": {k: _full(p.grad) for k, p in module.policy.named_parameters() if p.grad is not None},
            "params": {k: _full(p) for k, p in module.policy.named_parameters()},
            "prompts": [record.prompt for record in batch.records],
        })


def compose(overrides: list[str], output_dir: Path):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    import steer.app  # noqa: F401  registers the resolvers

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=[*overrides, f"output_dir={output_dir}", f"store_dir={output_dir}"])


def trainer_overrides(devices: int, accelerator: str = "cpu", trainer: str | None = None) -> list[str]:
    trainer = trainer or ("default" if devices == 1 else "ddp")
    return [f"trainer={trainer}", f"trainer.devices={devices}", f"trainer.accelerator={accelerator}"]


def run_case(case: str, devices: int, out_dir: Path, accelerator: str = "cpu", trainer_preset: str | None = None,
             extra: list[str] = (), evaluate: bool = True) -> dict | None:
    """Train one case; returns (and saves, on rank 0) what the tests compare."""
    from steer.app import build_evaluation, build_module
    from steer.data.datamodule import PromptDataModule

    preset = trainer_preset or (TRAINER_OF_CASE.get(case) if devices > 1 else None)
    overrides = [o.replace("MODEL", str(out_dir / "model")) for o in CASES[case]]
    if preset != "fsdp":
        overrides = [o for o in overrides if not o.startswith("trainer.strategy.")]
    cfg = compose([*OVERRIDES, *overrides, *trainer_overrides(devices, accelerator, preset), *extra,
                   "callbacks.checkpoint=null", "callbacks.entropy_probe.every_n_steps=1", "callbacks.entropy_probe.figures=[]"], out_dir / case)
    module, _ = build_module(cfg)
    module.rollout_engine = ScriptedRollout(module.tokenizer, module.tokenizer.eos_token_id, module.tokenizer.pad_token_id)
    datamodule = PromptDataModule(instantiate(cfg.data.train), module.tokenizer, module.algorithm.prompts_per_step,
                                  cfg.rollout.max_prompt_length, seed=cfg.seed, shuffle=cfg.data.shuffle,
                                  minibatch_prompts=module.algorithm.minibatch_prompts)
    recorder, evaluation = Recorder(), build_evaluation(cfg)
    callbacks = [instantiate(c) for c in cfg.callbacks.values() if c] + [recorder] + ([evaluation] if evaluate else [])
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=False, use_distributed_sampler=False)
    trainer.fit(module, datamodule=datamodule)
    if not trainer.is_global_zero:
        return None
    out_dir.mkdir(parents=True, exist_ok=True)
    result = {"steps": recorder.steps, "initial": recorder.initial, "eval": [(r.step, r.metrics) for r in evaluation.history],
              "world_size": trainer.world_size}
    torch.save(result, out_dir / f"{case}.pt")
    return result


def save_model(folder: Path) -> None:
    """The tiny policy of OVERRIDES, randomly initialised, as a model folder (for model.path)."""
    from steer.models.tiny import build_char_tokenizer, build_tiny_policy

    if (folder / "config.json").exists():
        return
    tokenizer = build_char_tokenizer()
    build_tiny_policy(tokenizer, hidden_size=32, num_layers=1, num_heads=4).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def main(argv: list[str]) -> None:
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("devices", type=int)
    parser.add_argument("cases", nargs="*", default=list(CASES))
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--trainer", default=None)
    parser.add_argument("--override", action="append", default=[])
    parser.add_argument("--no-eval", action="store_true", help="leave the evaluation callback out")
    args = parser.parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    save_model(args.out_dir / "model")  # before the first fit starts the other ranks
    for case in args.cases:
        run_case(case, args.devices, args.out_dir, args.accelerator, args.trainer, args.override, not args.no_eval)


if __name__ == "__main__":
    main(sys.argv[1:])
