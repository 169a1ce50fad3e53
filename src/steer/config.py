"""Typed schemas of the trainer's own config sections, checked before any model is built.

Hydra already refuses command-line overrides of keys that do not exist. These schemas also catch
typos inside YAML files, wrong types and inconsistent values, and turn each into one
:class:`ConfigError` that names the knob and what it accepts.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from steer.algo.advantages import ESTIMATORS
from steer.algo.aggregation import AGGREGATION_MODES
from steer.algo.kl import KL_ESTIMATORS


class ConfigError(ValueError):
    """A bad configuration value, raised at start-up with the knob's full name."""


@dataclass
class ClipSchema:
    low: float = 0.2
    """PPO clip: ratio >= 1 - low (Schulman et al. 2017)."""
    high: float = 0.2
    """PPO clip: ratio <= 1 + high; 0.28 is DAPO's clip-higher (set by the clip_higher intervention)."""
    dual: Optional[float] = 3.0
    """Dual-clip constant c > 1 for negative advantages (Ye et al. 2020); the paper uses 10; null disables."""


@dataclass
class KLSchema:
    coef: float = 0.0
    """Weight of the KL penalty to the reference model; 0 disables it and the reference is not loaded."""
    estimator: str = "k3"
    """k1, k2 or k3 (Schulman 2020)."""


@dataclass
class AlgorithmConfig:
    steps: int = 250
    """RL steps (rollout batches) to train."""
    estimator: str = "grpo"
    """Group advantage estimator: grpo, drgrpo, rloo, opo."""
    n: int = 8
    """Responses sampled per prompt (the group size)."""
    prompts_per_step: int = 16
    """Prompts per rollout batch."""
    minibatch_prompts: int = 8
    """Prompts per optimiser step; must divide prompts_per_step (2 optimiser steps per batch here)."""
    micro_batch_size: Optional[int] = None
    """Sequences per forward/backward (gradient accumulation); null = a whole mini-batch."""
    epochs: int = 1
    """Passes over each rollout batch."""
    clip: ClipSchema = field(default_factory=ClipSchema)
    loss_aggregation: str = "token-mean"
    """token-mean, seq-mean-token-mean, seq-mean-token-sum, seq-mean-token-sum-norm."""
    kl: KLSchema = field(default_factory=KLSchema)
    lr: float = 1e-4
    """AdamW learning rate."""
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    lr_warmup_steps: int = 0
    """Optimiser steps of linear learning-rate warm-up, then constant."""
    grad_clip: float = 1.0
    """Max global gradient norm; 0 disables clipping."""
    logprob_chunk_tokens: int = 4096
    """Tokens per output-head chunk when computing log-probs (bounds logits memory)."""


@dataclass
class RolloutConfig:
    engine: Any = None
    """``_target_`` of the rollout engine (hf; vllm on GPUs)."""
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 40
    max_prompt_length: int = 64
    """Longer prompts are dropped and counted (one warning)."""


def _check_section(cfg: DictConfig, key: str, schema: type) -> Any:
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), cfg[key]))
    except OmegaConfBaseException as error:
        allowed = ", ".join(f.name for f in fields(schema))
        raise ConfigError(f"config section '{key}': {error.msg} (allowed keys: {allowed})") from None


def _one_of(name: str, value: Any, allowed) -> None:
    if value not in allowed:
        raise ConfigError(f"{name}={value!r} is not valid; choose one of {sorted(allowed)}")


