"""The per-token PPO surrogate with dual clip, and the policy loss with entropy interventions.

Reading order: :func:`ppo_token_loss` is the textbook objective; :func:`policy_loss` applies the
intervention hooks around it (see :mod:`steer.algo.interventions.base`) and aggregates.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from steer.algo.aggregation import aggregate, masked_mean
from steer.algo.interventions.base import ClipConfig, Intervention, PolicyTokens, PPOTerms


def ppo_token_loss(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, clip: ClipConfig
) -> PPOTerms:
    """Dual-clipped PPO surrogate per token (Schulman et al. 2017; dual clip: Ye et al. 2020).

    Args:
        logprobs: ``[B, T]`` log pi_theta of the sampled tokens (carries gradient).
        old_logprobs: ``[B, T]`` log pi_old (no gradient).
        advantages: ``[B, T]`` per-token advantages.

    Returns:
        :class:`PPOTerms` with, per token, ``loss = max(-A r, -A clip(r, 1-low, 1+high))``,
        further capped at ``-A c`` where ``A < 0`` (dual clip).
    """
    log_ratio = (logprobs - old_logprobs).clamp(-20.0, 20.0)  # keeps exp() finite on wild tokens
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip.low, 1.0 + clip.high)
    loss = torch.maximum(unclipped, clipped)
    clipped_any = clipped > unclipped
    dual = torch.zeros_like(clipped_any)
    if clip.dual is not None:
        cap = -advantages * clip.dual
        dual = (advantages < 0) & (loss > cap)
        loss = torch.where(dual, cap, loss)
    return PPOTerms(
        ratio=ratio,
        advantages=advantages,
        unclipped_loss=unclipped,
        loss=loss,
        clipped_low=clipped_any & (advantages < 0),
        clipped_high=clipped_any & (advantages > 0),
        clipped_dual=dual,
        clip=clip,
    )


@dataclass
class LossTotals:
    """Mini-batch totals used as aggregation denominators (see :func:`steer.algo.aggregation.aggregate`).

    Under data parallelism ``tokens`` and ``sequences`` are the totals over *all* ranks (the caller
    reduces them), and ``data_parallel_size`` is the number of ranks whose gradients the strategy
    averages: the rank's loss is multiplied by it, so that the averaged gradient is the gradient
    of the global mini-batch loss, whatever the number of ranks.
    """

    tokens: float
    sequences: float
    max_response_length: int
    data_parallel_size: int = 1


def effective_clip(clip: ClipConfig, interventions: Sequence[Intervention]) -> ClipConfig:
    """The clip bounds after every intervention's ``adjust_clip``, in order."""
    for intervention in interventions:
        clip = intervention.adjust_clip(clip)
    return clip


def apply_pre_loss_hooks(
    tokens: PolicyTokens,
    clip: ClipConfig,
    interventions: Sequence[Intervention],
    metrics: dict[str, torch.Tensor],
) -> tuple[ClipConfig, torch.Tensor]:
    """The hooks that run before the PPO terms: every ``adjust_clip``, then every
    ``transform_advantages`` (which may write into ``metrics``), each in order.

    Returns ``(clip, advantages)``: the effective clip bounds and the ``[B, T]`` advantages the loss uses.
    """
    clip = effective_clip(clip, interventions)
    advantages = tokens.advantages
    for intervention in interventions:
        advantages = intervention.transform_advantages(advantages, tokens, metrics)
    return clip, advantages


def begin_minibatch(
    tokens: PolicyTokens, clip: ClipConfig, interventions: Sequence[Intervention] = ()
) -> None:
    """Show the whole mini-batch (no gradient) to every intervention with ``scope: global``.

    Call once per mini-batch, before its micro-batches, with the mini-batch's tensors ``[B, T]``.
    Applies the same clip and advantage hooks as :func:`policy_loss` (:func:`apply_pre_loss_hooks`), so
    that statistics such as STEER's normalising max or Clip-Cov's candidate set see the quantities the
    loss will use.
    """
    active = [intervention for intervention in interventions if intervention.needs_minibatch_pass]
    if not active:
        return
    with torch.no_grad():
        clip, advantages = apply_pre_loss_hooks(tokens, clip, interventions, {})
        ppo = ppo_token_loss(tokens.logprobs, tokens.old_logprobs, advantages, clip)
        for intervention in active:
            intervention.begin_minibatch(tokens, ppo)


def policy_loss(
    tokens: PolicyTokens,
    clip: ClipConfig,
    interventions: Sequence[Intervention] = (),
    aggregation: str = "token-mean",
    totals: LossTotals | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Policy-gradient loss of one micro-batch with every intervention's hooks applied in order.

    Per token: ``keep * weight * ppo_loss + penalty``, where the advantage, the clip bounds, the
    (no-grad) weight, the keep mask and the penalty (which may carry gradient) come from the
    interventions, then one :func:`aggregate` call with the mini-batch denominators.

    Returns:
        ``(loss, metrics)``: a scalar to backpropagate and detached per-micro-batch statistics.
    """
    metrics: dict[str, torch.Tensor] = {}
    clip, advantages = apply_pre_loss_hooks(tokens, clip, interventions, metrics)
    ppo = ppo_token_loss(tokens.logprobs, tokens.old_logprobs, advantages, clip)

    mask = tokens.mask
    weight = torch.ones_like(ppo.loss)
    keep = torch.ones_like(mask)
    penalty = torch.zeros_like(ppo.loss)
    for intervention in interventions:
        token_weight = intervention.token_weights(tokens, ppo, metrics)
        if token_weight is not None:
            weight = weight * token_weight.detach()
        token_keep = intervention.token_mask(tokens, ppo, metrics)
        if token_keep is not None:
            keep = keep & token_keep
        token_penalty = intervention.token_penalty(tokens, ppo, metrics)
        if token_penalty is not None:
            penalty = penalty + token_penalty

    per_token = keep.to(ppo.loss.dtype) * weight * ppo.loss + penalty
    if totals is None:
        totals = LossTotals(mask.sum().item(), float(mask.shape[0]), mask.shape[-1])
    loss = aggregate(
        per_token,
        mask,
        aggregation,
        total_tokens=totals.tokens,
        total_sequences=totals.sequences,
        max_response_length=totals.max_response_length,
        data_parallel_size=totals.data_parallel_size,
    )
    with torch.no_grad():
        metrics.update(
            {
                "actor/clipfrac_low": masked_mean(ppo.clipped_low.float(), mask),
                "actor/clipfrac_high": masked_mean(ppo.clipped_high.float(), mask),
                "actor/clipfrac_dual": masked_mean(ppo.clipped_dual.float(), mask),
                # k3 estimator of KL(pi_old || pi_theta) (Schulman 2020), a drift monitor only.
                "actor/approx_kl_old": masked_mean(ppo.ratio - 1 - torch.log(ppo.ratio), mask),
                "actor/ratio_mean": masked_mean(ppo.ratio, mask),
                "actor/pg_loss": aggregate(ppo.loss.detach(), mask, "token-mean"),
            }
        )
    return loss, metrics
