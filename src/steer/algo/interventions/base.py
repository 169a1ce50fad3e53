"""The intervention interface: every entropy intervention acts on the policy loss through these hooks.

The trainer and :func:`steer.algo.policy_loss.policy_loss` call every hook of every configured
intervention, in order, and never look at an intervention's name. The per-token loss is::

    keep * weight * ppo_loss(advantages, clip) + penalty

Hook (default: no change)           used by
----------------------------------  ----------------------------------------------------------
``adjust_clip``                     clip-higher, the extreme clip setting
``transform_advantages``            entropy-aware advantage
``token_weights`` (no gradient)     STEER, W-REINFORCE
``token_mask`` (tokens to keep)     Clip-Cov, fork tokens (80/20)
``token_penalty`` (with gradient)   entropy bonus, KL-Cov, KL to the reference model
``begin_minibatch``                 statistics over a whole mini-batch (``scope: global``)
``after_rl_step`` + state           controllers, e.g. an adaptive entropy coefficient

Hooks write detached statistics into the ``metrics`` dict they receive, under keys
``intervention/<name>/<what>``; one key has one meaning.

This module also holds the types the hooks exchange with the loss (:class:`ClipConfig`,
:class:`PolicyTokens`, :class:`PPOTerms`), so that the loss and every intervention import them from
here and neither imports the other's module.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch


@dataclass(frozen=True)
class ClipConfig:
    """PPO clip bounds: the ratio is clipped to ``[1 - low, 1 + high]``.

    ``dual`` is the dual-clip constant c > 1 of Ye et al. 2020 (arXiv 1912.09729): for negative
    advantages the loss is capped at ``-A * c`` so one token with a huge ratio cannot dominate.
    ``None`` disables it.
    """

    low: float = 0.2
    high: float = 0.2
    dual: float | None = 3.0

    def __post_init__(self) -> None:
        if self.low < 0 or self.high < 0:
            raise ValueError(f"clip ratios must be >= 0, got low={self.low}, high={self.high}")
        if self.dual is not None and self.dual <= 1.0:
            raise ValueError(f"the dual-clip constant must be > 1 (or null to disable), got {self.dual}")

    def with_bounds(self, low: float | None = None, high: float | None = None) -> "ClipConfig":
        return replace(self, low=self.low if low is None else low, high=self.high if high is None else high)


@dataclass
class PolicyTokens:
    """One micro-batch of response tokens, every tensor ``[B, T]``."""

    logprobs: torch.Tensor
    """log pi_theta of the sampled tokens, from the current forward pass (carries gradient)."""
    entropy: torch.Tensor
    """Entropy of pi_theta at each position, current forward pass (carries gradient)."""
    old_logprobs: torch.Tensor
    """log pi_old: the policy that the advantages belong to, computed before the update (no gradient)."""
    old_entropy: torch.Tensor
    """Entropy of pi_old at each position (no gradient)."""
    advantages: torch.Tensor
    """Per-token advantages (the response's advantage broadcast over its tokens)."""
    mask: torch.Tensor
    """Bool, True on real response tokens."""
    ref_logprobs: torch.Tensor | None = None
    """log pi_ref of the reference model, when one is loaded."""
    sampler_logprobs: torch.Tensor | None = None
    """log-probs the rollout engine reported for the sampled tokens (the distribution it sampled
    from); the rollout correction compares them with ``old_logprobs``."""
    minibatch_rows: torch.Tensor | None = None
    """``[B]`` positions of these rows in the mini-batch given to ``begin_minibatch`` (``scope: global``
    selections hand them out); None: the rows that follow the previous micro-batch's."""


@dataclass
class PPOTerms:
    """The per-token PPO quantities an intervention may read, every tensor ``[B, T]``."""

    ratio: torch.Tensor
    advantages: torch.Tensor
    unclipped_loss: torch.Tensor
    """``-A * r``."""
    loss: torch.Tensor
    """The dual-clipped surrogate loss."""
    clipped_low: torch.Tensor
    clipped_high: torch.Tensor
    clipped_dual: torch.Tensor
    clip: ClipConfig | None = None
    """The effective clip bounds these terms were computed with (after every ``adjust_clip``)."""

    @property
    def clipped(self) -> torch.Tensor:
        """Bool: the token's gradient is cut by one of the clips."""
        return self.clipped_low | self.clipped_high | self.clipped_dual


class Intervention:
    """Base class: an intervention that changes nothing. Subclasses override the hooks they need."""

    name: str = "none"
    uses_ratio: bool = False
    """True when the intervention can only act through ``ratio != 1`` (clip-based methods); the
    trainer warns when the update is strictly on-policy and such an intervention is inert."""

    def adjust_clip(self, clip: ClipConfig) -> ClipConfig:
        return clip

    def transform_advantages(
        self, advantages: torch.Tensor, tokens: PolicyTokens, metrics: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        return advantages

    def token_weights(
        self, tokens: PolicyTokens, ppo: PPOTerms, metrics: dict[str, torch.Tensor]
    ) -> torch.Tensor | None:
        return None

    def token_mask(
        self, tokens: PolicyTokens, ppo: PPOTerms, metrics: dict[str, torch.Tensor]
    ) -> torch.Tensor | None:
        return None

    def token_penalty(
        self, tokens: PolicyTokens, ppo: PPOTerms, metrics: dict[str, torch.Tensor]
    ) -> torch.Tensor | None:
        return None

    def begin_minibatch(self, tokens: PolicyTokens, ppo: PPOTerms | None = None) -> None:
        """Called once per mini-batch with no-grad tensors of the *whole* mini-batch (all
        micro-batches), before its micro-batches, only when :attr:`needs_minibatch_pass`.

        ``ppo`` holds the PPO terms of the whole mini-batch under the effective clip bounds and
        transformed advantages; :func:`steer.algo.policy_loss.begin_minibatch` computes it. The
        micro-batches that follow must be consecutive row slices of ``tokens``, in order.
        """

    @property
    def needs_minibatch_pass(self) -> bool:
        return False

    def after_rl_step(self, metrics: dict[str, float]) -> None:
        """Update controller state from the step's reduced metrics (e.g. ``actor/entropy``)."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass
