"""Small collectives over the data-parallel ranks that Lightning's strategy set up (DDP, FSDP).

Lightning launches the processes and initialises the process group; these helpers only use it.
Without an initialised process group every function is the identity (one process).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from steer.knobs import ConfigError


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


def max_over_ranks(value: int, device: torch.device | str = "cpu") -> int:
    return int(all_reduce(torch.tensor([value], dtype=torch.int64, device=device), "max").item())


def configured_ranks(trainer: Any) -> int | None:
    """``devices x num_nodes`` of a trainer config, or None when ``devices`` is ``auto`` / ``-1``."""
    devices = trainer.get("devices", 1) if trainer is not None else 1
    nodes = int(trainer.get("num_nodes", 1) or 1) if trainer is not None else 1
    if isinstance(devices, str) and devices.strip().lstrip("-").isdigit():
        devices = int(devices)
    if isinstance(devices, int) and devices > 0:
        return devices * nodes
    if OmegaConf.is_list(devices) or isinstance(devices, (list, tuple)):
        return len(devices) * nodes
    return None


def check_world_size(algorithm: Any, ranks: int) -> None:
    """Each rank takes ``minibatch_prompts / ranks`` whole prompts of every mini-batch (the batch
    knobs are global), so the number of ranks must divide ``minibatch_prompts``."""
    if ranks <= 1:
        return
    if algorithm.minibatch_prompts % ranks:
        raise ConfigError(
            f"algorithm.minibatch_prompts={algorithm.minibatch_prompts} (global: all ranks together) must be "
            f"divisible by the {ranks} data-parallel ranks (trainer.devices x trainer.num_nodes): each rank "
            "takes an equal share of whole prompts of every mini-batch"
        )
    sequences = algorithm.minibatch_prompts // ranks * algorithm.n
    if algorithm.micro_batch_size is not None and sequences % algorithm.micro_batch_size:
        raise ConfigError(
            f"algorithm.micro_batch_size={algorithm.micro_batch_size} must divide each rank's share of a "
            f"mini-batch: minibatch_prompts / ranks * n = {algorithm.minibatch_prompts} / {ranks} * {algorithm.n} "
            f"= {sequences} sequences"
        )


def _global_scope_components(cfg: DictConfig) -> list[str]:
    components = (cfg.get("intervention") or {}).get("components") or {}
    return [f"intervention.components.{key}" for key, spec in components.items() if spec and spec.get("scope") == "global"]


def _in_hydra_sweep() -> bool:
    try:
        from hydra.core.hydra_config import HydraConfig

        mode = HydraConfig.get().mode
    except (ImportError, ValueError):  # composed without @hydra.main
        return False
    return mode is not None and mode.name == "MULTIRUN"


def check_data_parallel(cfg: DictConfig, algorithm: Any, environ: Any = None) -> None:
    """Start-up checks of a multi-process run: rank divisibility, a sweep over several ranks, and
    processes that a launcher started without a data-parallel trainer (no process group would
    join them). FSDP's own needs are :func:`steer.models.sharding.check_fsdp`'s."""
    import os

    environ = os.environ if environ is None else environ
    trainer = cfg.get("trainer")
    ranks = configured_ranks(trainer)
    if ranks is not None:
        check_world_size(algorithm, ranks)
    if ranks is not None and ranks > 1 and _in_hydra_sweep():
        raise ConfigError(
            f"a sweep (-m) with {ranks} data-parallel ranks (trainer.devices x trainer.num_nodes): Lightning starts "
            "the other ranks by re-running the command, which cannot re-enter a Hydra sweep; run one command per "
            "sweep point (README: Several GPUs and nodes)"
        )
    launched = int(environ.get("WORLD_SIZE", "1") or 1)
    if launched > 1 and ranks == 1:
        scoped = _global_scope_components(cfg)
        detail = (f"; {', '.join(scoped)} has scope: global, which needs a process group over all ranks" if scoped else "")
        raise ConfigError(
            f"the launcher started WORLD_SIZE={launched} processes but trainer.devices x trainer.num_nodes = 1, "
            f"so no process group joins them and each would train alone on the same prompts{detail}; "
            f"use trainer=ddp trainer.devices=<processes per node> trainer.num_nodes=<nodes>"
        )
