"""The entropy-dynamics probe: its measurement on a known answer, and in a tiny end-to-end run."""

from __future__ import annotations

import math
from types import SimpleNamespace

import mlflow
import numpy as np
import pytest
import torch

from steer.algo.interventions.base import ClipConfig
from steer.app import train
from steer.probe.callback import EntropyProbe
from steer.data.records import PromptBatch, PromptRecord
from steer.observers import StepContext
from steer.rewards.base import RewardOutput
from steer.rollout.base import RolloutBatch
from tests.conftest import TINY_RUN, compose

torch.set_num_threads(1)


class AlternatingReward:
    """Scores 1, 0, 1, 0, ... so that every group has reward variance (non-zero advantages)."""

    def __init__(self, **kwargs) -> None:
        pass

    def __call__(self, responses, references) -> RewardOutput:
        scores = [float(i % 2 == 0) for i in range(len(responses))]
        return RewardOutput(scores=scores, correct=[s > 0 for s in scores])


class HalfSilentReward(AlternatingReward):
    """Alternating scores, except that responses 4-7 of every 8 score 0: with 4 samples per prompt, every
    mini-batch of 2 prompts has one group with reward variance and one without (zero-advantage states)."""

    def __call__(self, responses, references) -> RewardOutput:
        scores = [float(i % 2 == 0 and i % 8 < 4) for i in range(len(responses))]
        return RewardOutput(scores=scores, correct=[s > 0 for s in scores])


class UniformPolicyModule:
    """Stands in for RLVRModule: every state's policy is uniform over ``support`` tokens."""

    clip = ClipConfig()
    interventions: list = []
    optimizer_steps_per_batch = 2
    algorithm = SimpleNamespace(micro_batch_size=None)

    def __init__(self) -> None:
        self.support = 4

    def minibatch_rows(self, num_sequences: int) -> list[torch.Tensor]:
        half = num_sequences // 2
        return [torch.arange(0, half), torch.arange(half, num_sequences)]

    def microbatch_slices(self, num_rows: int) -> list[slice]:
        return [slice(0, num_rows)]

    def logprobs_and_entropy(self, rollout, rows, width):
        shape = (len(rows), width)
        return torch.full(shape, -math.log(self.support)), torch.full(shape, math.log(self.support))


def known_context() -> StepContext:
    lengths = torch.tensor([3, 1, 2, 2])
    response_mask = torch.arange(3)[None, :] < lengths[:, None]
    rollout = RolloutBatch(
        prompt_ids=torch.ones(4, 2, dtype=torch.long),
        prompt_mask=torch.ones(4, 2, dtype=torch.bool),
        response_ids=torch.ones(4, 3, dtype=torch.long),
        response_mask=response_mask,
        sampling_logprobs=torch.zeros(4, 3),
        truncated=torch.zeros(4, dtype=torch.bool),
    )
    records = [PromptRecord("a", "1", data_source="a"), PromptRecord("b", "2", data_source="b")]
    return StepContext(
        step=0, batch=PromptBatch(records, [[1], [1]]), rollout=rollout,
        rewards=torch.tensor([[1.0, 0.0], [1.0, 0.0]]), advantages=torch.tensor([[1.0], [-1.0], [0.5], [-0.5]]),
        old_logprobs=torch.full((4, 3), -math.log(4)) * response_mask,
        old_entropy=torch.full((4, 3), math.log(4)) * response_mask, metrics={},
    )


