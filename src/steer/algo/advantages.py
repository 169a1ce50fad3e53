"""Outcome advantages from one scalar reward per response, estimated within each prompt's group.

Every estimator takes rewards shaped ``[num_prompts, n]`` (the n responses sampled for one prompt
form a group) and returns one advantage per response with the same shape; the trainer broadcasts
it over the response's tokens. Groups are always whole: under data parallelism a group lives on one
rank, so no estimator needs a cross-rank reduction.
"""

from __future__ import annotations

from typing import Callable

import torch

EPS = 1e-6


def grpo_advantages(rewards: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
    """GRPO (Shao et al. 2024, arXiv 2402.03300): ``A_i = (R_i - mean_g R) / (std_g R + eps)``.

    ``std`` is the unbiased sample standard deviation, as in the reference implementations.
    A group whose rewards are all equal gets advantage 0 for every response.
    """
    mean = rewards.mean(-1, keepdim=True)
    std = rewards.std(-1, keepdim=True, unbiased=True)
    return (rewards - mean) / (std + EPS)


def drgrpo_advantages(rewards: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
    """Dr. GRPO (Liu et al. 2025, arXiv 2503.20783): ``A_i = R_i - mean_g R`` (no std division)."""
    return rewards - rewards.mean(-1, keepdim=True)


def rloo_advantages(rewards: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
    """RLOO (Ahmadian et al. 2024, arXiv 2402.14740): ``A_i = R_i - mean_{j != i} R_j``."""
    n = rewards.shape[-1]
    leave_one_out = (rewards.sum(-1, keepdim=True) - rewards) / (n - 1)
    return rewards - leave_one_out


def opo_advantages(rewards: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
    """OPO (Hao et al. 2025, arXiv 2505.23585): length-weighted baseline ``b = sum_j |o_j| R_j / sum_j |o_j|``.

    ``A_i = R_i - b``; ``lengths`` is ``[num_prompts, n]``, the response token counts. OPO is meant
    to be trained strictly on-policy (one mini-batch, one epoch).
    """
    if lengths is None:
        raise ValueError("the OPO estimator needs the response lengths")
    lengths = lengths.to(rewards.dtype)
    baseline = (lengths * rewards).sum(-1, keepdim=True) / lengths.sum(-1, keepdim=True).clamp(min=1.0)
    return rewards - baseline


ESTIMATORS: dict[str, Callable[..., torch.Tensor]] = {
    "grpo": grpo_advantages,
    "drgrpo": drgrpo_advantages,
    "rloo": rloo_advantages,
    "opo": opo_advantages,
}


def group_advantages(
    rewards: torch.Tensor, estimator: str = "grpo", lengths: torch.Tensor | None = None
) -> torch.Tensor:
    """Dispatch to one of :data:`ESTIMATORS`; ``rewards`` and ``lengths`` are ``[num_prompts, n]``."""
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown advantage estimator {estimator!r}; valid: {sorted(ESTIMATORS)}")
    if rewards.dim() != 2 or rewards.shape[-1] < 2:
        raise ValueError(f"group advantages need rewards shaped [num_prompts, n>=2], got {tuple(rewards.shape)}")
    return ESTIMATORS[estimator](rewards, lengths)
