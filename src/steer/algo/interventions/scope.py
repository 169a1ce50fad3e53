"""Where a token-selecting intervention takes its statistics from: ``microbatch`` or ``global``.

The released codes of STEER, Clip-Cov and KL-Cov compute their statistics (STEER's normalising
max |Omega|, the covariance means, the top-k and the random draw) over one GPU micro-batch:
``scope: microbatch`` reproduces that. ``scope: global`` computes them once per mini-batch over all
of its micro-batches and over every rank (``torch.distributed``, only when it is initialised), so
the selection no longer depends on the micro-batch size or the number of devices.

Global selections are made in ``begin_minibatch`` on the whole local mini-batch; the micro-batches
that follow take consecutive row slices of it (:class:`RowCursor`).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

SCOPES = ("microbatch", "global")
NEEDS_PPO = "needs the PPO terms of the mini-batch: call steer.algo.policy_loss.begin_minibatch"


def check_scope(scope: str) -> str:
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {list(SCOPES)}, got {scope!r}")
    return scope


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def all_reduce(value: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """Reduce a tensor over all ranks (``op``: sum, max or min); a copy when not distributed."""
    value = value.clone()
    if distributed():
        dist.all_reduce(value, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}[op])
    return value


def all_gather_1d(values: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Concatenate a 1-D tensor of any length over ranks, in rank order.

    Returns:
        ``(gathered, offset)``: all ranks' values, and where this rank's values start in them.
    """
    if not distributed():
        return values, 0
    world = dist.get_world_size()
    length = torch.tensor([values.numel()], device=values.device)
    lengths = [torch.zeros_like(length) for _ in range(world)]
    dist.all_gather(lengths, length)
    sizes = [int(n.item()) for n in lengths]
    padded = torch.zeros(max(sizes), dtype=values.dtype, device=values.device)
    padded[: values.numel()] = values
    chunks = [torch.zeros_like(padded) for _ in range(world)]
    dist.all_gather(chunks, padded)
    gathered = torch.cat([chunk[:size] for chunk, size in zip(chunks, sizes)])
    return gathered, sum(sizes[: dist.get_rank()])


class RowCursor:
    """Hands out consecutive row slices of a mini-batch-level ``[B, T]`` bool selection.

    Micro-batches may be padded to their own length: columns beyond the mini-batch's ``T`` are
    padding and come back unselected.
    """

    def __init__(self, selected: torch.Tensor) -> None:
        self.selected = selected
        self.row = 0

    def take(self, rows: int, columns: int) -> torch.Tensor:
        end = self.row + rows
        if end > self.selected.shape[0]:
            raise RuntimeError(
                f"scope=global: a micro-batch asked for rows {self.row}..{end} of a mini-batch with "
                f"{self.selected.shape[0]} rows; micro-batches must be consecutive row slices of the "
                "mini-batch given to begin_minibatch, in order"
            )
        block = self.selected[self.row : end, :columns]
        if block.shape[1] < columns:
            block = torch.nn.functional.pad(block, (0, columns - block.shape[1]), value=False)
        self.row = end
        return block
