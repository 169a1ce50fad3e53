"""Trainer-side performance paths must not change what is learned: the old-log-prob forward the
first mini-batch's update replaces, and the fused optimiser."""

from __future__ import annotations

import pytest
import torch

import steer.app
from steer.app import train
from steer.module import RLVRModule
from steer.observers import StepObserver
from tests.conftest import TINY_RUN, compose

# One optimiser step per rollout batch (4 prompts in one mini-batch, one epoch), probe off; an entropy
# bonus keeps the gradients non-zero (the barely warmed policy earns no reward, so advantages are 0).
ONE_STEP = [
    *TINY_RUN,
    "algorithm.minibatch_prompts=4",
    "intervention=entropy_bonus",
    "callbacks.entropy_probe=null",
    "callbacks.checkpoint=null",
    "logger=none",
]


class GradientRecorder(StepObserver):
    """Copies the gradients and weights after every optimiser step (no ``before_update``: it does not
    keep the module from reusing the update's log-probs)."""

    def __init__(self) -> None:
        self.gradients: list[torch.Tensor] = []
        self.weights: list[torch.Tensor] = []
        self.old_logprobs: list[torch.Tensor] = []

    def after_optimizer_step(self, module, context, rows, index) -> None:
        params = list(module.policy.parameters())
        self.gradients.append(torch.cat([p.grad.flatten() for p in params if p.grad is not None]).clone())
        self.weights.append(torch.cat([p.detach().flatten() for p in params]).clone())
        self.old_logprobs.append(context.old_logprobs.clone())


def _run(tmp_path, monkeypatch, overrides, force_full: bool):
    """Train with ``overrides``; returns (last metrics, recorder, whether the module reused the update's
    log-probs, policy forward calls by grad mode)."""
    build = steer.app.build_module
    captured, calls = {}, {"no_grad": 0, "grad": 0}

    def build_and_record(cfg, prompts=None):
        module, info = build(cfg, prompts)
        captured["module"] = module
        captured["recorder"] = GradientRecorder()
        module.observers.append(captured["recorder"])
        return module, info

    original = RLVRModule.logprobs_and_entropy

    def counted(self, rollout, rows, width, model=None, **options):
        if model is None:  # the policy (not the reference)
            calls["grad" if torch.is_grad_enabled() else "no_grad"] += 1
        return original(self, rollout, rows, width, model, **options)

    with monkeypatch.context() as patch:
        patch.setattr(steer.app, "build_module", build_and_record)
        patch.setattr(RLVRModule, "logprobs_and_entropy", counted)
        if force_full:
            patch.setattr(RLVRModule, "reuse_update_logprobs", property(lambda self: False))
        metrics = train(compose(overrides, tmp_path))
        reused = captured["module"].reuse_update_logprobs
    return metrics, captured["recorder"], reused, calls


def _deterministic(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if not k.startswith("time/")}


PROBE_EVERY_STEP = ["callbacks.entropy_probe.every_n_steps=1", "callbacks.entropy_probe.probe_sequences=4", "callbacks.entropy_probe.figures=[]"]
TWO_STEPS_WITH_PROBE = ["algorithm.minibatch_prompts=2", *PROBE_EVERY_STEP]  # the embedded default's shape


