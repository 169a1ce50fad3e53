"""Checkpoints that a killed run can resume from exactly.

What a checkpoint must hold, beyond Lightning's own (weights, optimiser, scheduler, loop counters,
callbacks' ``state_dict``): every random generator the run draws from (Python, NumPy, torch CPU and
CUDA; the rollout engines sample from torch's global generator), the RL step counter, the
interventions' states (Clip-Cov's generator, controllers), and the MLflow run to continue. The
module and the callbacks store their part in ``on_save_checkpoint``/``state_dict``; this file owns
the pieces shared between them: RNG capture, atomic writing, and what a resumed run reads back
(``resume=`` on the command line is :mod:`steer.cli`'s).

Everything stored here is a tensor or a plain Python value, so a checkpoint also loads with
``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import logging
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig

from steer.knobs import ConfigError, select
from steer.paths import CHECKPOINT_DIR, LAST  # noqa: F401  (where checkpoints live; imported from here too)

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------- random generators
def collect_rng_states() -> dict[str, Any]:
    """The state of every global generator, as tensors and plain values."""
    kind, keys, position, has_gauss, cached = np.random.get_state()
    states: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "position": int(position),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict[str, Any]) -> None:
    """Inverse of :func:`collect_rng_states`."""
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy = states["numpy"]
    np.random.set_state((numpy["kind"], numpy["keys"].numpy().astype(np.uint32), numpy["position"],
                         numpy["has_gauss"], numpy["cached_gaussian"]))
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


# ---------------------------------------------------------------------- atomic writing
def save_atomically(trainer, path: str | Path, weights_only: bool = False) -> Path:
    """``trainer.save_checkpoint`` to a temporary file in the same folder, flushed to disk, then
    renamed over ``path``: a kill at any moment leaves either the old or the new checkpoint whole.

    Call it on every rank (Lightning gathers the state collectively); only rank 0 writes.
    """
    path = Path(path)
    temporary = path.with_name(f".{path.name}.tmp")
    if trainer.is_global_zero:
        path.parent.mkdir(parents=True, exist_ok=True)
    trainer.save_checkpoint(temporary, weights_only=weights_only)
    if trainer.is_global_zero:
        with open(temporary, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(temporary, path)
        directory = os.open(path.parent, os.O_RDONLY)
        try:  # make the rename itself durable
            os.fsync(directory)
        finally:
            os.close(directory)
    trainer.strategy.barrier("steer_checkpoint")
    return path


def read_resume_info(checkpoint: str | Path) -> dict[str, Any]:
    """The small part of a checkpoint that the composition needs before Lightning restores it
    (the MLflow run to continue); the file is memory-mapped, so its tensors are not read."""
    state = torch.load(checkpoint, map_location="cpu", mmap=True, weights_only=True)
    return {"rl_step": state.get("rl_step", 0), "mlflow": state.get("mlflow_run")}


def skip_logged_steps(logger, first_step: int) -> None:
    """Make a resumed MLflow logger drop ``(metric, step)`` pairs the store already holds from
    ``first_step`` on: a killed process may have logged steps after its last checkpoint, which the
    resumed run computes again (with deterministic settings, to the same values). Each step is then
    stored once."""
    client, run_id = logger.experiment, logger.run_id
    logged: set[tuple[str, int]] = set()
    for key in client.get_run(run_id).data.metrics:
        logged.update((key, m.step) for m in client.get_metric_history(run_id, key) if m.step >= first_step)
    if not logged:
        return
    log.info("resume: %d metric values of steps >= %d are already in the MLflow run; not logging them again",
             len(logged), first_step)
    log_metrics = logger.log_metrics

    def log_new_metrics(metrics: dict[str, float], step: int | None = None) -> None:
        fresh = {k: v for k, v in metrics.items() if (k, step) not in logged}
        if fresh:
            log_metrics(fresh, step)

    logger.log_metrics = log_new_metrics


def check_checkpoint(cfg: DictConfig) -> None:
    """``checkpoint`` (``mode=eval``): the Lightning checkpoint whose policy weights are evaluated exists."""
    checkpoint = select(cfg, "checkpoint")
    if checkpoint and not Path(str(checkpoint)).expanduser().is_file():
        raise ConfigError(f"checkpoint={str(checkpoint)!r} is not an existing file; allowed: a .ckpt file written by a "
                          "training run (e.g. outputs/<run>/checkpoints/last.ckpt), or null for model.path's weights")


def check_resume(cfg: DictConfig) -> None:
    """``resume``: the checkpoint a killed run continues from exists (src/run.py turns a run folder
    into its ``checkpoints/last.ckpt`` before composing)."""
    resume = select(cfg, "resume")
    if resume and not Path(str(resume)).expanduser().is_file():
        raise ConfigError(f"resume={str(resume)!r}: no such checkpoint file; allowed: a run folder or its "
                          "checkpoints/last.ckpt, or null")


def load_checkpoint_policy(policy: torch.nn.Module, checkpoint: str | Path) -> None:
    """Load the ``policy.`` weights of a Lightning checkpoint of our module into ``policy``."""
    state = torch.load(Path(checkpoint).expanduser(), map_location="cpu", weights_only=False)
    weights = {key[len("policy."):]: value for key, value in state.get("state_dict", state).items()
               if key.startswith("policy.")}
    if not weights:
        raise ValueError(f"checkpoint {checkpoint} holds no 'policy.' weights (not a checkpoint of RLVRModule?)")
    missing, unexpected = policy.load_state_dict(weights, strict=False)
    # Tied output embeddings may be saved once; anything else missing means another architecture.
    missing = [key for key in missing if key != "lm_head.weight"]
    if missing or unexpected:
        raise ValueError(f"checkpoint {checkpoint} does not fit model.*: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
