"""Numerical faults: a non-finite loss or gradient skips the optimiser step; too many in a row stop the run."""

from __future__ import annotations

import logging

import pytest
import torch

import steer.app
from steer.app import train
from steer.module import NonFiniteError
from steer.observers import StepObserver
from tests.conftest import TINY_RUN, compose
from tests.test_resume import MOVING, _metrics_store

GRADIENTS = MOVING[:3]  # the entropy bonus keeps gradients non-zero; no probe (not needed here)


class PoisonGradient(StepObserver):
    """Turns one parameter's gradient into NaN during the chosen optimiser steps (counted from 0)
    and keeps a copy of the weights after every optimiser step."""

    def __init__(self, module, poisoned) -> None:
        self.poisoned, self.attempt = poisoned, 0
        self.weights = [self._copy(module)]
        next(module.policy.parameters()).register_hook(self._hook)

    @staticmethod
    def _copy(module) -> torch.Tensor:
        return torch.cat([v.detach().flatten().float().clone() for v in module.policy.state_dict().values()])

    def _hook(self, grad: torch.Tensor) -> torch.Tensor:
        return grad * float("nan") if self.poisoned(self.attempt) else grad

    def after_optimizer_step(self, module, context, rows, index) -> None:
        self.attempt += 1
        self.weights.append(self._copy(module))


def _poisoned_run(monkeypatch, poisoned) -> list[PoisonGradient]:
    build = steer.app.build_module
    observers = []

    def build_and_poison(cfg, prompts=None):
        module, info = build(cfg, prompts)
        observers.append(PoisonGradient(module, poisoned))
        module.observers.append(observers[-1])
        return module, info

    monkeypatch.setattr(steer.app, "build_module", build_and_poison)
    return observers


def test_a_nan_gradient_skips_that_optimiser_step_only(tmp_path, monkeypatch, caplog):
    observers = _poisoned_run(monkeypatch, lambda attempt: attempt == 1)
    with caplog.at_level(logging.WARNING, logger="steer.module"):
        train(compose([*TINY_RUN, *GRADIENTS, "logger=mlflow"], tmp_path))
    (poison,) = observers
    assert poison.attempt == 4  # 2 RL steps x 2 optimiser steps
    for attempt in range(4):
        unchanged = torch.equal(poison.weights[attempt], poison.weights[attempt + 1])
        assert unchanged == (attempt == 1), attempt
    store = _metrics_store(tmp_path)
    assert sorted(store["actor/nonfinite_skip_count"]) == [(0, 1.0), (1, 0.0)]  # attempt 1 is in RL step 0
    warnings = [r for r in caplog.records if "non-finite" in r.getMessage()]
    assert len(warnings) == 1 and "RL step 0" in warnings[0].getMessage()


def test_consecutive_nan_steps_stop_the_run_with_a_usable_checkpoint(tmp_path, monkeypatch):
    observers = _poisoned_run(monkeypatch, lambda attempt: attempt >= 1)
    with pytest.raises(NonFiniteError, match="algorithm.max_consecutive_nonfinite=2"):
        train(compose([*TINY_RUN, *GRADIENTS, "algorithm.max_consecutive_nonfinite=2",
                       "logger=none"], tmp_path))
    (poison,) = observers
    assert poison.attempt == 2  # the second poisoned step stopped the run before the observers ran
    checkpoint = torch.load(tmp_path / "checkpoints" / "nonfinite.ckpt", weights_only=True)
    assert checkpoint["rl_step"] == 1 and checkpoint["nonfinite"] == {"skips": 2, "consecutive": 2}
    saved = torch.cat([v.flatten().float() for k, v in checkpoint["state_dict"].items() if k.startswith("policy.")])
    assert torch.equal(saved, poison.weights[1])  # the weights after the last good optimiser step
    assert not torch.equal(poison.weights[1], poison.weights[0])