@pytest.mark.parametrize(
    "extra, steps_per_batch, first_micro_batches",
    [
        ([], 1, 1),
        (["algorithm.kl.coef=0.1", "algorithm.rollout_correction=token_tis", "algorithm.micro_batch_size=8"], 1, 2),
        (
            [  # STEER reads the old values inside the loss; ONE_STEP's bonus added for non-zero gradients
                "intervention=steer", "algorithm.micro_batch_size=8",
                "+intervention.components.bonus._target_=steer.algo.interventions.entropy_bonus.EntropyBonus",
                "+intervention.components.bonus.coefficient=0.001",
            ],
            1,
            2,
        ),
        (TWO_STEPS_WITH_PROBE, 2, 1),
        ([*TWO_STEPS_WITH_PROBE, "algorithm.epochs=2", "algorithm.micro_batch_size=4"], 4, 2),
    ],
    ids=["plain", "kl-tis-microbatch", "steer", "two-steps-probe", "two-epochs-probe-microbatch"],
)
def test_reusing_the_update_logprobs_changes_nothing(tmp_path, monkeypatch, extra, steps_per_batch, first_micro_batches):
    probe_on = PROBE_EVERY_STEP[0] in extra
    overrides = [o for o in ONE_STEP if not (probe_on and o == "callbacks.entropy_probe=null")] + extra
    full_metrics, full, full_reused, full_calls = _run(tmp_path / "full", monkeypatch, overrides, force_full=True)
    reuse_metrics, reuse, reused, reuse_calls = _run(tmp_path / "reuse", monkeypatch, overrides, force_full=False)
    assert reused and not full_reused
    rl_steps = 2
    # The skipped forwards: the first mini-batch's no-grad policy passes (one per micro-batch) per RL
    # step; the update's passes (and the probe's own) are the same.
    assert full_calls["no_grad"] - reuse_calls["no_grad"] == rl_steps * first_micro_batches
    assert full_calls["grad"] == reuse_calls["grad"] > 0
    assert len(full.gradients) == len(reuse.gradients) == rl_steps * steps_per_batch
    # Bit for bit: on CPU the update's forward runs the same kernels on the same rows and width as the
    # no-grad pass it replaces, so old log-probs, gradients, weights and metrics (the probe's included:
    # it runs after the first mini-batch's backward, still on pi_old) are identical.
    for step in range(len(full.gradients)):
        assert full.gradients[step].abs().sum() > 0  # the test compares real updates
        assert reuse.old_logprobs[step].abs().sum() > 0
        assert torch.equal(reuse.old_logprobs[step], full.old_logprobs[step])
        assert torch.equal(reuse.gradients[step], full.gradients[step])
        assert torch.equal(reuse.weights[step], full.weights[step])
    assert not torch.equal(full.weights[0], full.weights[1])
    assert _deterministic(reuse_metrics) == _deterministic(full_metrics)
    assert full_metrics["actor/entropy"] > 0 and "rollout/mismatch_abs_mean" in full_metrics  # read the old values
    if probe_on:  # the probe measured (it runs every step) and read the old values
        assert full_metrics["probe/tokens"] > 0 and "quadrant/neg_adv_high_prob/token_share" in full_metrics


def test_no_reuse_when_an_intervention_reads_the_old_values_before_the_update_forward(tmp_path):
    module, _ = steer.app.build_module(compose(ONE_STEP, tmp_path))
    assert module.reuse_update_logprobs

    class ReadsOldValues(StepObserver):
        def before_update(self, module, context) -> None: ...

    module.observers.append(ReadsOldValues())
    assert module.reuse_update_logprobs  # observers run after the first mini-batch's forward, before its step
    two_steps, _ = steer.app.build_module(compose([*ONE_STEP, "algorithm.minibatch_prompts=2"], tmp_path))
    assert two_steps.optimizer_steps_per_batch == 2 and two_steps.reuse_update_logprobs
    steer_global, _ = steer.app.build_module(compose([*ONE_STEP, "intervention=steer", "intervention.components.steer.scope=global"], tmp_path))
    assert not steer_global.reuse_update_logprobs  # its mini-batch pass reads the old values before the update's forward
    steer_micro, _ = steer.app.build_module(compose([*ONE_STEP, "intervention=steer"], tmp_path))
    assert steer_micro.reuse_update_logprobs  # reads them inside the loss, after the forward


