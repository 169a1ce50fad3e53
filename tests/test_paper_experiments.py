"""The paper's experiments as configs: steer_math against a table of the paper's hyperparameters
(kept here, independently of the YAML files), and every sibling experiment differs from steer_math
only in the keys it says it changes."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from tests.conftest import compose

# Hao et al. 2025 (arXiv 2510.10150) as quoted in issue 12, checked against the released
# run/run_exp.sh and the verl defaults it runs with (GitHub zz-haooo/STEER @ b31df71).
PAPER = {
    "model.path": "Qwen/Qwen2.5-Math-7B",
    "model.dtype": "float32",                # verl's FSDP actor: float32 parameters (what AdamW steps) ...
    "model.compute_dtype": "bfloat16",       # ... gathered in bf16 for compute, gradients reduced in float32
    "algorithm.estimator": "grpo",
    "algorithm.steps": 200,                  # at most 200 rollout steps
    "algorithm.prompts_per_step": 512,       # batch 512 prompts ...
    "algorithm.n": 8,                        # ... x 8 responses
    "algorithm.minibatch_prompts": 32,       # mini-batch 32 prompts: 16 optimiser steps per batch
    "algorithm.epochs": 1,
    "algorithm.lr": 1e-6,
    "algorithm.lr_warmup_steps": 0,          # constant learning rate
    "algorithm.weight_decay": 0.01,
    "algorithm.betas": [0.9, 0.999],
    "algorithm.grad_clip": 1.0,
    "algorithm.clip.low": 0.2,
    "algorithm.clip.high": 0.28,
    "algorithm.clip.dual": 10.0,
    "algorithm.kl.coef": 0.0,                # no KL
    "algorithm.loss_aggregation": "token-mean",
    "algorithm.pack_sequences": True,        # the released script's use_remove_padding=True
    "rollout.max_prompt_length": 1024,
    "rollout.max_new_tokens": 3072,
    "rollout.temperature": 1.0,
    "rollout.top_p": 1.0,
    "rollout.engine._target_": "steer.rollout.vllm.VLLMRolloutEngine",  # vLLM rollouts ...
    "rollout.engine.tensor_parallel_size": 4,  # ... tensor parallel 4 ...
    "trainer.devices": 8,                    # ... on one node of 8 GPUs: 2 engines
    "reward.mode": "dapo_strict",
    "data.train.source": "../shared/data/math/DAPO-Math-17k.parquet",
    "intervention.name": "steer",
    "intervention.components.clip_higher.low": 0.2,
    "intervention.components.clip_higher.high": 0.28,
    "intervention.components.steer.lambda_min": 0.8,  # the released value (the text says 0.7)
    "intervention.components.steer.mapping": "exponential",
    "eval.every_n_steps": 10,
    "eval.math_reward.mode": "either",
}
# The evaluation preset: avg@32 on AIME24/25 and AMC23, avg@1 on the other three; T 1.0, top-p 0.7.
EVAL = {"aime24": 32, "aime25": 32, "amc23": 32, "math500": 1, "minerva_math": 1, "olympiadbench": 1}


def flat(cfg) -> dict:
    """The resolved config as ``{"a.b.c": value}``."""
    out = {}

    def walk(node, prefix):
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, f"{prefix}{key}.")
        else:
            out[prefix[:-1]] = node

    walk(OmegaConf.to_container(cfg, resolve=True), "")
    return out


@pytest.fixture(autouse=True)
def _relative_data_dir(monkeypatch):
    monkeypatch.delenv("STEER_DATA_DIR", raising=False)  # the default data_dir, ../shared/data


def test_steer_math_matches_the_papers_hyperparameters(tmp_path):
    values = flat(compose(["+experiment=steer_math"], tmp_path))
    mismatches = {key: (values.get(key, "<missing>"), want) for key, want in PAPER.items() if values.get(key, "<missing>") != want}
    assert not mismatches, mismatches
    assert not [key for key in values if key.startswith("intervention.components.") and "entropy_bonus" in key]
    assert not any("EntropyBonus" in str(v) for k, v in values.items() if k.endswith("_target_"))
    benchmarks = {key.split(".")[2] for key in values if key.startswith("eval.benchmarks.")}
    assert benchmarks == set(EVAL)
    for name, samples in EVAL.items():
        prefix = f"eval.benchmarks.{name}"
        assert (values[f"{prefix}.samples_per_prompt"], values[f"{prefix}.temperature"], values[f"{prefix}.top_p"],
                values[f"{prefix}.max_new_tokens"]) == (samples, 1.0, 0.7, 3072), name
    assert values["algorithm.micro_batch_size"] and 32 * 8 % values["algorithm.micro_batch_size"] == 0


def test_paper_text_lambda_min_is_one_override(tmp_path):
    cfg = compose(["+experiment=steer_math", "intervention.components.steer.lambda_min=0.7"], tmp_path)
    assert cfg.intervention.components.steer.lambda_min == 0.7
    released = flat(compose(["+experiment=steer_math"], tmp_path))
    changed = {k for k, v in flat(cfg).items() if released.get(k) != v}
    assert changed == {"intervention.components.steer.lambda_min"}


# Each sibling: what it may change relative to steer_math (prefixes), and a value it must have.
SIBLINGS = {
    "steer_math_rloo": ({"algorithm.estimator", "run_name", "logger.run_name"}, {"algorithm.estimator": "rloo"}),
    "steer_math_opo": ({"algorithm.estimator", "run_name", "logger.run_name"}, {"algorithm.estimator": "opo"}),
    # one GPU instead of FSDP over 8, with vLLM rollouts and activation checkpointing (its layout fits there)
    "steer_math_1p5b": ({"model.path", "model.gradient_checkpointing", "trainer.", "rollout.engine.", "run_name", "logger.run_name"},
                        {"model.path": "Qwen/Qwen2.5-Math-1.5B", "trainer.devices": 1, "trainer.precision": "bf16-mixed",
                         "model.gradient_checkpointing": True, "rollout.engine._target_": "steer.rollout.vllm.VLLMRolloutEngine"}),
    # only the model: steer_math's layout (2 vLLM engines of tensor parallel 4) holds the 14B too
    "steer_math_14b": ({"model.path", "run_name", "logger.run_name"}, {"model.path": "Qwen/Qwen2.5-14B"}),
    "steer_math_extreme": ({"intervention.", "run_name", "logger.run_name"}, {
        "intervention.name": "steer_extreme", "intervention.components.clip_higher.low": 0.99,
        "intervention.components.clip_higher.high": 5.0, "intervention.components.steer.lambda_min": 0.8}),
    "steer_code": ({"model.path", "data.", "reward.", "eval.", "rollout.max_prompt_length", "run_name", "logger.run_name"}, {
        "model.path": "Qwen/Qwen2.5-Coder-7B", "reward._target_": "steer.rewards.code.CodeReward",
        "data.train._target_": "steer.data.code.load_livecodebench"}),
}


@pytest.mark.parametrize("experiment", sorted(SIBLINGS))
def test_sibling_overrides_only_what_differs(experiment, tmp_path):
    allowed, expected = SIBLINGS[experiment]
    base = flat(compose(["+experiment=steer_math"], tmp_path))
    values = flat(compose([f"+experiment={experiment}"], tmp_path))
    changed = {k for k in base.keys() | values.keys() if base.get(k, "<missing>") != values.get(k, "<missing>")}
    assert changed, "the sibling changes nothing"
    stray = {k for k in changed if not any(k == a or (a.endswith(".") and k.startswith(a)) for a in allowed)}
    assert not stray, {k: (base.get(k), values.get(k)) for k in stray}
    assert {k: values[k] for k in expected} == expected
    for key in ("algorithm.prompts_per_step", "algorithm.minibatch_prompts", "algorithm.lr", "algorithm.clip.dual"):
        assert values[key] == base[key] == PAPER[key]


def test_steer_code_trains_on_no_evaluated_problem(tmp_path, monkeypatch):
    from hydra.utils import instantiate

    from tests.conftest import SHARED_DATA

    monkeypatch.setenv("STEER_DATA_DIR", str(SHARED_DATA))
    cfg = compose(["+experiment=steer_code"], tmp_path)
    train = instantiate(cfg.data.train)
    held_out = instantiate(cfg.eval.benchmarks.livecodebench.records)
    assert len(train) == 600 and len(held_out) == 279
    assert not {r.prompt[0]["content"] for r in train} & {r.prompt[0]["content"] for r in held_out}


def test_checkpoint_per_evaluation_override(tmp_path):
    """The documented override keeps weights exactly at the evaluated RL steps (every
    eval.every_n_steps): in steer_math every 10 RL steps; on a tiny run the files land at the
    evaluations' steps and hold weights only."""
    import torch

    from steer.app import run
    from tests.conftest import TINY_RUN

    cfg = compose(["+experiment=steer_math", "callbacks.checkpoint.keep_every_n_steps=10"], tmp_path)
    assert cfg.callbacks.checkpoint.keep_every_n_steps == cfg.eval.every_n_steps == 10

    # tiny: 4 RL steps, evaluations at 0, 2, 4 -> kept weights after RL steps 2 and 4
    tiny = [*TINY_RUN, "algorithm.steps=4", "eval.every_n_steps=2", "logger=none",
            "callbacks.entropy_probe=null", "callbacks.checkpoint.keep_every_n_steps=2"]
    run(compose(tiny, tmp_path))
    saved = sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*.ckpt"))
    assert saved == ["step_2.ckpt", "step_4.ckpt"]
    kept = torch.load(tmp_path / "checkpoints" / "step_4.ckpt", weights_only=True, map_location="cpu")
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    assert "optimizer_states" not in kept and "optimizer_states" in last
    assert all(torch.equal(kept["state_dict"][k], last["state_dict"][k]) for k in last["state_dict"])
