"""Rollout/trainer mismatch: how far the sampler's log-probs are from the trainer's, and a correction.

A rollout engine other than the training model itself (vLLM, with its own kernels, precision and
weight copy) samples from ``pi_sampler``, while the loss is built from ``pi_train`` — the trainer's
log-probs of the same tokens under the same weights, computed before the update (``old_logprobs``).
The two differ, so "on-policy" RL is silently off-policy (Yao, Liu, Zhang, Dong, Shang, Gao 2025,
"Your Efficient RL Framework Secretly Brings You Off-Policy RL Training", blog note, Aug. 2025).
With ``d = log pi_train - log pi_sampler`` per sampled token:

- ``token_tis`` — truncated importance sampling: every token's PPO loss is multiplied by the
  no-grad weight ``w = min(exp(d), cap)`` (the truncated importance weight of V-trace, Espeholt
  et al. 2018, IMPALA, arXiv 1802.01561; the cap as in Yao et al. 2025, who use 2).
- ``seq_mask`` — drop whole responses whose mean ``|d|`` over their tokens exceeds ``threshold``
  (in nats): a sequence-level rejection of rollouts the trainer would not have sampled, as in
  the sequence-level masking variants that verl and Yao et al. offer.

For the Hugging Face engine ``pi_sampler`` *is* the policy, so ``d ~ 0`` (float round-off) and
both corrections do nothing; with ``top_p < 1`` the sampler's renormalised nucleus makes ``d < 0``
on purpose (the trainer scores the full temperature-scaled distribution).

Everything here is computed in float64 without gradient: the weights are constants of the loss.
"""

from __future__ import annotations

import torch

from steer.algo.interventions.base import Intervention, PolicyTokens, PPOTerms

ROLLOUT_CORRECTIONS = ("none", "token_tis", "seq_mask")


def log_mismatch(train_logprobs: torch.Tensor, sampler_logprobs: torch.Tensor) -> torch.Tensor:
    """``d = log pi_train - log pi_sampler`` per token ``[B, T]``, float64, no gradient."""
    with torch.no_grad():
        return train_logprobs.double() - sampler_logprobs.double()


def truncated_importance_weights(
    train_logprobs: torch.Tensor, sampler_logprobs: torch.Tensor, cap: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Truncated importance weights ``min(pi_train / pi_sampler, cap)``.

    Args:
        train_logprobs: ``[B, T]`` log pi_train of the sampled tokens (the trainer, before the update).
        sampler_logprobs: ``[B, T]`` log pi_sampler, as the rollout engine reported them.
        cap: the truncation level, > 0.

    Returns:
        ``(weights, truncated)``: float64 weights ``[B, T]`` and a bool ``[B, T]`` that is True where
        the cap cut the weight. The log-ratio is clamped to +-20 first so that ``exp`` stays finite.
    """
    d = log_mismatch(train_logprobs, sampler_logprobs).clamp(-20.0, 20.0)
    ratio = torch.exp(d)
    return ratio.clamp(max=cap), ratio > cap


def sequence_mismatch(train_logprobs: torch.Tensor, sampler_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean ``|log pi_train - log pi_sampler|`` over each response's tokens: ``[B]`` float64 (0 for empty rows)."""
    d = log_mismatch(train_logprobs, sampler_logprobs).abs() * mask
    return d.sum(-1) / mask.sum(-1).clamp(min=1)


def mismatch_keep_mask(
    train_logprobs: torch.Tensor, sampler_logprobs: torch.Tensor, mask: torch.Tensor, threshold: float
) -> torch.Tensor:
    """Bool ``[B, T]``: True for every token of a response whose :func:`sequence_mismatch` is ``<= threshold``."""
    keep = sequence_mismatch(train_logprobs, sampler_logprobs, mask) <= threshold
    return keep[:, None].expand_as(mask)


def mismatch_statistics(train_logprobs: torch.Tensor, sampler_logprobs: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """Step-level mismatch metrics over the valid tokens ``mask`` (``[B, T]``).

    Returns ``rollout/mismatch_abs_mean`` and ``rollout/mismatch_abs_max`` (token mean and max of
    ``|d|``), ``rollout/mismatch_mean`` (signed token mean of ``d``), and
    ``rollout/mismatch_seq_abs_max`` (the largest per-response mean ``|d|``: what ``seq_mask`` compares
    with its threshold).
    """
    mask = mask.bool()
    d = log_mismatch(train_logprobs, sampler_logprobs)[mask]
    if d.numel() == 0:
        return {key: 0.0 for key in ("rollout/mismatch_abs_mean", "rollout/mismatch_abs_max", "rollout/mismatch_mean", "rollout/mismatch_seq_abs_max")}
    return {
        "rollout/mismatch_abs_mean": d.abs().mean().item(),
        "rollout/mismatch_abs_max": d.abs().max().item(),
        "rollout/mismatch_mean": d.mean().item(),
        "rollout/mismatch_seq_abs_max": sequence_mismatch(train_logprobs, sampler_logprobs, mask).max().item(),
    }


class RolloutCorrection(Intervention):
    """The correction as a loss hook: a no-grad token weight (``token_tis``) or a keep mask (``seq_mask``).

    :func:`steer.algo.interventions.assemble_interventions` appends it when
    ``algorithm.rollout_correction != none``; it reads
    ``tokens.old_logprobs`` (pi_train) and ``tokens.sampler_logprobs`` (pi_sampler).
    """

    name = "rollout_correction"

    def __init__(self, mode: str, cap: float = 2.0, threshold: float = 0.1) -> None:
        if mode not in ROLLOUT_CORRECTIONS:
            raise ValueError(f"algorithm.rollout_correction must be one of {list(ROLLOUT_CORRECTIONS)}, got {mode!r}")
        if not cap > 0:
            raise ValueError(f"algorithm.rollout_correction_cap must be > 0, got {cap}")
        if not threshold >= 0:
            raise ValueError(f"algorithm.rollout_correction_threshold must be >= 0, got {threshold}")
        self.mode, self.cap, self.threshold = mode, cap, threshold

    @staticmethod
    def _sampler_logprobs(tokens: PolicyTokens) -> torch.Tensor:
        if tokens.sampler_logprobs is None:
            raise RuntimeError("the rollout correction needs the sampler's log-probs, but PolicyTokens has none")
        return tokens.sampler_logprobs

    def token_weights(self, tokens: PolicyTokens, ppo: PPOTerms, metrics: dict[str, torch.Tensor]) -> torch.Tensor | None:
        if self.mode != "token_tis":
            return None
        weights, truncated = truncated_importance_weights(tokens.old_logprobs, self._sampler_logprobs(tokens), self.cap)
        mask = tokens.mask.double()
        count = mask.sum().clamp(min=1.0)
        metrics["rollout/correction_truncated_share"] = (truncated.double() * mask).sum() / count
        metrics["rollout/correction_weight_mean"] = (weights * mask).sum() / count
        return weights.to(ppo.loss.dtype)

    def token_mask(self, tokens: PolicyTokens, ppo: PPOTerms, metrics: dict[str, torch.Tensor]) -> torch.Tensor | None:
        if self.mode != "seq_mask":
            return None
        keep = mismatch_keep_mask(tokens.old_logprobs, self._sampler_logprobs(tokens), tokens.mask, self.threshold)
        mask = tokens.mask.double()
        metrics["rollout/correction_masked_share"] = ((~keep).double() * mask).sum() / mask.sum().clamp(min=1.0)
        return keep