def test_the_optimiser_is_fused_on_cpu_and_matches_the_loop(tmp_path):
    from steer.optimizer import adamw_implementation

    module, _ = steer.app.build_module(compose(ONE_STEP, tmp_path))
    optimizer = module.configure_optimizers()["optimizer"]
    assert optimizer.param_groups[0]["fused"] is True
    assert adamw_implementation([torch.zeros(2, dtype=torch.long)]) == {}  # no fused kernel for integers

    # Same gradients into a fused and a looped AdamW: the weights agree to float32 rounding after 5 steps,
    # and both moved far more than they disagree.
    torch.manual_seed(0)
    loop_params = [p.detach().clone().requires_grad_(True) for p in module.policy.parameters()]
    fused_params = [p.detach().clone().requires_grad_(True) for p in module.policy.parameters()]
    start = [p.detach().clone() for p in loop_params]
    loop = torch.optim.AdamW(loop_params, lr=1e-3, weight_decay=0.01, betas=(0.9, 0.999))
    fused = torch.optim.AdamW(fused_params, lr=1e-3, weight_decay=0.01, betas=(0.9, 0.999), **adamw_implementation(fused_params))
    for _ in range(5):
        for a, b in zip(loop_params, fused_params):
            a.grad = torch.randn_like(a)
            b.grad = a.grad.clone()
        loop.step()
        fused.step()
    moved = max((a - s).abs().max().item() for a, s in zip(loop_params, start))
    assert moved > 1e-3
    for a, b in zip(loop_params, fused_params):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def test_threads_auto_takes_the_free_cores_and_numbers_stay_as_given():
    from steer.app import choose_threads

    assert choose_threads(None) is None
    assert choose_threads(3) == 3 and choose_threads("2") == 2
    assert choose_threads("auto", cores=2, busy=0.1) == 2  # quiet machine: every core
    assert choose_threads("auto", cores=2, busy=1.0) == 1  # one core busy: one thread
    assert choose_threads("auto", cores=2, busy=2.0) == 1  # both busy: never below 1
    assert choose_threads("auto", cores=16, busy=3.4) == 13
    assert 1 <= choose_threads("auto") <= len(__import__("os").sched_getaffinity(0))


def test_busy_cores_sees_a_process_that_keeps_a_core_busy():
    """Sampled, not the lagging load average: a spinning child shows up within the interval."""
    import subprocess
    import sys

    from steer.callbacks.threads import busy_cores

    cores = len(__import__("os").sched_getaffinity(0))
    idle = busy_cores(0.5)
    assert 0.0 <= idle <= cores
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        __import__("time").sleep(0.3)
        busy = busy_cores(0.5)
    finally:
        hog.kill()
        hog.wait()
    assert busy >= 0.8  # the hog holds about one core (others may hold more)


def test_the_thread_governor_follows_the_other_processes_load():
    """Before each RL step: one thread while another process holds a core, every core once it leaves;
    this process's own CPU time (its threads, spinning or working) never counts as other load."""
    from steer.callbacks.threads import CpuSample, ThreadGovernor

    samples = iter([
        CpuSample(0.0, 0.0, 0.0),
        CpuSample(1.0, 2.0, 1.9),  # our 2 threads used both cores: nobody else -> 2
        CpuSample(2.0, 4.0, 3.0),  # 2 busy core-seconds, 1 of them ours: another process holds a core -> 1
        CpuSample(3.0, 5.0, 3.1),  # the other process keeps its core -> 1
        CpuSample(4.0, 6.2, 5.1),  # it left: only our own time -> 2
    ])
    governor = ThreadGovernor(cores=2, sample=lambda: next(samples))
    before = torch.get_num_threads()
    seen = []
    try:
        torch.set_num_threads(2)
        for step in range(5):
            governor.on_train_batch_start(None, None, None, step)
            seen.append(torch.get_num_threads())
    finally:
        torch.set_num_threads(before)
    assert seen == [2, 2, 1, 1, 2]


def test_threads_auto_adds_the_governor_and_a_number_does_not(tmp_path):
    from steer.app import train
    from steer.callbacks.threads import ThreadGovernor
    seen = {}
    original = ThreadGovernor.on_train_batch_start

    def spy(self, trainer, *args):
        seen["governors"] = sum(isinstance(c, ThreadGovernor) for c in trainer.callbacks)
        return original(self, trainer, *args)

    ThreadGovernor.on_train_batch_start = spy
    try:
        overrides = [*TINY_RUN, "eval.benchmarks=null", "callbacks.entropy_probe=null", "callbacks.checkpoint=null",
                     "callbacks.progress=null", "logger=none", "algorithm.steps=1", "rollout.max_new_tokens=4"]
        train(compose([*overrides, "threads=auto"], tmp_path / "auto"))
        assert seen == {"governors": 1}
        seen.clear()
        train(compose([*overrides, "threads=1"], tmp_path / "one"))
        assert seen == {}
    finally:
        ThreadGovernor.on_train_batch_start = original
