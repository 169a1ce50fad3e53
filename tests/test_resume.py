"""Checkpoint and exact resume: a killed run, resumed, ends where an uninterrupted one does."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from steer.app import train
from steer.cli import resume_arguments, resolve_resume
from steer.knobs import ConfigError
from tests.conftest import REPO, TINY_RUN, compose

# The tiny policy barely warmed up earns no reward, so GRPO's advantages are all zero; an entropy bonus
# whose coefficient the controller raises every step keeps gradients (and controller state) non-trivial.
MOVING = [
    "intervention=entropy_bonus_adaptive",
    "intervention.components.entropy_bonus.target_entropy=10",
    "intervention.components.entropy_bonus.initial_coefficient=0.001",
    "callbacks.entropy_probe.every_n_steps=1",
    "callbacks.entropy_probe.figures=[]",
]


def _metrics_store(folder) -> dict[str, list[tuple[int, float]]]:
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{folder}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("steer-lab").experiment_id])
    assert run.info.status == "FINISHED"
    return {key: [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)] for key in run.data.metrics}


def _weights(path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def _deterministic(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if not k.startswith("time/")}  # wall-clock timers differ


def test_resume_in_process_matches_an_uninterrupted_run(tmp_path):
    """Fast variant (no kill): stop after 2 of 3 steps, resume from the checkpoint, compare."""
    base = [*TINY_RUN, *MOVING, "logger=none", "callbacks.checkpoint.every_n_steps=2"]
    whole = train(compose([*base, "algorithm.steps=3"], tmp_path / "whole"))
    part = tmp_path / "part"
    train(compose([*base, "algorithm.steps=2"], part))
    checkpoint = part / "checkpoints" / "last.ckpt"
    first = _weights(checkpoint)
    resumed = train(compose([*base, "algorithm.steps=3", f"resume={checkpoint}"], part))
    assert _deterministic(resumed) == _deterministic(whole)
    expected, got = _weights(tmp_path / "whole" / "checkpoints" / "last.ckpt"), _weights(checkpoint)
    assert any(not torch.equal(first[k], got[k]) for k in got)  # the resumed step did train
    for key in expected:
        assert torch.equal(expected[key], got[key]), key
    lines = [json.loads(line)["step"] for line in (part / "eval_results.jsonl").read_text().splitlines()]
    assert lines == [0, 1, 2, 3]  # the "before training" evaluation did not run again


def test_a_checkpoint_holds_every_rng_and_counter(tmp_path):
    train(compose([*TINY_RUN, *MOVING, "logger=none", "algorithm.steps=1"], tmp_path))
    state = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)  # plain values and tensors only
    assert state["rl_step"] == 1
    assert len(state["rng"]) == 1 and set(state["rng"][0]) >= {"python", "numpy", "torch"}  # one per rank
    assert state["interventions"][0]["coefficient"] == pytest.approx(0.0015)
    assert state["nonfinite"] == {"skips": 0, "consecutive": 0}
    callbacks = " ".join(state["callbacks"])
    assert "EvaluationCallback" in callbacks and "EntropyProbe" in callbacks and "SummaryCallback" in callbacks
    # resuming a finished run trains nothing and changes nothing
    checkpoint = tmp_path / "checkpoints" / "last.ckpt"
    assert train(compose([*TINY_RUN, *MOVING, "logger=none", "algorithm.steps=1", f"resume={checkpoint}"], tmp_path)) == {}
    again = torch.load(checkpoint, weights_only=True)
    assert again["rl_step"] == 1 and torch.equal(again["rng"][0]["torch"], state["rng"][0]["torch"])
    assert all(torch.equal(again["state_dict"][k], v) for k, v in state["state_dict"].items())


def test_resume_arguments_take_the_saved_overrides(tmp_path):
    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra" / "overrides.yaml").write_text("- seed=3\n- algorithm.steps=10\n")
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.ckpt").write_bytes(b"x")
    assert resolve_resume(tmp_path / "checkpoints" / "last.ckpt") == (tmp_path, tmp_path / "checkpoints" / "last.ckpt")
    arguments = resume_arguments([f"resume={tmp_path}", "algorithm.steps=20"])
    assert arguments == ["seed=3", "algorithm.steps=20", f"hydra.run.dir={tmp_path}",
                         f"resume={tmp_path / 'checkpoints' / 'last.ckpt'}"]
    assert resume_arguments(["seed=2"]) == ["seed=2"]
    with pytest.raises(ConfigError, match="no such run folder"):
        resume_arguments([f"resume={tmp_path / 'nothing'}"])
    with pytest.raises(ConfigError, match="multirun"):
        resume_arguments(["-m", f"resume={tmp_path}"])
    from steer.startup import check_config

    with pytest.raises(ConfigError, match="no such checkpoint file"):
        check_config(compose([f"resume={tmp_path / 'missing.ckpt'}"], tmp_path))


def _run(folder, extra=(), env=None) -> subprocess.CompletedProcess:
    command = [sys.executable, str(REPO / "src" / "run.py"), *extra]
    if not any(a.startswith("resume=") for a in extra):
        command += [*TINY_RUN, *MOVING, "algorithm.steps=4", "callbacks.checkpoint.every_n_steps=2",
                    "logger=mlflow", f"hydra.run.dir={folder}"]
    return subprocess.run(command, cwd=folder.parent, capture_output=True, text=True, timeout=600,
                          env={**os.environ, **(env or {})})


@pytest.mark.slow
def test_sigkilled_run_resumes_exactly(tmp_path):
    """SIGKILL after step 3 (last checkpoint: step 2, so step 2's metrics are in the store twice over
    unless the resume skips them), resume from the folder, compare with an uninterrupted run."""
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    result = _run(whole)
    assert result.returncode == 0, result.stderr[-3000:]
    result = _run(killed, env={"STEER_TEST_SIGKILL_AT_STEP": "3"})
    assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]
    assert torch.load(killed / "checkpoints" / "last.ckpt", weights_only=True)["rl_step"] == 2
    result = _run(killed, [f"resume={killed}"])
    assert result.returncode == 0, result.stderr[-3000:]

    expected, got = _weights(whole / "checkpoints" / "last.ckpt"), _weights(killed / "checkpoints" / "last.ckpt")
    for key in expected:
        assert torch.equal(expected[key], got[key]), key
    expected_store, store = _metrics_store(whole), _metrics_store(killed)
    assert set(store) == set(expected_store)
    for key, history in store.items():
        steps = [step for step, _ in history]
        assert len(steps) == len(set(steps)), f"{key} logged twice at a step: {steps}"
        if not key.startswith("time/"):
            assert sorted(history) == sorted(expected_store[key]), key
    assert [s for s, _ in sorted(store["actor/entropy"])] == [0, 1, 2, 3]
    lines = [json.loads(line) for line in (killed / "eval_results.jsonl").read_text().splitlines()]
    reference = [json.loads(line) for line in (whole / "eval_results.jsonl").read_text().splitlines()]
    assert [(r["step"], r["metrics"]) for r in lines] == [(r["step"], r["metrics"]) for r in reference]


class _FakeTrainer:
    """What save_atomically uses of a Trainer; ``die`` simulates a kill in the middle of writing."""

    is_global_zero = True

    def __init__(self) -> None:
        self.state, self.die = {"step": 1}, False
        self.strategy = type("Strategy", (), {"barrier": lambda self, name=None: None})()

    def save_checkpoint(self, path, weights_only=False) -> None:
        import io

        buffer = io.BytesIO()
        torch.save(self.state, buffer)
        with open(path, "wb") as handle:
            handle.write(buffer.getvalue()[: len(buffer.getvalue()) // 2] if self.die else buffer.getvalue())
        if self.die:
            raise KeyboardInterrupt("killed mid-write")


def test_a_kill_mid_write_leaves_the_previous_checkpoint_whole(tmp_path):
    from steer.checkpointing import save_atomically

    trainer, path = _FakeTrainer(), tmp_path / "checkpoints" / "last.ckpt"
    save_atomically(trainer, path)
    trainer.state, trainer.die = {"step": 2, "weights": torch.ones(1000)}, True
    with pytest.raises(KeyboardInterrupt):
        save_atomically(trainer, path)
    assert torch.load(path, weights_only=True) == {"step": 1}
    trainer.die = False
    save_atomically(trainer, path)  # the next save replaces the half-written temporary file
    assert torch.load(path, weights_only=True)["step"] == 2
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]
