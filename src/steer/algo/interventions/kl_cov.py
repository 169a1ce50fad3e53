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

from steer.algo.interventions.base import Intervention, PolicyTokens, PPOTerms
from steer.algo.interventions.covariance import covariance_score, valid_token_count
from steer.algo.interventions.scope import NEEDS_PPO, RowCursor, check_scope
from steer.distributed import all_gather_1d


class KLCov(Intervention):
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
        self.ratio = ratio
        self.coefficient = coefficient
        self.scope = check_scope(scope)
        self._cursor: RowCursor | None = None
        self._selected: torch.Tensor | None = None
        self._selected_for: PPOTerms | None = None

    @property
    def needs_minibatch_pass(self) -> bool:
        return self.scope == "global"

    def select(self, tokens: PolicyTokens, ppo: PPOTerms, across_ranks: bool = False) -> torch.Tensor:
        """The ``[B, T]`` bool mask of the top-``k`` tokens by covariance score."""
        valid = tokens.mask.bool()
        score = covariance_score(ppo.advantages, tokens.logprobs, valid, across_ranks).flatten()
        flat = (score > -torch.inf).nonzero().squeeze(1)
        count = max(1, int(self.ratio * valid_token_count(valid, across_ranks)))
        scores, offset = score[flat], 0
        if across_ranks:
            scores, offset = all_gather_1d(scores)
        # A stable sort makes ties (e.g. all advantages equal) go to the earliest tokens, on every rank.
        top = torch.sort(scores, descending=True, stable=True).indices[:count]
        mine = top[(top >= offset) & (top < offset + flat.numel())] - offset
        selected = torch.zeros(valid.numel(), dtype=torch.bool, device=valid.device)
        selected[flat[mine]] = True
        return selected.view_as(valid)

    def begin_minibatch(self, tokens: PolicyTokens, ppo: PPOTerms | None = None) -> None:
        if ppo is None:
            raise ValueError("kl_cov with scope=global " + NEEDS_PPO)
        self._cursor = RowCursor(self.select(tokens, ppo, across_ranks=True))

    def _selection(self, tokens: PolicyTokens, ppo: PPOTerms) -> torch.Tensor:
        # token_mask and token_penalty of one micro-batch share one selection (one cursor step).
        if self._selected_for is not ppo:
            if self.scope == "global":
                if self._cursor is None:
                    raise RuntimeError("kl_cov with scope=global: begin_minibatch was not called")
                selected = self._cursor.take(*tokens.mask.shape).to(tokens.mask.device)
            else:
                selected = self.select(tokens, ppo)
            self._selected, self._selected_for = selected & tokens.mask.bool(), ppo
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
