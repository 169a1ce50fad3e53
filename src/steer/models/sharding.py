"""Lightning's FSDP strategy for a Hugging Face causal LM, built from a config.

Hydra cannot put a Python class into YAML, so ``conf/trainer/fsdp.yaml`` names the decoder-layer
class by its import path and this factory resolves it: every decoder layer becomes one FSDP unit
(its parameters are gathered only while it runs) and, optionally, an activation-checkpointing unit.
"""

from __future__ import annotations

from hydra.utils import get_class


def fsdp_strategy(
    layer_class: str = "transformers.models.qwen2.modeling_qwen2.Qwen2DecoderLayer",
    sharding_strategy: str = "FULL_SHARD",
    activation_checkpointing: bool = True,
    cpu_offload: bool = False,
    **kwargs,
):
    """A :class:`lightning.pytorch.strategies.FSDPStrategy` wrapping each ``layer_class`` module.

    Args:
        layer_class: import path of the model's decoder layer (Qwen2 by default; Llama/SmolLM2:
            ``transformers.models.llama.modeling_llama.LlamaDecoderLayer``).
        sharding_strategy: ``FULL_SHARD`` (parameters, gradients and optimiser state sharded),
            ``SHARD_GRAD_OP``, ``HYBRID_SHARD`` (full sharding inside a node, replicas across nodes).
        activation_checkpointing: recompute each decoder layer's activations in the backward pass.
        cpu_offload: keep the sharded parameters (and their gradients) in CPU memory.
        kwargs: passed to ``FSDPStrategy`` as they are.
    """
    from lightning.pytorch.strategies import FSDPStrategy

    layer = get_class(layer_class)
    return FSDPStrategy(
        auto_wrap_policy={layer},
        activation_checkpointing_policy={layer} if activation_checkpointing else None,
        sharding_strategy=sharding_strategy,
        cpu_offload=cpu_offload,
        **kwargs,
    )
