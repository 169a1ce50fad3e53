"""CE-GPPO: Coordinating Entropy via Gradient-Preserving clipping Policy Optimization (Su et al. 2025,
arXiv 2509.20712): bounded gradients from the tokens the PPO clip cuts.

Equations as in the authors' released code (github.com/Kwai-Klear/CE-GPPO: ``README.md``
"Implementation of GPPO" and ``verl/trainer/ppo/core_algos.py``, ``compute_gppo_loss_general_beta``),
the general form of GPPO (the same authors' Klear-Reasoner report, arXiv 2508.07629, App. A.2,
Eq. 17-18; ``paper.pdf`` in that repository). With ``r`` the ratio, ``sg`` the stop-gradient and
``eps_low``, ``eps_high`` the effective clip bounds, the per-token loss is::

    -beta_1 (1 - eps_low)  r / sg(r) A   if r < 1 - eps_low and A < 0   (clip-low region)
    -beta_2 (1 + eps_high) r / sg(r) A   if r > 1 + eps_high and A > 0  (clip-high region)
    the configured (dual-clipped) PPO loss otherwise

``r / sg(r)`` is 1 in the forward pass, so a clipped token keeps the value ``beta`` times its
clipped loss, and its gradient is ``-beta (1 -/+ eps) A grad log pi`` instead of 0: bounded, and not
growing with ``r``. As released, the dual clip still applies to negative advantages: where
``beta_1 (1 - eps_low) > c`` the clip-low value is capped at ``-c A`` (no gradient).

Implemented as a keep mask (the two regions' PPO term is dropped) plus their replacement as a
per-token penalty; ``r / sg(r)`` is computed as ``exp(log pi - sg(log pi))``, exactly 1 forward and
``grad log pi`` backward (the released ratio is not clamped; this avoids the PPO ratio's clamp).
Weights from other interventions (e.g. STEER, STARE) do not scale the replacement, as with KL-Cov.

Strictly on-policy (ratio = 1) no token is clipped and CE-GPPO does nothing: ``uses_ratio = True``.
"""

from __future__ import annotations

import torch

from steer.algo.aggregation import masked_mean
from steer.algo.interventions.base import Intervention, PolicyTokens, PPOTerms


class GradientPreservingClip(Intervention):
    """Give the clipped tokens a gradient of ``beta`` times their clip bound.

    Args:
        beta_low: ``beta_1 >= 0``, for negative-advantage tokens below ``1 - eps_low``.
        beta_high: ``beta_2 >= 0``, for positive-advantage tokens above ``1 + eps_high``.
    """

    name = "ce_gppo"
    uses_ratio = True

    def __init__(self, beta_low: float = 0.5, beta_high: float = 1.0) -> None:
        if not beta_low >= 0.0:
            raise ValueError(f"ce_gppo beta_low (beta_1) must be >= 0, got {beta_low}")
        if not beta_high >= 0.0:
            raise ValueError(f"ce_gppo beta_high (beta_2) must be >= 0, got {beta_high}")
        self.beta_low = float(beta_low)
        self.beta_high = float(beta_high)
        self._regions: tuple[torch.Tensor, torch.Tensor] | None = None
        self._regions_for: PPOTerms | None = None

    def regions(self, tokens: PolicyTokens, ppo: PPOTerms) -> tuple[torch.Tensor, torch.Tensor]:
        """``(low, high)`` ``[B, T]`` bool masks of the valid tokens in the two clipped regions."""
        if self._regions_for is not ppo:  # token_mask and token_penalty of one micro-batch share them
            if ppo.clip is None:
                raise ValueError("ce_gppo needs the clip bounds in PPOTerms.clip (use steer.algo.policy_loss.ppo_token_loss)")
            valid = tokens.mask.bool()
            ratio, advantages = ppo.ratio.detach(), ppo.advantages
            low = valid & (advantages < 0) & (ratio < 1.0 - ppo.clip.low)
            high = valid & (advantages > 0) & (ratio > 1.0 + ppo.clip.high)
            self._regions, self._regions_for = (low, high), ppo
        return self._regions

    def token_mask(
        self, tokens: PolicyTokens, ppo: PPOTerms, metrics: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        low, high = self.regions(tokens, ppo)
        valid = tokens.mask.bool()
        metrics[f"intervention/{self.name}/share_low_preserved"] = masked_mean(low.float(), valid)
        metrics[f"intervention/{self.name}/share_high_preserved"] = masked_mean(high.float(), valid)
        return ~(low | high)

    def token_penalty(
        self, tokens: PolicyTokens, ppo: PPOTerms, metrics: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        low, high = self.regions(tokens, ppo)
        clip, advantages = ppo.clip, ppo.advantages
        logprobs = torch.where(tokens.mask.bool(), tokens.logprobs, torch.zeros_like(tokens.logprobs))  # padding may hold garbage
        unit = torch.exp(logprobs - logprobs.detach())  # r / sg(r): 1, gradient grad log pi
        low_bound = self.beta_low * (1.0 - clip.low)
        low_loss = -low_bound * unit * advantages
        if clip.dual is not None and low_bound > clip.dual:  # released: min(-c A, .) for A < 0
            low_loss = (-clip.dual * advantages).to(low_loss.dtype)
        high_loss = -self.beta_high * (1.0 + clip.high) * unit * advantages
        zero = torch.zeros_like(low_loss)
        return torch.where(low, low_loss, torch.where(high, high_loss, zero))
