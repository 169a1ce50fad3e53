"""Small collectives over the data-parallel ranks that Lightning's strategy set up (DDP, FSDP).

Lightning launches the processes and initialises the process group; these helpers only use it.
Without an initialised process group every function is the identity (one process).
Tensor reductions for token selections live in :mod:`steer.algo.interventions.scope`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from steer.algo.interventions.scope import all_reduce, distributed


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
