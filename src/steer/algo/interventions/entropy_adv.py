"""Entropy-based advantage shaping (Cheng et al. 2025, "Reasoning with Exploration: An Entropy
Perspective", arXiv 2506.14758)::

    A'_t = A_t + min(alpha * H_t.detach(), |A_t| / kappa)

with ``H_t`` the current policy's entropy at the token, without gradient. The bonus is never
larger than ``|A_t| / kappa``, so it cannot flip the sign of a negative advantage (for
``kappa > 1``) and it is 0 where the advantage is 0. Paper values: ``alpha = 0.4``, ``kappa = 2``.
"""

from __future__ import annotations

import torch

from steer.algo.interventions.base import Intervention, PolicyTokens
from steer.algo.aggregation import masked_mean


class EntropyAdvantage(Intervention):
    """Add a clipped entropy bonus to every token's advantage.

    Args:
        alpha: entropy scale, ``>= 0``.
        kappa: the bonus is capped at ``|A| / kappa``; ``kappa > 0``.
    """

    name = "entropy_adv"

    def __init__(self, alpha: float = 0.4, kappa: float = 2.0) -> None:
        if alpha < 0:
            raise ValueError(f"entropy_adv alpha must be >= 0, got {alpha}")
        if not kappa > 0:
            raise ValueError(f"entropy_adv kappa must be > 0, got {kappa}")
        self.alpha = float(alpha)
        self.kappa = float(kappa)

    def transform_advantages(
        self, advantages: torch.Tensor, tokens: PolicyTokens, metrics: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        valid = tokens.mask.bool()
        bonus = torch.minimum(self.alpha * tokens.entropy.detach(), advantages.abs() / self.kappa)
        bonus = torch.where(valid, bonus, torch.zeros_like(bonus))  # padding may hold garbage
        metrics[f"intervention/{self.name}/bonus_mean"] = masked_mean(bonus, valid)
        metrics[f"intervention/{self.name}/share_shaped"] = masked_mean((bonus != 0).float(), valid)
        return advantages + bonus
