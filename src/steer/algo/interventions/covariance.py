"""What Clip-Cov and KL-Cov share (Cui et al. 2025, arXiv 2505.22617): the covariance score and
the selection of tokens by it, per micro-batch or once per mini-batch (:class:`CovarianceSelection`).

Per valid token ``C_t = (A_t - mean A) * (log pi_t - mean log pi)``, the means taken over the
valid tokens of the scope (one micro-batch, or the mini-batch on every rank). Summed over a
state's actions, ``pi * (A - mean) * (log pi - mean)`` is the covariance that drives the
entropy change of a softmax policy gradient step, so tokens with a large positive ``C_t`` are the
ones that collapse entropy.
"""

from __future__ import annotations

import torch

from steer.algo.interventions.base import Intervention, PolicyTokens, PPOTerms
from steer.algo.interventions.scope import NEEDS_PPO, RowCursor, check_scope
from steer.distributed import all_reduce


def covariance_score(
    advantages: torch.Tensor, logprobs: torch.Tensor, mask: torch.Tensor, across_ranks: bool = False
) -> torch.Tensor:
    """Covariance score per token.

    Args:
        advantages: ``[B, T]`` per-token advantages.
        logprobs: ``[B, T]`` log pi_theta of the sampled tokens (read without gradient).
        mask: ``[B, T]`` bool, True on valid response tokens.
        across_ranks: take the means over every rank's valid tokens.

    Returns:
        ``[B, T]`` scores; ``-inf`` on padding and wherever the score is not finite, so that such
        tokens are never selected.
    """
    valid = mask.bool()
    advantages = advantages.detach()
    logprobs = logprobs.detach()
    finite = valid & torch.isfinite(advantages) & torch.isfinite(logprobs)
    zero = torch.zeros_like(advantages)
    sums = torch.stack(
        [
            finite.sum().double(),
            torch.where(finite, advantages, zero).double().sum(),
            torch.where(finite, logprobs, zero).double().sum(),
        ]
    )
    if across_ranks:
        sums = all_reduce(sums, "sum")
    means = (sums[1:] / sums[0].clamp(min=1.0)).to(advantages.dtype)
    score = (advantages - means[0]) * (logprobs - means[1])
    return torch.where(finite & torch.isfinite(score), score, torch.full_like(score, -torch.inf))


def valid_token_count(mask: torch.Tensor, across_ranks: bool = False) -> int:
    """Number of valid tokens ``N`` in the scope (the base of the ``r * N`` and ``k * N`` counts)."""
    count = mask.bool().sum().to(torch.float64)
    if across_ranks:
        count = all_reduce(count, "sum")
    return int(count.item())


class CovarianceSelection(Intervention):
    """Base of Clip-Cov and KL-Cov: a token selection by covariance score, made by :meth:`select`.

    ``scope: microbatch`` selects within each micro-batch; ``scope: global`` selects once per
    mini-batch over every rank in :meth:`begin_minibatch`, and each micro-batch then takes its rows
    of that selection (:meth:`selection`).

    Args:
        ratio: the share of valid tokens selected (``max(1, floor(ratio * N))`` tokens).
        scope: ``microbatch`` or ``global``.
    """

    def __init__(self, ratio: float, scope: str) -> None:
        self.ratio = ratio
        self.scope = check_scope(scope)
        self._cursor: RowCursor | None = None

    @property
    def needs_minibatch_pass(self) -> bool:
        return self.scope == "global"

    def select(self, tokens: PolicyTokens, ppo: PPOTerms, across_ranks: bool = False) -> torch.Tensor:
        """The ``[B, T]`` bool mask of the tokens selected in ``tokens`` (all ranks' with ``across_ranks``)."""
        raise NotImplementedError

    def selection_count(self, valid: torch.Tensor, across_ranks: bool = False) -> int:
        """How many tokens to select: ``max(1, floor(ratio * N))``, ``N`` the valid tokens of the scope."""
        return max(1, int(self.ratio * valid_token_count(valid, across_ranks)))

    def begin_minibatch(self, tokens: PolicyTokens, ppo: PPOTerms | None = None) -> None:
        if ppo is None:
            raise ValueError(f"{self.name} with scope=global " + NEEDS_PPO)
        self._cursor = RowCursor(self.select(tokens, ppo, across_ranks=True))

    def selection(self, tokens: PolicyTokens, ppo: PPOTerms) -> torch.Tensor:
        """This micro-batch's ``[B, T]`` selection: its rows of the mini-batch's (``global``) or its own."""
        if self.scope == "global":
            if self._cursor is None:
                raise RuntimeError(f"{self.name} with scope=global: begin_minibatch was not called")
            return self._cursor.take(*tokens.mask.shape, tokens.minibatch_rows).to(tokens.mask.device)
        return self.select(tokens, ppo)
