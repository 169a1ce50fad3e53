"""The one reward signature every verifier implements.

A reward scores a batch of decoded responses against their references::

    reward(responses: list[str], references: list[Any]) -> RewardOutput

The trainer never looks inside a verifier. A verifier must not raise for a bad sample: a sample
whose check raises or times out scores 0.0 and is counted in ``num_errors`` / ``num_timeouts``
(logged as ``reward/error_rate`` / ``reward/timeout_rate``), so one broken sample never stops
training.
"""

from __future__ import annotations

from dataclasses import dataclass, field
import logging
from typing import Any, Protocol, Sequence

from omegaconf import DictConfig

from steer.knobs import ConfigError, select

log = logging.getLogger(__name__)


@dataclass
class RewardOutput:
    scores: list[float]
    """One scalar reward per response."""
    correct: list[bool]
    """Whether each response counts as correct (for accuracy metrics; may differ from score > 0)."""
    num_errors: int = 0
    """Samples whose check raised; they scored 0."""
    num_timeouts: int = 0
    """Samples whose check exceeded the wall-clock limit; they scored 0."""
    extra: dict[str, float] = field(default_factory=dict)
    """Optional verifier-specific batch metrics (logged under ``reward/``)."""


class Reward(Protocol):
    def __call__(self, responses: Sequence[str], references: Sequence[Any]) -> RewardOutput: ...


def score_safely(reward: Reward, responses: Sequence[str], references: Sequence[Any]) -> RewardOutput:
    """``reward(responses, references)``; if the verifier raises on the batch, score the samples one
    by one: a sample whose check raises scores 0, is counted in ``num_errors``, and training goes on."""
    try:
        return reward(responses, references)
    except Exception as error:  # noqa: BLE001 - a user verifier must not stop training
        log.warning("reward raised on a batch (%r); scoring its samples one by one", error)
    scores, correct, errors = [], [], 0
    for response, reference in zip(responses, references, strict=True):
        try:
            single = reward([response], [reference])
            scores.append(float(single.scores[0]))
            correct.append(bool(single.correct[0]))
        except Exception:  # noqa: BLE001
            scores.append(0.0)
            correct.append(False)
            errors += 1
    return RewardOutput(scores=scores, correct=correct, num_errors=errors)


def check_rewards(cfg: DictConfig) -> None:
    """``reward`` and each ``eval.benchmarks.<name>.reward``: their constructors' own argument checks
    (``reward.mode``, timeouts), run by building the objects and dropping them (rewards start
    their worker processes lazily, on the first call)."""
    from hydra.utils import instantiate

    specs = {"reward": select(cfg, "reward")}
    for name in (select(cfg, "eval.benchmarks") or {}):
        specs[f"eval.benchmarks.{name}.reward"] = select(cfg, f"eval.benchmarks.{name}.reward")
    for knob, spec in specs.items():
        if spec is None:
            continue
        try:
            instantiate(spec)
        except Exception as error:  # the reward's own ValueError, not Hydra's wrapper
            cause = error.__cause__ or error
            raise ConfigError(f"{knob}: {cause}") from None
