"""The optimiser's implementation choice: torch's fused AdamW kernel where it applies."""

from __future__ import annotations

from typing import Sequence

import torch

FUSED_ADAMW_DEVICES = ("cpu", "cuda")
"""Device types with a fused AdamW kernel in torch >= 2.4 (one kernel per step over all tensors)."""


def adamw_implementation(parameters: Sequence[torch.Tensor]) -> dict[str, bool]:
    """``fused=True`` for :class:`torch.optim.AdamW` where torch has a fused kernel for these
    parameters (plain float tensors of one device type in :data:`FUSED_ADAMW_DEVICES`), else ``{}``
    (torch's default loop). FSDP's sharded parameters (DTensor) keep the default: the fused kernel
    takes plain tensors only. The same arithmetic as the loop, in one pass over the tensors."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed support
        DTensor = ()
    devices = {p.device.type for p in parameters}
    plain = all(not isinstance(p, DTensor) and p.is_floating_point() for p in parameters)
    if parameters and plain and len(devices) == 1 and devices <= set(FUSED_ADAMW_DEVICES):
        return {"fused": True}
    return {}
