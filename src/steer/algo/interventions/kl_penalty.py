"""KL divergence to a frozen reference policy, as a per-token loss term (off by default).

Estimators of KL(pi_theta || pi_ref) from samples of pi_theta (Schulman 2020, "Approximating KL
divergence"), with ``d = log pi_theta - log pi_ref``:

- ``k1 = d`` (unbiased, high variance, can be negative),
- ``k2 = d^2 / 2`` (biased, low variance),
- ``k3 = exp(-d) - 1 + d`` (unbiased, always >= 0; the GRPO paper's choice).
"""

from __future__ import annotations

import torch

from steer.algo.interventions.base import Intervention, PolicyTokens, PPOTerms

KL_ESTIMATORS = ("k1", "k2", "k3")


def kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k3") -> torch.Tensor:
    """Per-token KL estimate ``[B, T]``; gradient flows through ``logprobs``."""
    diff = logprobs - ref_logprobs
    if estimator == "k1":
        return diff
    if estimator == "k2":
        return 0.5 * diff.square()
    if estimator == "k3":
        return torch.exp(-diff.clamp(-20.0, 20.0)) - 1.0 + diff
    raise ValueError(f"unknown KL estimator {estimator!r}; valid: {list(KL_ESTIMATORS)}")


class ReferenceKLPenalty(Intervention):
    """Adds ``coef * KL_estimate(pi_theta || pi_ref)`` to every token's loss (GRPO, arXiv 2402.03300)."""

    name = "reference_kl"

    def __init__(self, coef: float, estimator: str = "k3") -> None:
        if coef < 0:
            raise ValueError(f"algorithm.kl.coef must be >= 0, got {coef}")
        if estimator not in KL_ESTIMATORS:
            raise ValueError(f"algorithm.kl.estimator must be one of {list(KL_ESTIMATORS)}, got {estimator!r}")
        self.coef, self.estimator = coef, estimator

    def token_penalty(self, tokens: PolicyTokens, ppo: PPOTerms, metrics: dict[str, torch.Tensor]) -> torch.Tensor:
        if tokens.ref_logprobs is None:
            raise RuntimeError("the KL penalty needs reference log-probs, but no reference model is loaded")
        kl = kl_estimate(tokens.logprobs, tokens.ref_logprobs, self.estimator)
        mask = tokens.mask.to(kl.dtype)
        metrics["actor/kl_ref"] = ((kl.detach() * mask).sum() / mask.sum().clamp(min=1.0))
        return self.coef * kl
