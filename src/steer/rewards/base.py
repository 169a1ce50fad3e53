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
from typing import Any, Protocol, Sequence


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


def safe_scores(check, responses: Sequence[str], references: Sequence[Any]) -> RewardOutput:
    """Run a per-sample ``check(response, reference) -> float`` in this process, scoring 0 on error."""
    scores, errors = [], 0
    for response, reference in zip(responses, references, strict=True):
        try:
            scores.append(float(check(response, reference)))
        except Exception:  # noqa: BLE001 - a broken sample must never stop training
            scores.append(0.0)
            errors += 1
    return RewardOutput(scores=scores, correct=[s > 0 for s in scores], num_errors=errors)