@pytest.mark.parametrize("optimizer_step, tokens", [(0, 4), (1, 4)])
def test_measured_change_known_answer(optimizer_step, tokens):
    """Uniform over 4 -> uniform over 2 across the probed optimiser step: each valid token -log 2."""
    module, context = UniformPolicyModule(), known_context()
    probe = EntropyProbe(every_n_steps=1, probe_sequences=8, optimizer_step=optimizer_step, figures=(),
                         parameter_space=False)  # the stand-in has no parameters
    probe.before_update(module, context)
    for index, rows in enumerate(module.minibatch_rows(4)):
        if index == optimizer_step:
            module.support = 2  # the "optimiser step" under measurement
        probe.after_optimizer_step(module, context, rows, index)
    assert context.metrics["probe/tokens"] == tokens  # rows of the probed mini-batch, padding excluded
    assert context.metrics["probe/measured_sum"] == pytest.approx(-tokens * math.log(2))
    assert context.metrics["entropy/source/a"] == pytest.approx(math.log(4))
    assert context.metrics["quadrant/zero_adv/tokens"] == 0
    # uniform: pi = e^{-H} exactly, so every token is in a low_prob quadrant with prediction 0
    assert context.metrics["quadrant/pos_adv_low_prob/tokens"] + context.metrics["quadrant/neg_adv_low_prob/tokens"] == 8
    assert len(probe.records) == 1 and probe.records[0]["measured"].shape == (tokens,)


class LinearPolicyModule(UniformPolicyModule):
    """The stand-in with a real (tiny) policy whose parameters an optimiser step moves."""

    def __init__(self) -> None:
        super().__init__()
        self.policy = torch.nn.Linear(2, 2)


def test_parameter_space_predictor_turns_itself_off_when_the_jvp_fails(monkeypatch, caplog):
    """An op without a forward-mode rule must not stop training or the other predictors."""
    from steer.probe import entropy_dynamics as ed

    def no_forward_mode(*args, **kwargs):
        raise NotImplementedError("Trying to use forward AD with some_kernel that does not support it")

    monkeypatch.setattr(ed, "parameter_space_entropy_change", no_forward_mode)
    module, context = LinearPolicyModule(), known_context()
    probe = EntropyProbe(every_n_steps=1, probe_sequences=8, figures=())
    probe.before_update(module, context)
    assert set(probe._pending.params_before) == {"weight", "bias"}  # theta_before, copied
    assert probe._pending.params_before["weight"].data_ptr() != module.policy.weight.data_ptr()
    with torch.no_grad():
        module.policy.weight.add_(1.0)
    module.support = 2
    probe.after_optimizer_step(module, context, module.minibatch_rows(4)[0], 0)
    assert context.metrics["probe/measured_sum"] == pytest.approx(-4 * math.log(2))
    assert "probe/first_order_omega/scale" in context.metrics
    assert not any(key.startswith("probe/parameter_space") for key in context.metrics)
    assert probe.parameter_space is False and "forward-mode JVP failed" in caplog.text
    assert "parameter_space" not in probe.probe_data() and "probe_summary/tokens" in probe.summary()


