"""The covariance score shared by Clip-Cov and KL-Cov (Cui et al. 2025, arXiv 2505.22617).

Per valid token ``C_t = (A_t - mean A) * (log pi_t - mean log pi)``, the means taken over the
valid tokens of the scope (one micro-batch, or the mini-batch on every rank). Summed over a
state's actions, ``pi * (A - mean) * (log pi - mean)`` is the covariance that drives the
entropy change of a softmax policy gradient step, so tokens with a large positive ``C_t`` are the
ones that collapse entropy.
"""

from __future__ import annotations

import torch

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
