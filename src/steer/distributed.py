"""Small collectives over the data-parallel ranks that Lightning's strategy set up (DDP, FSDP).

Lightning launches the processes and initialises the process group; these helpers only use it.
Without an initialised process group every function is the identity (one process).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


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


def world_size() -> int:
    return dist.get_world_size() if distributed() else 1


def rank() -> int:
    return dist.get_rank() if distributed() else 0


def gather_objects(value: Any) -> list[Any]:
    """Every rank's picklable ``value``, in rank order (``[value]`` in one process)."""
    if not distributed():
        return [value]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def sum_over_ranks(*values: float, device: torch.device | str = "cpu") -> list[float]:
    """Sums of the given scalars over all ranks (float64, one collective)."""
    total = all_reduce(torch.tensor(values, dtype=torch.float64, device=device), "sum")
    return [float(v) for v in total.tolist()]


def min_over_ranks(value: int, device: torch.device | str = "cpu") -> int:
    return int(all_reduce(torch.tensor([value], dtype=torch.int64, device=device), "min").item())
