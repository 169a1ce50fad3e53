"""Clip-Cov (Cui et al. 2025, "The Entropy Mechanism of Reinforcement Learning for Reasoning
Language Models", arXiv 2505.22617).

With the covariance score ``C_t = (A_t - mean A)(log pi_t - mean log pi)`` over valid tokens
(:mod:`steer.algo.interventions.covariance`), the candidates are the valid tokens with
``omega_low < C_t < omega_high`` whose gradient is not already cut by the PPO clip (low, high or
dual). ``max(1, floor(r * N))`` of them (``N`` = valid tokens) are drawn uniformly at random with a
seeded generator and their policy loss is set to zero (a keep mask), so they contribute no gradient.

Defaults are the paper's and verl's: ``r = 2e-4``, ``omega_low = 1``, ``omega_high = 5``. The
published recipe also loosens the PPO clip to 1 (a clip setting, not part of this class).
"""

from __future__ import annotations

from typing import Any

import torch

from steer.algo.interventions.base import PolicyTokens, PPOTerms
from steer.algo.interventions.covariance import CovarianceSelection, covariance_score
from steer.algo.interventions.scope import own_selection
from steer.distributed import all_gather_1d


class ClipCov(CovarianceSelection):
    """Zero the loss of a random ``r`` share of the tokens whose covariance score lies in a band.

    Args:
        ratio: ``r`` in (0, 1], the share of valid tokens to detach.
        omega_low, omega_high: the band ``omega_low < C_t < omega_high``.
        seed: seeds the generator of the random draw (checkpointed with :meth:`state_dict`).
        scope: ``microbatch`` (released code) or ``global`` (mini-batch, all ranks; every rank
            draws the same permutation, so ranks must share the seed).
    """

    name = "clip_cov"

    def __init__(
        self,
        ratio: float = 2e-4,
        omega_low: float = 1.0,
        omega_high: float = 5.0,
        seed: int = 0,
        scope: str = "microbatch",
    ) -> None:
        if not 0.0 < ratio <= 1.0:
            raise ValueError(f"clip_cov ratio must be in (0, 1], got {ratio}")
        if not omega_low < omega_high:
            raise ValueError(
                f"clip_cov needs omega_low < omega_high, got omega_low={omega_low}, omega_high={omega_high}"
            )
        super().__init__(ratio, scope)
        self.omega_low = omega_low
        self.omega_high = omega_high
        self.generator = torch.Generator().manual_seed(int(seed))

    def select(self, tokens: PolicyTokens, ppo: PPOTerms, across_ranks: bool = False) -> torch.Tensor:
        """The ``[B, T]`` bool mask of the tokens drawn (advances the generator)."""
        valid = tokens.mask.bool()
        score = covariance_score(ppo.advantages, tokens.logprobs, valid, across_ranks)
        candidates = valid & ~ppo.clipped & (score > self.omega_low) & (score < self.omega_high)
        flat = candidates.flatten().nonzero().squeeze(1)
        count = self.selection_count(valid, across_ranks)
        offset, total = 0, flat.numel()
        if across_ranks:  # number the candidates of all ranks in rank order, draw once for all
            counts, rank = all_gather_1d(torch.tensor([flat.numel()], device=flat.device))
            offset, total = int(counts[:rank].sum()), int(counts.sum())
        drawn = torch.randperm(total, generator=self.generator)[:count].to(flat.device)
        return own_selection(drawn, offset, flat, valid)

    def token_mask(
        self, tokens: PolicyTokens, ppo: PPOTerms, metrics: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        selected = self.selection(tokens, ppo)
        valid = tokens.mask.bool()
        selected = selected & valid
        metrics[f"intervention/{self.name}/selected_count"] = selected.sum().float()
        metrics[f"intervention/{self.name}/share_masked"] = selected.sum().float() / valid.sum().clamp(min=1)
        return ~selected

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
