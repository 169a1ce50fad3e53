"""Entropy bonus: ``loss -= beta * agg(H)`` (Williams & Peng 1991; Mnih et al. 2016, arXiv
1602.01783), with the gradient flowing through the current policy's entropy ``H``.

Written as a per-token penalty ``-beta * H_t`` that goes through the same aggregation as the
policy loss, which equals subtracting ``beta`` times the aggregated entropy (verl's
``pg_loss - entropy_coeff * agg_loss(entropy)``).

:class:`AdaptiveEntropyBonus` steers ``beta`` toward a target entropy with the additive
controller of Skywork-OR1 (He et al. 2025, arXiv 2505.22312, "adaptive entropy control"): after
each RL step, ``beta += step`` if the step's token-mean entropy is below the target,
``beta -= step`` if above, then ``beta`` is clamped to ``[min_coefficient, max_coefficient]``.
"""

from __future__ import annotations

from typing import Any

import torch

from steer.algo.interventions.base import Intervention, PolicyTokens, PPOTerms


class EntropyBonus(Intervention):
    """A static entropy bonus.

    Args:
        coefficient: ``beta >= 0``.
    """

    name = "entropy_bonus"

    def __init__(self, coefficient: float = 1e-3) -> None:
        if coefficient < 0:
            raise ValueError(f"entropy_bonus coefficient must be >= 0, got {coefficient}")
        self.coefficient = float(coefficient)

    def token_penalty(
        self, tokens: PolicyTokens, ppo: PPOTerms, metrics: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        valid = tokens.mask.bool()
        metrics[f"intervention/{self.name}/coefficient"] = torch.tensor(self.coefficient, device=valid.device)
        metrics[f"intervention/{self.name}/share_penalised"] = torch.tensor(
            float(self.coefficient != 0.0 and bool(valid.any())), device=valid.device
        )
        bonus = -self.coefficient * tokens.entropy
        return torch.where(valid, bonus, torch.zeros_like(bonus))  # padding may hold garbage


class AdaptiveEntropyBonus(EntropyBonus):
    """An entropy bonus whose coefficient is steered toward a target entropy (state checkpointed).

    Args:
        target_entropy: the token-mean entropy (nats) to hold, ``> 0``.
        initial_coefficient: ``beta`` before the first step, inside the bounds.
        step: the additive change per RL step, ``> 0``.
        min_coefficient, max_coefficient: bounds on ``beta``, ``0 <= min <= max``.
        entropy_key: the metric the trainer logs the step's token-mean entropy under.
    """

    def __init__(
        self,
        target_entropy: float = 0.2,
        initial_coefficient: float = 0.0,
        step: float = 5e-4,
        min_coefficient: float = 0.0,
        max_coefficient: float = 1e-2,
        entropy_key: str = "actor/entropy",
    ) -> None:
        if not target_entropy > 0:
            raise ValueError(f"entropy_bonus target_entropy must be > 0, got {target_entropy}")
        if not step > 0:
            raise ValueError(f"entropy_bonus step must be > 0, got {step}")
        if not 0 <= min_coefficient <= max_coefficient:
            raise ValueError(
                "entropy_bonus needs 0 <= min_coefficient <= max_coefficient, "
                f"got min_coefficient={min_coefficient}, max_coefficient={max_coefficient}"
            )
        if not min_coefficient <= initial_coefficient <= max_coefficient:
            raise ValueError(
                f"entropy_bonus initial_coefficient must be in [{min_coefficient}, {max_coefficient}], "
                f"got {initial_coefficient}"
            )
        super().__init__(initial_coefficient)
        self.target_entropy = float(target_entropy)
        self.step = float(step)
        self.min_coefficient = float(min_coefficient)
        self.max_coefficient = float(max_coefficient)
        self.entropy_key = entropy_key

    def after_rl_step(self, metrics: dict[str, float]) -> None:
        if self.entropy_key not in metrics:
            raise KeyError(
                f"the adaptive entropy bonus needs the metric {self.entropy_key!r} after each RL step"
            )
        entropy = float(metrics[self.entropy_key])
        if entropy < self.target_entropy:
            self.coefficient += self.step
        elif entropy > self.target_entropy:
            self.coefficient -= self.step
        self.coefficient = min(max(self.coefficient, self.min_coefficient), self.max_coefficient)

    def state_dict(self) -> dict[str, Any]:
        return {"coefficient": self.coefficient}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.coefficient = float(state["coefficient"])
