"""Fully sharded data parallelism (FSDP2, ``torch.distributed.fsdp.fully_shard``) through Lightning's
:class:`~lightning.pytorch.strategies.ModelParallelStrategy`.

Why not Lightning's ``FSDPStrategy`` (FSDP1): it wraps the whole LightningModule and runs
``training_step`` inside the root FSDP forward, so a ``manual_backward`` inside the step (we make
several optimiser steps per RL step) trips FSDP1's state checks (Lightning issues #19626, #19685),
and generating outside that forward sees sharded weights. FSDP2 shards the policy's own modules in
place (``configure_model``): every forward gathers a decoder layer's parameters just for that
layer, every backward reduce-scatters (averages) its gradients, any number of times per step.

Hydra cannot put a Python class into YAML, so the decoder-layer class is named by import path.
"""

from __future__ import annotations

import torch
from hydra.utils import get_class
from lightning.pytorch.strategies import ModelParallelStrategy
from omegaconf import DictConfig, OmegaConf

from steer.knobs import ConfigError

MIXED_PRECISION = {None: None, "float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}
"""``trainer.strategy.mixed_precision`` (by default ``model.compute_dtype``) -> the compute dtype FSDP
gathers the float32 shards in; None keeps the parameters' dtype. ``auto`` (:data:`MIXED_PRECISION_CHOICES`)
becomes one of these on the device (:func:`steer.models.precision.resolve_compute_dtype`)."""
MIXED_PRECISION_CHOICES = (*MIXED_PRECISION, "auto")


class FullyShardedStrategy(ModelParallelStrategy):
    """Lightning's model-parallel strategy with all ranks on the data-parallel axis, and the recipe
    to shard a Hugging Face causal LM (:meth:`shard`, called from ``RLVRModule.configure_model``).

    Args:
        layer_class: import path of the model's decoder layer; each one becomes an FSDP unit (Qwen2
            by default; Llama/SmolLM2: ``transformers.models.llama.modeling_llama.LlamaDecoderLayer``).
        mixed_precision: ``bfloat16`` / ``float16``: compute in that dtype, keep the parameters
            (float32 masters, ``model.dtype``) and reduce gradients in float32; ``float32`` or null:
            everything in the parameters' dtype; ``auto``: bfloat16 on a GPU that supports it.
        activation_checkpointing: recompute each decoder layer's activations in the backward pass.
        cpu_offload: keep the sharded parameters, gradients and optimiser state in CPU memory.
        save_distributed_checkpoint: one file per rank (large models) instead of one gathered file.
    """

    def __init__(
        self,
        layer_class: str = "transformers.models.qwen2.modeling_qwen2.Qwen2DecoderLayer",
        mixed_precision: str | None = "bfloat16",
        activation_checkpointing: bool = True,
        cpu_offload: bool = False,
        save_distributed_checkpoint: bool = False,
        **kwargs,
    ) -> None:
        if mixed_precision not in MIXED_PRECISION_CHOICES:
            raise ValueError(f"trainer.strategy.mixed_precision must be one of {list(MIXED_PRECISION_CHOICES)}, "
                             f"got {mixed_precision!r}")
        super().__init__(data_parallel_size="auto", tensor_parallel_size=1,
                         save_distributed_checkpoint=save_distributed_checkpoint, **kwargs)
        self.layer_class = get_class(layer_class)
        self.mixed_precision = mixed_precision
        self.activation_checkpointing = activation_checkpointing
        self.cpu_offload = cpu_offload

    def setup_environment(self) -> None:
        # Every rank on the data-parallel axis (Lightning's "auto" puts the ranks of a node on the
        # tensor-parallel axis, which plain sharding does not use).
        self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()

    def shard(self, policy: torch.nn.Module) -> None:
        """Shard ``policy`` in place: each ``layer_class`` module, then the rest (embeddings, head)."""
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

        layers = [module for module in policy.modules() if isinstance(module, self.layer_class)]
        if not layers:
            raise ValueError(f"trainer.strategy.layer_class={self.layer_class.__name__} matches no module of the "
                             f"policy ({type(policy).__name__}); set it to the model's decoder layer class")
        if self.activation_checkpointing:
            from steer.models.loader import enable_activation_checkpointing

            enable_activation_checkpointing(policy, knob="trainer.strategy.activation_checkpointing")
        from steer.models.precision import resolve_compute_dtype

        name = self.mixed_precision
        dtype = MIXED_PRECISION[resolve_compute_dtype(name, self.root_device.type) if name == "auto" else name]
        options = {
            "mesh": self.device_mesh["data_parallel"],
            "mp_policy": MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32) if dtype else MixedPrecisionPolicy(),
            "offload_policy": CPUOffloadPolicy() if self.cpu_offload else OffloadPolicy(),
        }
        for layer in layers:
            fully_shard(layer, **options)
        # The root unit holds the rest (embeddings, final norm, head). FSDP keeps a root gathered after
        # its forward (it is needed again in backward): the chunked log-prob pass uses the head's
        # weight right after the forward (steer.algo.logprobs).
        fully_shard(policy, **options)


def check_fsdp(cfg: DictConfig) -> None:
    """``trainer=fsdp``: a known ``mixed_precision``, no ``model.compile`` and a model large enough
    to shard. (Rollout engines take FSDP's shards: :mod:`steer.rollout.weight_sync` gathers them for vLLM.)"""
    trainer = cfg.get("trainer")
    strategy = trainer.get("strategy") if trainer is not None else None
    target = strategy.get("_target_", "") if OmegaConf.is_dict(strategy) else str(strategy or "")
    if "fsdp" in target.lower() or "fullysharded" in target.lower():
        precision = strategy.get("mixed_precision", None) if OmegaConf.is_dict(strategy) else None
        if precision not in MIXED_PRECISION_CHOICES:
            raise ConfigError(f"trainer.strategy.mixed_precision={precision!r} is not valid; choose one of "
                              f"{', '.join('null' if key is None else key for key in MIXED_PRECISION_CHOICES)}")
        if (cfg.get("model") or {}).get("compile"):
            raise ConfigError("model.compile=true does not apply under FSDP (its layers run their own forward); "
                              "set model.compile=false")
        if not (cfg.get("model") or {}).get("path"):
            raise ConfigError(
                "trainer=fsdp shards the model's parameters over ranks, but model.path=null builds the tiny "
                "model (~0.5M parameters), far too small to shard; use trainer=ddp, or set model.path"
            )
