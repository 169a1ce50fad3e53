"""EXTENSIONS of STEER (not in the paper or its released code): reweightings that act on the bulk.

Faithful STEER (:class:`steer.algo.interventions.steer.SteerReweighting`) sets
``k = -ln(lambda_min) / max |Omega|``. The distribution of ``|Omega|`` is very heavy-tailed (the
released Omega carries ``1 / pi_old``, so a rare sampled token can hold a max that is 10^5 times the
median): nearly every token then gets ``w ~= 1`` and STEER is inert (measured in
docs/metrics_entropy_dynamics.md and experiments/study/REPORT.md). Two labelled alternatives:

- :class:`SteerQuantileReweighting` (``steer_quantile``): the same exponential (or linear) mapping,
  but normalised by a high *quantile* of ``|Omega|`` (default 0.9) instead of the max, so about
  ``1 - quantile`` of the tokens sit at ``lambda_min`` and the bulk is shrunk smoothly. With
  ``scope: global`` on several ranks the normaliser is the max of the ranks' quantiles (exact on
  one rank).
- :class:`SteerBandReweighting` (``steer_band``): a target band on the *predicted batch entropy
  change*. With ``D = sum_{Omega > 0} Omega`` (predicted decrease) and ``U = sum_{Omega < 0} |Omega|``
  (predicted increase), the scale-free net change is ``(U - D) / (U + D)`` in ``[-1, 1]``. When it
  is below ``lower`` every entropy-decreasing token gets the common weight
  ``c = (U - lower (U + D)) / D`` (clamped to ``[lambda_min, 1]``), which puts the net at ``lower``;
  symmetrically, above ``upper`` the entropy-increasing tokens get ``(D + upper (U + D)) / U``.
  Inside the band all weights are 1. It uses the first-order Omega by default.
"""

from __future__ import annotations

import math

import torch

from steer.algo.interventions.base import PolicyTokens, PPOTerms
from steer.distributed import all_reduce
from steer.algo.interventions.steer import SteerReweighting


class SteerQuantileReweighting(SteerReweighting):
    """EXTENSION: STEER with ``max |Omega|`` replaced by the ``quantile`` of ``|Omega|`` in the scope.

    Args:
        quantile: in (0, 1]; 1 gives back faithful STEER's max.
        omega_floor: floor of the normaliser; much smaller than STEER's 0.02 because a quantile of
            ``|Omega|`` is typically 1e-5..1e-2 on small models.
        Other arguments as :class:`SteerReweighting`.
    """

    name = "steer_quantile"

    def __init__(self, quantile: float = 0.9, omega_floor: float = 1e-8, **kwargs) -> None:
        if not 0.0 < quantile <= 1.0:
            raise ValueError(f"steer_quantile quantile must be in (0, 1], got {quantile}")
        super().__init__(omega_floor=omega_floor, **kwargs)
        self.quantile = quantile

    def _local_range(self, omega_abs: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        values = omega_abs[valid]
        if values.numel() == 0:
            return omega_abs.new_tensor(math.inf), omega_abs.new_tensor(0.0)
        return values.min(), torch.quantile(values.double(), self.quantile).to(omega_abs.dtype)


class SteerBandReweighting(SteerReweighting):
    """EXTENSION: keep the predicted batch entropy change ``(U - D) / (U + D)`` within ``[lower, upper]``.

    Args:
        lower, upper: the band, ``-1 <= lower <= upper <= 1`` (``upper = 1``: never shrink the
            entropy-increasing side).
        lambda_min: the smallest common weight, in (0, 1].
        omega: ``first_order`` (default) or ``released``.
        scope: ``microbatch`` or ``global`` (sums over the mini-batch and all ranks).
    """

    name = "steer_band"

    def __init__(self, lower: float = -0.1, upper: float = 0.1, lambda_min: float = 0.5, omega: str = "first_order",
                 scope: str = "microbatch") -> None:
        if not -1.0 <= lower <= upper <= 1.0:
            raise ValueError(f"steer_band needs -1 <= lower <= upper <= 1 for its band, got lower={lower}, upper={upper}")
        super().__init__(lambda_min=lambda_min, omega=omega, scope=scope)
        self.lower = lower
        self.upper = upper
        self._sums: tuple[float, float] | None = None

    @staticmethod
    def _local_sums(omega: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        omega = torch.where(valid, omega, torch.zeros_like(omega))
        return torch.stack([omega.clamp(min=0).sum(), (-omega).clamp(min=0).sum()])

    def begin_minibatch(self, tokens: PolicyTokens, ppo: PPOTerms | None = None) -> None:
        sums = all_reduce(self._local_sums(self.signed_omega(tokens, ppo), tokens.mask.bool()), "sum")
        self._sums = (float(sums[0]), float(sums[1]))

    def band_factors(self, decrease: float, increase: float) -> tuple[float, float]:
        """Common weights ``(c_decrease, c_increase)`` of entropy-decreasing and -increasing tokens."""
        total = decrease + increase
        if total <= 0:
            return 1.0, 1.0
        net = (increase - decrease) / total
        if net < self.lower:
            return min(1.0, max(self.lambda_min, (increase - self.lower * total) / decrease)), 1.0
        if net > self.upper:
            return 1.0, min(1.0, max(self.lambda_min, (decrease + self.upper * total) / increase))
        return 1.0, 1.0

    def token_weights(self, tokens: PolicyTokens, ppo: PPOTerms, metrics: dict[str, torch.Tensor]) -> torch.Tensor:
        valid = tokens.mask.bool()
        omega = self.signed_omega(tokens, ppo)
        if self.scope == "global":
            if self._sums is None:
                raise RuntimeError("steer_band with scope=global: begin_minibatch was not called")
            decrease, increase = self._sums
        else:
            decrease, increase = (float(v) for v in self._local_sums(omega, valid))
        c_decrease, c_increase = self.band_factors(decrease, increase)
        weights = torch.where(omega > 0, torch.full_like(omega, c_decrease), torch.full_like(omega, c_increase))
        weights = torch.where(valid & (omega != 0), weights, torch.ones_like(weights)).to(ppo.loss.dtype)
        self._log(weights[valid], float(omega[valid].abs().max()) if bool(valid.any()) else 0.0, metrics)
        prefix = f"intervention/{self.name}"
        total = decrease + increase
        metrics[f"{prefix}/predicted_net_share"] = torch.tensor((increase - decrease) / total if total > 0 else 0.0)
        metrics[f"{prefix}/decrease_factor"] = torch.tensor(c_decrease)
        metrics[f"{prefix}/increase_factor"] = torch.tensor(c_increase)
        return weights