def check_config(cfg: DictConfig) -> tuple[AlgorithmConfig, RolloutConfig]:
    """Validate the trainer's sections; return them as typed objects."""
    algorithm: AlgorithmConfig = _check_section(cfg, "algorithm", AlgorithmConfig)
    rollout: RolloutConfig = _check_section(cfg, "rollout", RolloutConfig)
    _one_of("algorithm.estimator", algorithm.estimator, ESTIMATORS)
    _one_of("algorithm.loss_aggregation", algorithm.loss_aggregation, AGGREGATION_MODES)
    _one_of("algorithm.kl.estimator", algorithm.kl.estimator, KL_ESTIMATORS)
    positive = {
        "algorithm.steps": algorithm.steps,
        "algorithm.prompts_per_step": algorithm.prompts_per_step,
        "algorithm.minibatch_prompts": algorithm.minibatch_prompts,
        "algorithm.epochs": algorithm.epochs,
        "algorithm.logprob_chunk_tokens": algorithm.logprob_chunk_tokens,
        "rollout.max_new_tokens": rollout.max_new_tokens,
        "rollout.max_prompt_length": rollout.max_prompt_length,
    }
    for name, value in positive.items():
        if value < 1:
            raise ConfigError(f"{name} must be >= 1, got {value}")
    if algorithm.n < 2:
        raise ConfigError(f"algorithm.n={algorithm.n}: the group estimator {algorithm.estimator!r} needs n >= 2 samples per prompt")
    if algorithm.prompts_per_step % algorithm.minibatch_prompts:
        raise ConfigError(
            f"algorithm.minibatch_prompts={algorithm.minibatch_prompts} must divide "
            f"algorithm.prompts_per_step={algorithm.prompts_per_step}"
        )
    sequences = algorithm.minibatch_prompts * algorithm.n
    if algorithm.micro_batch_size is not None and (algorithm.micro_batch_size < 1 or sequences % algorithm.micro_batch_size):
        raise ConfigError(
            f"algorithm.micro_batch_size={algorithm.micro_batch_size} must be >= 1 and divide the "
            f"mini-batch of minibatch_prompts * n = {sequences} sequences"
        )
    if algorithm.clip.low < 0 or algorithm.clip.high < 0:
        raise ConfigError(f"algorithm.clip.low/high must be >= 0, got {algorithm.clip.low}/{algorithm.clip.high}")
    if algorithm.clip.dual is not None and algorithm.clip.dual <= 1:
        raise ConfigError(f"algorithm.clip.dual must be > 1 or null, got {algorithm.clip.dual}")
    if algorithm.kl.coef < 0:
        raise ConfigError(f"algorithm.kl.coef must be >= 0, got {algorithm.kl.coef}")
    if algorithm.lr <= 0:
        raise ConfigError(f"algorithm.lr must be > 0, got {algorithm.lr}")
    if rollout.temperature <= 0 or not 0 < rollout.top_p <= 1:
        raise ConfigError(f"rollout.temperature must be > 0 and rollout.top_p in (0, 1]; got {rollout.temperature}, {rollout.top_p}")
    check_data_parallel(cfg, algorithm)
    return algorithm, rollout


# ---------------------------------------------------------------------- data parallelism (DDP / FSDP)


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


def check_world_size(algorithm: AlgorithmConfig, ranks: int) -> None:
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


def check_data_parallel(cfg: DictConfig, algorithm: AlgorithmConfig, environ: Any = None) -> None:
    """Start-up checks of a multi-process run: rank divisibility, FSDP's needs, and processes that
    a launcher started without a data-parallel trainer (no process group would join them)."""
    import os

    environ = os.environ if environ is None else environ
    trainer = cfg.get("trainer")
    ranks = configured_ranks(trainer)
    if ranks is not None:
        check_world_size(algorithm, ranks)
    strategy = trainer.get("strategy") if trainer is not None else None
    target = strategy.get("_target_", "") if OmegaConf.is_dict(strategy) else str(strategy or "")
    if "fsdp" in target.lower() or "fullysharded" in target.lower():
        precision = strategy.get("mixed_precision", None) if OmegaConf.is_dict(strategy) else None
        if precision not in (None, "bf16", "fp16"):
            raise ConfigError(f"trainer.strategy.mixed_precision={precision!r} is not valid; choose one of null, bf16, fp16")
        if not (cfg.get("model") or {}).get("path"):
            raise ConfigError(
                "trainer=fsdp shards the model's parameters over ranks, but model.path=null builds the tiny "
                "model (~0.5M parameters), far too small to shard; use trainer=ddp, or set model.path"
            )
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
