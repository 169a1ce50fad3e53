"""The typed schemas of the trainer's ``algorithm`` and ``rollout`` sections, and the checks of their
values and of the top-level knobs (``mode``, ``seed``, ``threads``, ``output_dir``).

Hydra already refuses command-line overrides of keys that do not exist; the schemas also catch
typos inside YAML files and wrong types (:func:`check_section`), the checks below them bad values.
Every other section is checked next to the code that knows it; :mod:`steer.startup` runs them all.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Optional, get_type_hints

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from steer.algo.advantages import ESTIMATORS
from steer.algo.aggregation import AGGREGATION_MODES
from steer.algo.interventions.kl_penalty import KL_ESTIMATORS
from steer.algo.interventions.rollout_correction import ROLLOUT_CORRECTIONS
from steer.knobs import ConfigError, config_knobs, divisors, number, one_of, select, suggest_knobs, writable_folder


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
    micro_batch_tokens: Optional[int] = None
    """Padded tokens per forward/backward: rows sorted by length and cut into micro-batches of at most
    this many ``rows x (longest prompt + longest response)`` (and at most micro_batch_size rows); null = off."""
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
    share_prompt_prefix: bool = False
    """Run each prompt once for its ``n`` samples in every log-prob pass (update, old, reference)."""
    pack_sequences: bool = False
    """Leave the padding out of every log-prob pass: real tokens end to end in rows, each sequence
    attending to itself only."""
    max_consecutive_nonfinite: int = 5
    """Consecutive optimiser steps skipped for a non-finite loss or gradient before the run stops
    (with ``checkpoints/nonfinite.ckpt``); 0 never stops."""
    rollout_correction: str = "none"
    """Sampler/trainer mismatch correction: none, token_tis (truncated importance weight per token),
    seq_mask (drop responses whose mean |log pi_train - log pi_sampler| exceeds the threshold)."""
    rollout_correction_cap: float = 2.0
    """token_tis: the truncation level of min(pi_train / pi_sampler, cap) (Yao et al. 2025 use 2)."""
    rollout_correction_threshold: float = 0.1
    """seq_mask: the largest mean |log pi_train - log pi_sampler| (nats) of a kept response."""


@dataclass
class RolloutConfig:
    engine: Any = None
    """``_target_`` of the rollout engine (hf; vllm on GPUs)."""
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 40
    max_prompt_length: int = 64
    """Longer prompts are dropped and counted (one warning)."""


SEED_MAX = 2**32 - 1
"""Largest seed numpy (and so Lightning's ``seed_everything``) accepts."""


def check_section(cfg: DictConfig, key: str, schema: type) -> Any:
    try:
        # resolved in place first: merged alone, an interpolation into another section (rollout's
        # ${oc.select:data.max_prompt_length,64}) would no longer find it
        section = OmegaConf.to_container(cfg[key], resolve=True) if isinstance(cfg[key], DictConfig) else cfg[key]
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), section))
    except OmegaConfBaseException as error:
        bad = f"{key}.{error.full_key}" if getattr(error, "full_key", None) else key
        section, section_schema = bad.rsplit(".", 1)[0], schema
        for part in bad.split(".")[1:-1]:  # the nested schema the key was meant for (algorithm.clip -> ClipSchema)
            section_schema = get_type_hints(section_schema).get(part, section_schema)
        if not hasattr(section_schema, "__dataclass_fields__"):
            section, section_schema = key, schema
        allowed = ", ".join(f.name for f in fields(section_schema))
        message = str(getattr(error, "msg", error)).splitlines()[0]
        if "not in" not in message:  # a wrong type: the message says which
            raise ConfigError(f"{bad}: {message}") from None
        knobs = [knob for knob in config_knobs(cfg) if knob != bad and not knob.startswith(bad + ".")]
        guesses = suggest_knobs(bad, knobs)
        hint = f"; did you mean {' or '.join(guesses)}?" if guesses else ""
        raise ConfigError(f"{bad}: {message}{hint} (allowed keys of {section}: {allowed})") from None


