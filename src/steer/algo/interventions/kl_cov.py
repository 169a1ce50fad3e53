"""KL-Cov (Cui et al. 2025, "The Entropy Mechanism of Reinforcement Learning for Reasoning
Language Models", arXiv 2505.22617).

With the covariance score ``C_t`` of :mod:`steer.algo.interventions.covariance`, the top
``max(1, floor(k * N))`` valid tokens (``N`` = valid tokens) get, instead of the clipped PPO loss,
the unclipped surrogate plus a KL-like penalty::

    loss_t = -A_t * r_t + beta * |log pi_t - log pi_old_t|

Implemented as a keep mask (the selected tokens' PPO term is dropped) plus a per-token penalty
(their replacement, with gradient). Every other token keeps the configured clipped loss; the
reference implementations (the authors' repository and verl) apply no PPO clip to any token.

Published setting for 7B models: ``k = 2e-3``, ``beta = 1``. verl's default ``beta`` is 0.1, and
the authors' repository gives ``k`` in percent (``k_percent = 0.2`` there is ``k = 2e-3`` here).

Strictly on-policy (ratio = 1) KL-Cov does nothing: the replacement equals the PPO loss and
``|log pi - log pi_old|`` is 0 with zero (sub)gradient, hence ``uses_ratio = True``.
"""

from __future__ import annotations

import torch

from steer.algo.interventions.base import PolicyTokens, PPOTerms
from steer.algo.interventions.covariance import CovarianceSelection, covariance_score
from steer.algo.interventions.scope import own_selection
from steer.distributed import all_gather_1d


class KLCov(CovarianceSelection):
    """Penalise ``|log pi - log pi_old|`` on the top ``k`` share of tokens by covariance score.

    Ties in the score go to the earliest tokens in row-major order (rank order across ranks).

    Args:
        ratio: ``k`` in (0, 1], the share of valid tokens penalised (a fraction, not percent).
        coefficient: ``beta >= 0``.
        scope: ``microbatch`` (released code) or ``global`` (top-k over the mini-batch on all ranks).
    """

    name = "kl_cov"
    uses_ratio = True

    def __init__(self, ratio: float = 2e-3, coefficient: float = 1.0, scope: str = "microbatch") -> None:
        if not 0.0 < ratio <= 1.0:
            raise ValueError(f"kl_cov ratio must be in (0, 1] (a fraction, not percent), got {ratio}")
        if coefficient < 0:
            raise ValueError(f"kl_cov coefficient must be >= 0, got {coefficient}")
        super().__init__(ratio, scope)
        self.coefficient = coefficient
        self._selected: torch.Tensor | None = None
        self._selected_for: PPOTerms | None = None

    def select(self, tokens: PolicyTokens, ppo: PPOTerms, across_ranks: bool = False) -> torch.Tensor:
        """The ``[B, T]`` bool mask of the top-``k`` tokens by covariance score."""
        valid = tokens.mask.bool()
        score = covariance_score(ppo.advantages, tokens.logprobs, valid, across_ranks).flatten()
        flat = (score > -torch.inf).nonzero().squeeze(1)
        count = self.selection_count(valid, across_ranks)
        scores, offset = score[flat], 0
        if across_ranks:
            scores, offset = all_gather_1d(scores)
        # A stable sort makes ties (e.g. all advantages equal) go to the earliest tokens, on every rank.
        top = torch.sort(scores, descending=True, stable=True).indices[:count]
        return own_selection(top, offset, flat, valid)

    def _selection(self, tokens: PolicyTokens, ppo: PPOTerms) -> torch.Tensor:
        # token_mask and token_penalty of one micro-batch share one selection (one cursor step).
        if self._selected_for is not ppo:
            self._selected, self._selected_for = self.selection(tokens, ppo) & tokens.mask.bool(), ppo
        return self._selected

    def token_mask(
        self, tokens: PolicyTokens, ppo: PPOTerms, metrics: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        selected = self._selection(tokens, ppo)
        metrics[f"intervention/{self.name}/selected_count"] = selected.sum().float()
        metrics[f"intervention/{self.name}/share_penalised"] = selected.sum().float() / tokens.mask.sum().clamp(min=1)
        return ~selected

    def token_penalty(
        self, tokens: PolicyTokens, ppo: PPOTerms, metrics: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        selected = self._selection(tokens, ppo)
        replacement = ppo.unclipped_loss + self.coefficient * (tokens.logprobs - tokens.old_logprobs).abs()
        return torch.where(selected, replacement, torch.zeros_like(replacement))
