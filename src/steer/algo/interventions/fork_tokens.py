"""High-entropy "forking" tokens only (Wang et al. 2025, "Beyond the 80/20 Rule: High-Entropy
Minority Tokens Drive Effective Reinforcement Learning for LLM Reasoning", arXiv 2506.01939).

The policy gradient is kept only on the tokens whose entropy (current policy, no gradient) is at
or above the ``1 - top_fraction`` quantile of the valid tokens' entropies (linear interpolation,
as ``torch.quantile``); the paper keeps the top 20%. Every other token's loss is masked out.
Tokens with a non-finite entropy are never kept and do not enter the quantile.
"""

from __future__ import annotations

import math

import torch

from steer.algo.interventions.base import Intervention, PolicyTokens, PPOTerms
from steer.algo.interventions.scope import check_scope
from steer.distributed import all_gather_1d


def entropy_quantile(entropy: torch.Tensor, mask: torch.Tensor, q: float, across_ranks: bool = False) -> float:
    """The ``q`` quantile of the finite entropies of valid tokens (``inf`` when there are none)."""
    values = entropy.detach()[mask.bool() & torch.isfinite(entropy.detach())].float()
    if across_ranks:
        values, _ = all_gather_1d(values)
    if values.numel() == 0:
        return float("inf")
    ordered = values.sort().values
    position = q * (ordered.numel() - 1)
    below = int(position)
    above = min(below + 1, ordered.numel() - 1)
    return float(ordered[below] + (position - below) * (ordered[above] - ordered[below]))


class ForkTokens(Intervention):
    """Keep the policy gradient only on the top ``top_fraction`` highest-entropy tokens.

    Args:
        top_fraction: share of valid tokens kept, in (0, 1] (0.2 in the paper).
        scope: the entropy quantile over one ``microbatch`` or the ``global`` mini-batch on all ranks.
    """

    name = "fork_tokens"

    def __init__(self, top_fraction: float = 0.2, scope: str = "microbatch") -> None:
        if not 0.0 < top_fraction <= 1.0:
            raise ValueError(f"fork_tokens top_fraction must be in (0, 1], got {top_fraction}")
        self.top_fraction = float(top_fraction)
        self.scope = check_scope(scope)
        self._threshold: float | None = None

    @property
    def needs_minibatch_pass(self) -> bool:
        return self.scope == "global"

    def begin_minibatch(self, tokens: PolicyTokens, ppo: PPOTerms | None = None) -> None:
        self._threshold = entropy_quantile(tokens.entropy, tokens.mask, 1.0 - self.top_fraction, across_ranks=True)

    def token_mask(
        self, tokens: PolicyTokens, ppo: PPOTerms, metrics: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        if self.scope == "global":
            if self._threshold is None:
                raise RuntimeError("fork_tokens with scope=global: begin_minibatch was not called")
            threshold = self._threshold
        else:
            threshold = entropy_quantile(tokens.entropy, tokens.mask, 1.0 - self.top_fraction)
        entropy = tokens.entropy.detach()
        keep = torch.isfinite(entropy) & (entropy >= threshold)
        valid = tokens.mask.bool()
        masked = valid & ~keep
        metrics[f"intervention/{self.name}/share_masked"] = masked.sum().float() / valid.sum().clamp(min=1)
        if math.isfinite(threshold):
            metrics[f"intervention/{self.name}/entropy_threshold"] = torch.tensor(threshold, device=valid.device)
        return keep
