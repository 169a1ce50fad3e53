"""Start-up validation: everything that can be wrong in a config, checked before any model is built.

:func:`check_config` validates the ``algorithm`` and ``rollout`` schemas (:mod:`steer.config`), then
runs every function of :data:`STARTUP_CHECKS` in order. Each check lives next to the code that
knows the thing it checks and raises one :class:`~steer.knobs.ConfigError` naming the knob, what
was wrong and what is allowed. A new section's check goes next to its code and into that list.
:func:`steer.data.prompts.check_prompts_fit` is the one check that needs the tokenizer (not the
model): :func:`steer.app.build_module` calls it.
"""

from __future__ import annotations

from typing import Callable

from omegaconf import DictConfig

from steer.checkpointing import check_checkpoint, check_resume
from steer.config import AlgorithmConfig, RolloutConfig, check_algorithm, check_output, check_rollout, check_run, check_section
from steer.data.checks import check_data
from steer.distributed import check_data_parallel
from steer.eval.benchmarks import check_eval
from steer.models.loader import check_model
from steer.models.memory import check_memory
from steer.models.precision import check_precision
from steer.models.sharding import check_fsdp
from steer.rewards.base import check_rewards
from steer.rollout.base import check_rollout_engine
from steer.rollout.vllm import check_engine_layout
from steer.tracking import check_logger


STARTUP_CHECKS: list[Callable[[DictConfig], None]] = [
    check_run, check_rollout_engine, check_engine_layout, check_model, check_precision, check_memory, check_data, check_eval, check_rewards, check_checkpoint,
    check_resume, check_output, check_logger, check_fsdp,
]
"""Section checks :func:`check_config` runs, in order (cheap ones first; the tracking probe last)."""


def check_config(cfg: DictConfig) -> tuple[AlgorithmConfig, RolloutConfig]:
    """Validate the whole config (schemas, values, files, folders, tracking); return the trainer's
    ``algorithm`` and ``rollout`` sections as typed objects. Builds, creates and downloads nothing."""
    algorithm: AlgorithmConfig = check_section(cfg, "algorithm", AlgorithmConfig)
    rollout: RolloutConfig = check_section(cfg, "rollout", RolloutConfig)
    check_algorithm(algorithm)
    check_rollout(rollout)
    for check in STARTUP_CHECKS:
        check(cfg)
    check_data_parallel(cfg, algorithm)
    return algorithm, rollout
