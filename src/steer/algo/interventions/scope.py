"""Where a token-selecting intervention takes its statistics from: ``microbatch`` or ``global``.

The released codes of STEER, Clip-Cov and KL-Cov compute their statistics (STEER's normalising
max |Omega|, the covariance means, the top-k and the random draw) over one GPU micro-batch:
``scope: microbatch`` reproduces that. ``scope: global`` computes them once per mini-batch over all
of its micro-batches and over every rank (``torch.distributed``, only when it is initialised), so
the selection no longer depends on the micro-batch size or the number of devices.

Global selections are made in ``begin_minibatch`` on the whole local mini-batch; the micro-batches
that follow take consecutive row slices of it (:class:`RowCursor`). The collectives they use live
in :mod:`steer.distributed`.
"""

from __future__ import annotations

import torch

SCOPES = ("microbatch", "global")
NEEDS_PPO = "needs the PPO terms of the mini-batch: call steer.algo.policy_loss.begin_minibatch"


def check_scope(scope: str) -> str:
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {list(SCOPES)}, got {scope!r}")
    return scope


class RowCursor:
    """Hands out the rows of a mini-batch-level ``[B, T]`` bool selection to its micro-batches: the
    given ``positions`` (micro-batches in another order, e.g. sorted by length), else consecutive slices.

    Micro-batches may be cut to their own length: columns beyond the micro-batch's are left out, and
    columns beyond the mini-batch's ``T`` are padding and come back unselected.
    """

    def __init__(self, selected: torch.Tensor) -> None:
        self.selected = selected
        self.row = 0

    def take(self, rows: int, columns: int, positions: torch.Tensor | None = None) -> torch.Tensor:
        if positions is not None:
            if len(positions) != rows:
                raise RuntimeError(f"scope=global: {len(positions)} row positions for a micro-batch of {rows} rows")
            return self._cut(self.selected[positions.to(self.selected.device)], columns)
        end = self.row + rows
        if end > self.selected.shape[0]:
            raise RuntimeError(
                f"scope=global: a micro-batch asked for rows {self.row}..{end} of a mini-batch with "
                f"{self.selected.shape[0]} rows; micro-batches must be consecutive row slices of the "
                "mini-batch given to begin_minibatch, in order"
            )
        self.row = end
        return self._cut(self.selected[end - rows : end], columns)

    @staticmethod
    def _cut(block: torch.Tensor, columns: int) -> torch.Tensor:
        block = block[:, :columns]
        if block.shape[1] < columns:
            block = torch.nn.functional.pad(block, (0, columns - block.shape[1]), value=False)
        return block


def own_selection(chosen: torch.Tensor, offset: int, flat: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """This rank's part of a selection made over every rank's candidates, as a ``[B, T]`` bool mask.

    Args:
        chosen: indices into the candidates of all ranks, numbered in rank order (one process: its own).
        offset: the number of this rank's first candidate in that numbering.
        flat: this rank's candidates, as positions in ``like.flatten()``.
        like: a ``[B, T]`` tensor of this rank's micro- or mini-batch (its shape and device are used).
    """
    mine = chosen[(chosen >= offset) & (chosen < offset + flat.numel())] - offset
    selected = torch.zeros(like.numel(), dtype=torch.bool, device=like.device)
    selected[flat[mine]] = True
    return selected.view_as(like)
