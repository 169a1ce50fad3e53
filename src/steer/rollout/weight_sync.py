"""The policy's full weights, one bounded bucket at a time: what a rollout engine is loaded with.

Under FSDP every rank holds a shard of each parameter (a ``DTensor``). An engine needs whole tensors,
so each one is gathered (``DTensor.full_tensor()``, a collective: every rank walks the same
``state_dict`` in the same order) after casting its shard to the engine's dtype, which halves the
bytes sent and held for a float32 master and a bfloat16 engine. Tensors are handed over in buckets
of at most ``bucket_bytes``, so no rank ever holds more than one bucket of gathered weights next to
its shards, never a second copy of the model. A plain (unsharded) policy goes through the same path
without the gather.

A bucket never splits one decoder layer (``...layers.<i>.``): vLLM loads a layer's query/key/value
and gate/up projections into fused parameters and, when reloading in place, materialises a layer
whose fused inputs arrive in separate calls with uninitialised values (measured: NaN log-probs). So
the unit of a bucket is a whole decoder layer, or one tensor outside the layers (embeddings, final
norm, head); a unit larger than ``bucket_bytes`` is a bucket of its own.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterator

import torch

_LAYER = re.compile(r"^(.*\.layers\.\d+)\.")


def weight_unit(name: str) -> str:
    """The unit a tensor is loaded with: its decoder layer's prefix, or its own name."""
    match = _LAYER.match(name)
    return match.group(1) if match else name


@dataclass
class SyncStats:
    """What one weight sync moved. ``peak_bytes``: the most bytes of gathered tensors held at once."""

    tensors: int = 0
    buckets: int = 0
    total_bytes: int = 0
    peak_bytes: int = 0


def full_tensor(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``tensor`` whole and in ``dtype``: an FSDP shard is cast locally, then gathered from every rank."""
    tensor = tensor.detach()
    if hasattr(tensor, "full_tensor"):  # a DTensor (FSDP2 shard)
        return tensor.to(dtype).full_tensor()
    return tensor.to(dtype)


def weight_buckets(
    state: dict[str, torch.Tensor], dtype: torch.dtype, bucket_bytes: int, stats: SyncStats | None = None
) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """``state``'s tensors, whole and in ``dtype``, as buckets of whole units (see the module docstring).

    Each bucket is gathered only when the previous one has been handed over (the caller drops its
    references before asking for the next), so ``stats.peak_bytes`` is the largest bucket.
    """
    if bucket_bytes <= 0:
        raise ValueError(f"rollout.engine.sync_bucket_bytes must be > 0, got {bucket_bytes}")
    stats = stats if stats is not None else SyncStats()
    itemsize = torch.empty((), dtype=dtype).element_size()
    units: list[list[str]] = []
    for name in state:
        if units and weight_unit(units[-1][-1]) == weight_unit(name):
            units[-1].append(name)
        else:
            units.append([name])
    bucket: list[str] = []
    size = 0
    for unit in units:
        unit_bytes = sum(state[name].numel() for name in unit) * itemsize
        if bucket and size + unit_bytes > bucket_bytes:
            yield _gather(state, bucket, dtype, stats)
            bucket, size = [], 0
        bucket.extend(unit)
        size += unit_bytes
    if bucket:
        yield _gather(state, bucket, dtype, stats)


def _gather(state, names, dtype, stats: SyncStats) -> list[tuple[str, torch.Tensor]]:
    pairs = [(name, full_tensor(state[name], dtype)) for name in names]
    held = sum(tensor.numel() * tensor.element_size() for _, tensor in pairs)
    stats.tensors += len(pairs)
    stats.buckets += 1
    stats.total_bytes += held
    stats.peak_bytes = max(stats.peak_bytes, held)
    return pairs
