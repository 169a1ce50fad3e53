"""Turning a ``[B, T]`` per-token loss into one scalar: the single owner of every normalisation.

With gradient accumulation and data parallelism one mini-batch is split into micro-batches and
over ranks. The denominators below are therefore passed in as *mini-batch totals over all ranks*,
so that summing the aggregated micro-batch losses of every rank gives exactly the aggregate of the
whole mini-batch, whatever the split. Data-parallel strategies (DDP, FSDP) *average* the ranks'
gradients, so each rank's loss is also multiplied by ``data_parallel_size``: the average of the
ranks' gradients is then the sum, the gradient of the global loss (verl's ``agg_loss`` does the
same). Modes follow the names used by verl and the Dr. GRPO paper (arXiv 2503.20783).
"""

from __future__ import annotations

import torch

AGGREGATION_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")


def aggregate(
    values: torch.Tensor,
    mask: torch.Tensor,
    mode: str = "token-mean",
    *,
    total_tokens: float | None = None,
    total_sequences: float | None = None,
    max_response_length: int | None = None,
    data_parallel_size: int = 1,
) -> torch.Tensor:
    """Aggregate per-token ``values`` ``[B, T]`` over valid tokens (``mask`` ``[B, T]``).

    Modes:
        ``token-mean``: ``sum(values) / total_tokens`` (every token weighs the same; DAPO).
        ``seq-mean-token-mean``: ``sum_i mean_t(values_i) / total_sequences`` (original GRPO).
        ``seq-mean-token-sum``: ``sum_i sum_t(values_i) / total_sequences``.
        ``seq-mean-token-sum-norm``: ``sum(values) / (total_sequences * max_response_length)``,
            a constant denominator (Dr. GRPO).

    ``total_tokens`` / ``total_sequences`` default to this batch's own counts; the result is
    multiplied by ``data_parallel_size`` (the ranks whose gradients the strategy averages).
    """
    return data_parallel_size * _aggregate(values, mask, mode, total_tokens, total_sequences, max_response_length)


def _aggregate(values, mask, mode, total_tokens, total_sequences, max_response_length) -> torch.Tensor:
    mask = mask.to(values.dtype)
    masked = values * mask
    if total_sequences is None:
        total_sequences = float(values.shape[0])
    if mode == "token-mean":
        denominator = mask.sum().item() if total_tokens is None else total_tokens
        return masked.sum() / max(denominator, 1.0)
    if mode == "seq-mean-token-mean":
        per_sequence = masked.sum(-1) / mask.sum(-1).clamp(min=1.0)
        return per_sequence.sum() / total_sequences
    if mode == "seq-mean-token-sum":
        return masked.sum() / total_sequences
    if mode == "seq-mean-token-sum-norm":
        length = values.shape[-1] if max_response_length is None else max_response_length
        return masked.sum() / (total_sequences * length)
    raise ValueError(f"unknown loss aggregation {mode!r}; valid: {list(AGGREGATION_MODES)}")


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` over ``mask`` (0 when the mask is empty)."""
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1.0)
