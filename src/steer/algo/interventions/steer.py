"""STEER: Stabilizing Token-level Entropy-changE via Reweighting (Hao et al. 2025, "Rethinking
Entropy Interventions in RLVR: An Entropy Change Perspective", arXiv 2510.10150).

Each token's predicted entropy change ``Omega`` is computed without gradient, in one of two forms:

- ``released`` (the authors' code)::

      Omega = (A / pi_old) * pi (1 - pi) * (log pi + H_old)

  with ``pi`` from the current forward pass and ``pi_old``, ``H_old`` from the pass before the
  update; ``pi`` and ``pi_old`` clamped to ``[1e-8, 1 - 1e-8]``. Omega is computed in float64:
  in float32 ``1 - 1e-8`` rounds to 1, so the released code's upper clamp does nothing there and
  a token with ``pi`` within 3e-8 of 1 gets ``Omega = 0`` however small ``pi_old`` is.
- ``first_order`` (the single-logit first-order entropy change of a clipped PPO step)::

      Omega = 1[not clipped] * A * r * pi (1 - pi) * (log pi + H)

  with ``r = pi / pi_old`` and ``H`` the current entropy.

Non-finite ``Omega`` counts as 0. The weight shrinks tokens that would move entropy most:

- ``exponential`` (default): ``w = clamp(exp(-k |Omega|), lambda_min, 1)`` with
  ``k = -ln(lambda_min) / max(max |Omega|, 0.02)``, so the largest ``|Omega|`` gets ``lambda_min``;
- ``linear``: ``w = clamp(w_max - (|Omega| - m)(w_max - w_min) / (M - m), w_min, w_max)`` with
  ``m``, ``M`` the min and max ``|Omega|``, and ``(w_min + w_max) / 2`` everywhere when ``M = m``.

The max/min are taken over one micro-batch (``scope: microbatch``, as released) or the whole
mini-batch on every rank (``scope: global``). The weights multiply the dual-clipped per-token PPO
loss before aggregation; the aggregation denominator stays the token count. ``lambda_min = 1``
gives weights of exactly 1. ``lambda_min`` is 0.8 in the released scripts; the paper's text
reports 0.7.
"""

from __future__ import annotations

import math

import torch

from steer.algo.interventions.base import Intervention, PolicyTokens, PPOTerms
from steer.algo.interventions.scope import NEEDS_PPO, check_scope
from steer.distributed import all_reduce

PROBABILITY_CLAMP = 1e-8
OMEGAS = ("released", "first_order")
MAPPINGS = ("exponential", "linear")


def _clamped_probability(logprobs: torch.Tensor) -> torch.Tensor:
    return torch.exp(logprobs.double()).clamp(PROBABILITY_CLAMP, 1.0 - PROBABILITY_CLAMP)


def released_omega(
    advantages: torch.Tensor, logprobs: torch.Tensor, old_logprobs: torch.Tensor, old_entropy: torch.Tensor
) -> torch.Tensor:
    """``(A / pi_old) * pi (1 - pi) * (log pi + H_old)`` per token, every tensor ``[B, T]``.

    float64, no gradient; non-finite values are returned as they are (the caller decides).
    """
    with torch.no_grad():
        pi = _clamped_probability(logprobs)
        pi_old = _clamped_probability(old_logprobs)
        return advantages.double() / pi_old * pi * (1.0 - pi) * (torch.log(pi) + old_entropy.double())


def first_order_omega(
    advantages: torch.Tensor, ratio: torch.Tensor, clipped: torch.Tensor, logprobs: torch.Tensor, entropy: torch.Tensor
) -> torch.Tensor:
    """``1[not clipped] * A * r * pi (1 - pi) * (log pi + H)`` per token, every tensor ``[B, T]`` (float64)."""
    with torch.no_grad():
        pi = _clamped_probability(logprobs)
        omega = advantages.double() * ratio.double() * pi * (1.0 - pi) * (torch.log(pi) + entropy.double())
        return torch.where(clipped, torch.zeros_like(omega), omega)


