"""W-REINFORCE (Zhu et al. 2025, "The Surprising Effectiveness of Negative Reinforcement in LLM
Reasoning", arXiv 2506.01347): ``L = lambda * L_positive + L_negative``, i.e. the loss of every
token of a positive sample (advantage > 0) is weighted by ``lambda``; the paper uses
``lambda = 0.1``.

The paper trains plain REINFORCE with rewards +1/-1 as advantages; here the weight acts on
whatever advantage estimator and clip the algorithm config uses.
"""

from __future__ import annotations

import torch

from steer.algo.interventions.base import Intervention, PolicyTokens, PPOTerms
from steer.algo.aggregation import masked_mean


class WReinforce(Intervention):
    """Weight the loss of positive-advantage tokens by ``positive_weight``.

    Args:
        positive_weight: ``lambda >= 0``.
    """

    name = "w_reinforce"

    def __init__(self, positive_weight: float = 0.1) -> None:
        if positive_weight < 0:
            raise ValueError(f"w_reinforce positive_weight must be >= 0, got {positive_weight}")
        self.positive_weight = float(positive_weight)

    def token_weights(
        self, tokens: PolicyTokens, ppo: PPOTerms, metrics: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        positive = ppo.advantages > 0
        weights = torch.where(positive, torch.full_like(ppo.loss, self.positive_weight), torch.ones_like(ppo.loss))
        metrics[f"intervention/{self.name}/share_reweighted"] = masked_mean(
            (positive & (weights != 1.0)).float(), tokens.mask.bool()
        )
        return weights