def test_probe_in_a_tiny_end_to_end_run(tmp_path):
    cfg = compose([*TINY_RUN, "algorithm.steps=2", "intervention=steer_band", "logger=mlflow",
                   "reward._target_=tests.probe.test_callback.HalfSilentReward",
                   "callbacks.entropy_probe.every_n_steps=1"], tmp_path)
    metrics = train(cfg)
    for predictor in ("released_omega", "first_order_omega", "covariance", "parameter_space"):
        for key in ("pearson", "spearman", "sign_agreement", "sign_agreement_top10", "scale", "predicted_sum_fitted"):
            assert math.isfinite(metrics[f"probe/{predictor}/{key}"]), (predictor, key)
    for predictor in ("released_omega", "first_order_omega", "covariance"):
        assert -1 <= metrics[f"probe/{predictor}/pearson_to_parameter_space"] <= 1
    for key in ("r2", "relative_error_unscaled"):
        assert math.isfinite(metrics[f"probe/parameter_space/{key}"]), key
    assert metrics["time/probe_jvp_s"] > 0 and metrics["time/probe_jvp_per_forward"] > 0
    # states that get no update of their own still move, and first order accounts for it
    assert metrics["probe/zero_adv_measured_abs_mean"] > 0
    assert metrics["probe/parameter_space/zero_adv_pearson"] > 0.9
    # the embedded default's step is small: the first-order change in nats is the measured one, nearly
    assert metrics["probe/parameter_space/pearson"] > 0.9
    assert metrics["probe/parameter_space/scale"] == pytest.approx(1.0, abs=0.2)
    for key in ("probe/measured_sum", "quadrant/pos_adv_high_prob/tokens", "quadrant/neg_adv_low_prob/predicted_sum",
                "entropy/p10", "entropy/p50", "entropy/p90", "entropy/source/arithmetic",
                "steer_diag/steer_band/weight_mean", "steer_diag/steer_band/removed_share_abs",
                "steer_diag/steer_band/max_token_prob", "time/observers_s"):
        assert math.isfinite(metrics[key]), key
    assert metrics["entropy/p10"] <= metrics["entropy/p50"] <= metrics["entropy/p90"]
    assert metrics["probe/measured_abs_mean"] > 0  # the update moved the entropy at the probed states

    figures = sorted(p.name for p in (tmp_path / "figures").glob("*.png"))
    assert figures == ["accuracy.png", "entropy.png", "predicted_vs_measured.png", "quadrants.png", "steer_weights.png"]
    data = np.load(tmp_path / "entropy_probe" / "probe_data.npz")
    assert data["measured"].shape == data["covariance"].shape == data["parameter_space"].shape
    assert data["step"].tolist()[0] == 0

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = mlflow.MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("steer-lab").experiment_id])
    artifacts = {a.path for folder in ("figures", "entropy_probe") for a in client.list_artifacts(run.info.run_id, folder)}
    assert "figures/entropy.png" in artifacts and "entropy_probe/probe_data.npz" in artifacts
    assert "probe_summary/first_order_omega/pearson" in run.data.metrics
    assert math.isfinite(run.data.metrics["probe_summary/parameter_space/r2"])

    # the figures of a finished run, redrawn from MLflow alone
    from experiments.plot_run import main as plot_run

    written = plot_run(["--tracking-uri", uri, "--run-id", run.info.run_id, "--out", str(tmp_path / "redrawn")])
    assert sorted(p.name for p in written) == figures


def test_analyse_probe_tables_include_the_parameter_space_predictor(tmp_path, capsys):
    """The study's probe table reads the new predictor, and still reads probe data written without it."""
    from experiments.study.analyse_probe import main as analyse

    rng = np.random.default_rng(0)
    measured = rng.normal(size=200)
    base = {"measured": measured, "advantage": np.where(np.arange(200) % 4 == 0, 0.0, 1.0),
            "released_omega": measured + rng.normal(size=200), "first_order_omega": rng.normal(size=200),
            "covariance": -measured, "logprob": np.zeros(200), "entropy": np.ones(200), "step": np.zeros(200)}
    for run, extra in (("0_grpo_seed0", {"parameter_space": 0.5 * measured}), ("1_steer_seed0", {})):
        folder = tmp_path / "part" / run / "entropy_probe"
        folder.mkdir(parents=True)
        np.savez(folder / "probe_data.npz", **base, **extra)
    analyse(str(tmp_path))
    lines = capsys.readouterr().out.splitlines()
    header = [c.strip() for c in lines[0].split("|")]
    grpo = dict(zip(header, (c.strip() for c in lines[2].split("|"))))
    steer = dict(zip(header, (c.strip() for c in lines[3].split("|"))))
    assert grpo["arm"] == "grpo" and steer["arm"] == "steer"
    assert float(grpo["parameter_space/pearson"]) == pytest.approx(1.0)
    assert float(grpo["parameter_space/scale"]) == pytest.approx(2.0)  # half the change: scale 2 ...
    r2 = 1 - (0.25 * measured**2).sum() / ((measured - measured.mean()) ** 2).sum()
    assert float(grpo["parameter_space/r2"]) == pytest.approx(r2, abs=1e-3)  # ... and r2 at face value below 1
    assert float(grpo["covariance/pearson_to_parameter_space"]) == pytest.approx(-1.0)
    assert float(grpo["parameter_space/zero_adv_pearson"]) == pytest.approx(1.0)
    assert steer["parameter_space/pearson"] == "" and float(steer["covariance/pearson"]) == pytest.approx(-1.0)
    assert any("parameter_space at face value" in line for line in lines)