class SteerReweighting(Intervention):
    """Down-weight each token's PPO loss by its predicted entropy change ``|Omega|``.

    Args:
        lambda_min: the smallest weight of the exponential mapping, in (0, 1].
        omega: ``released`` or ``first_order`` (see the module docstring).
        mapping: ``exponential`` or ``linear``.
        w_min, w_max: the band of the linear mapping, ``0 < w_min <= w_max``.
        scope: ``microbatch`` or ``global``.
        omega_floor: the floor of the normalising max in the exponential mapping (0.02 released).
    """

    name = "steer"

    def __init__(
        self,
        lambda_min: float = 0.8,
        omega: str = "released",
        mapping: str = "exponential",
        w_min: float = 0.8,
        w_max: float = 1.2,
        scope: str = "microbatch",
        omega_floor: float = 0.02,
    ) -> None:
        if not 0.0 < lambda_min <= 1.0:
            raise ValueError(f"steer lambda_min must be in (0, 1], got {lambda_min}")
        if omega not in OMEGAS:
            raise ValueError(f"steer omega must be one of {list(OMEGAS)}, got {omega!r}")
        if mapping not in MAPPINGS:
            raise ValueError(f"steer mapping must be one of {list(MAPPINGS)}, got {mapping!r}")
        if not 0.0 < w_min <= w_max:
            raise ValueError(f"steer needs 0 < w_min <= w_max, got w_min={w_min}, w_max={w_max}")
        if not omega_floor > 0.0:
            raise ValueError(f"steer omega_floor must be > 0, got {omega_floor}")
        self.lambda_min = lambda_min
        self.omega = omega
        self.mapping = mapping
        self.w_min = w_min
        self.w_max = w_max
        self.scope = check_scope(scope)
        self.omega_floor = omega_floor
        self._range: tuple[float, float] | None = None

    @property
    def needs_minibatch_pass(self) -> bool:
        return self.scope == "global"

    def signed_omega(self, tokens: PolicyTokens, ppo: PPOTerms | None) -> torch.Tensor:
        """``Omega`` per token ``[B, T]`` (positive: predicted entropy decrease), non-finite values as 0."""
        advantages = tokens.advantages if ppo is None else ppo.advantages
        if self.omega == "released":
            omega = released_omega(advantages, tokens.logprobs, tokens.old_logprobs, tokens.old_entropy)
        else:
            if ppo is None:
                raise ValueError(f"{self.name} with omega=first_order " + NEEDS_PPO)
            omega = first_order_omega(advantages, ppo.ratio, ppo.clipped, tokens.logprobs, tokens.entropy)
        return torch.where(torch.isfinite(omega), omega, torch.zeros_like(omega))

    def omega_abs(self, tokens: PolicyTokens, ppo: PPOTerms | None) -> torch.Tensor:
        """``|Omega|`` per token ``[B, T]``, non-finite values as 0."""
        return self.signed_omega(tokens, ppo).abs()

    def _local_range(self, omega_abs: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        low = torch.where(valid, omega_abs, torch.full_like(omega_abs, torch.inf)).min()
        high = torch.where(valid, omega_abs, torch.zeros_like(omega_abs)).max()
        return low, high

    def begin_minibatch(self, tokens: PolicyTokens, ppo: PPOTerms | None = None) -> None:
        low, high = self._local_range(self.omega_abs(tokens, ppo), tokens.mask.bool())
        self._range = (float(all_reduce(low, "min")), float(all_reduce(high, "max")))

    def weights_from_omega(self, omega_abs: torch.Tensor, low: float, high: float) -> torch.Tensor:
        """Map ``|Omega|`` ``[B, T]`` to weights, given the scope's min ``low`` and max ``high``."""
        if self.mapping == "exponential":
            k = -math.log(self.lambda_min) / max(high, self.omega_floor)
            return torch.exp(-k * omega_abs).clamp(self.lambda_min, 1.0)
        if high > low:
            slope = (self.w_max - self.w_min) / (high - low)
            return (self.w_max - (omega_abs - low) * slope).clamp(self.w_min, self.w_max)
        return torch.full_like(omega_abs, (self.w_min + self.w_max) / 2)

    def token_weights(
        self, tokens: PolicyTokens, ppo: PPOTerms, metrics: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        valid = tokens.mask.bool()
        omega_abs = self.omega_abs(tokens, ppo)
        if self.scope == "global":
            if self._range is None:
                raise RuntimeError("steer with scope=global: begin_minibatch was not called")
            low, high = self._range
        else:
            low, high = (float(v) for v in self._local_range(omega_abs, valid))
        weights = self.weights_from_omega(omega_abs, low, high).to(ppo.loss.dtype)
        weights = torch.where(valid, weights, torch.ones_like(weights))
        self._log(weights[valid], high, metrics)
        return weights

    def _log(self, weights: torch.Tensor, omega_abs_max: float, metrics: dict[str, torch.Tensor]) -> None:
        if weights.numel() == 0:
            return
        prefix = f"intervention/{self.name}"
        floor = self.lambda_min if self.mapping == "exponential" else self.w_min
        ordered = weights.float().sort().values
        last = ordered.numel() - 1
        metrics[f"{prefix}/weight_mean"] = ordered.mean()
        metrics[f"{prefix}/weight_min"] = ordered[0]
        metrics[f"{prefix}/weight_max"] = ordered[-1]
        for q in (10, 50, 90):
            metrics[f"{prefix}/weight_p{q}"] = ordered[round(q / 100 * last)]
        metrics[f"{prefix}/share_at_min"] = (ordered <= floor * (1 + 1e-6)).float().mean()
        metrics[f"{prefix}/share_reweighted"] = (ordered != 1.0).float().mean()
        metrics[f"{prefix}/omega_abs_max"] = torch.tensor(omega_abs_max, device=weights.device)