def check_algorithm(algorithm: AlgorithmConfig) -> None:
    one_of("algorithm.estimator", algorithm.estimator, ESTIMATORS)
    one_of("algorithm.loss_aggregation", algorithm.loss_aggregation, AGGREGATION_MODES)
    one_of("algorithm.kl.estimator", algorithm.kl.estimator, KL_ESTIMATORS)
    for name in ("steps", "prompts_per_step", "minibatch_prompts", "epochs", "logprob_chunk_tokens"):
        number(f"algorithm.{name}", getattr(algorithm, name), 1, integer=True)
    if algorithm.n < 2:
        raise ConfigError(f"algorithm.n={algorithm.n} is not valid: the group estimator {algorithm.estimator!r} "
                          "needs n >= 2 samples per prompt; allowed: an integer >= 2")
    if algorithm.prompts_per_step % algorithm.minibatch_prompts:
        raise ConfigError(
            f"algorithm.minibatch_prompts={algorithm.minibatch_prompts} must divide "
            f"algorithm.prompts_per_step={algorithm.prompts_per_step}; allowed: {divisors(algorithm.prompts_per_step)}"
        )
    sequences = algorithm.minibatch_prompts * algorithm.n
    if algorithm.micro_batch_size is not None and (algorithm.micro_batch_size < 1 or sequences % algorithm.micro_batch_size):
        raise ConfigError(
            f"algorithm.micro_batch_size={algorithm.micro_batch_size} must be >= 1 and divide the "
            f"mini-batch of minibatch_prompts * n = {sequences} sequences; allowed: {divisors(sequences)}, or null"
        )
    if algorithm.micro_batch_tokens is not None:
        number("algorithm.micro_batch_tokens", algorithm.micro_batch_tokens, 1, integer=True, allowed="an integer >= 1, or null")
    number("algorithm.clip.low", algorithm.clip.low, 0)
    number("algorithm.clip.high", algorithm.clip.high, 0)
    if algorithm.clip.dual is not None:
        number("algorithm.clip.dual", algorithm.clip.dual, 1, low_open=True, allowed="a finite number > 1, or null")
    number("algorithm.kl.coef", algorithm.kl.coef, 0)
    number("algorithm.lr", algorithm.lr, 0, low_open=True)
    number("algorithm.weight_decay", algorithm.weight_decay, 0)
    for index, beta in enumerate(algorithm.betas):
        number(f"algorithm.betas[{index}]", beta, 0, 1, allowed="a number in [0, 1)")
        if beta == 1:
            raise ConfigError(f"algorithm.betas[{index}]=1 is not valid; allowed: a number in [0, 1)")
    number("algorithm.lr_warmup_steps", algorithm.lr_warmup_steps, 0, integer=True)
    number("algorithm.grad_clip", algorithm.grad_clip, 0, allowed="a finite number >= 0 (0 disables clipping)")
    number("algorithm.max_consecutive_nonfinite", algorithm.max_consecutive_nonfinite, 0, integer=True,
            allowed="an integer >= 0 (0: never stop)")
    one_of("algorithm.rollout_correction", algorithm.rollout_correction, ROLLOUT_CORRECTIONS)
    number("algorithm.rollout_correction_cap", algorithm.rollout_correction_cap, 0, low_open=True)
    number("algorithm.rollout_correction_threshold", algorithm.rollout_correction_threshold, 0)


def check_rollout(rollout: RolloutConfig) -> None:
    number("rollout.temperature", rollout.temperature, 0, low_open=True)
    number("rollout.top_p", rollout.top_p, 0, 1, low_open=True)
    number("rollout.max_new_tokens", rollout.max_new_tokens, 1, integer=True)
    number("rollout.max_prompt_length", rollout.max_prompt_length, 1, integer=True)


def check_run(cfg: DictConfig) -> None:
    """Top-level knobs: ``mode``, ``seed``, ``threads``, ``reuse_freed_memory``."""
    one_of("mode", select(cfg, "mode", "train"), {"train", "eval"})
    number("seed", select(cfg, "seed"), 0, SEED_MAX, integer=True)
    threads = select(cfg, "threads")
    if threads is not None and threads != "auto":
        number("threads", threads, 1, integer=True, allowed="an integer >= 1, auto (the free cores), or null for torch's default")
    one_of("reuse_freed_memory", select(cfg, "reuse_freed_memory", True), {True, False})


def check_output(cfg: DictConfig) -> None:
    """``output_dir``: the run folder can be written (Hydra creates it; the compose API does not)."""
    try:
        output_dir = OmegaConf.select(cfg, "output_dir")
    except OmegaConfBaseException:  # ${hydra:...} outside a Hydra run: nothing to check yet
        return
    if output_dir is not None:
        writable_folder("output_dir", output_dir)
