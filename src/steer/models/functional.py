"""Which models our hand-applied decoder layers reproduce exactly: the rollout's
:class:`steer.rollout.decode.FunctionalDecoder` and the training forward of
:mod:`steer.algo.packed_shared` apply a decoder layer's own modules by hand, which is only the
model's forward for the layer structure below; and the rotary embedding both apply."""

from __future__ import annotations

import torch

FUNCTIONAL_MODEL_TYPES = ("qwen2", "llama")
"""Architectures whose decoder layer is exactly: x + o(attn(rope(q(n1(x))), rope(k(.)), v(.))), then
x + mlp(n2(x)), with RMSNorm modules and no sliding window."""


def supports_functional(model: torch.nn.Module) -> bool:
    """Whether the hand-applied decoder layers reproduce ``model``'s forward exactly."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "model_type", None) not in FUNCTIONAL_MODEL_TYPES:
        return False
    if any(t != "full_attention" for t in (getattr(config, "layer_types", None) or [])):
        return False
    backbone = getattr(model, "model", None)
    if backbone is None or not hasattr(backbone, "rotary_emb") or not hasattr(backbone, "layers"):
        return False
    # Sharded parameters (FSDP2 DTensors) are only gathered by the layers' own forward hooks,
    # which the hand-applied layers bypass.
    if any(type(p).__name__ == "DTensor" for p in model.parameters()):
        return False
    attention = backbone.layers[0].self_attn
    # Variants with extra normalisation inside attention (e.g. Qwen3's q_norm) are not covered.
    return not any(hasattr(attention, name) for name in ("q_norm", "k_norm"))


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding of ``x [..., head dim]`` with tables that broadcast to it, in the
    half-split layout of the Qwen2/Llama modelling code: ``x cos + rotate_half(x) sin``."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin
