"""``mode=eval``: evaluate a policy on benchmarks once, without training.

    python src/run.py +experiment=eval_math model=hf model.path=Qwen/Qwen2.5-Math-7B
    python src/run.py +experiment=eval_math checkpoint=outputs/.../checkpoints/last.ckpt [model overrides]

The policy is built exactly as for training (``model.*``); ``checkpoint`` (optional) then replaces
its weights by those of a Lightning checkpoint of :class:`~steer.module.RLVRModule` (the
``policy.`` part of its state dict), so the model config must describe the same architecture.
Every benchmark of ``eval.benchmarks`` is evaluated once; metrics go to the configured logger
(step 0), to ``eval_results.jsonl`` and ``eval_results.json`` in the run folder, and to a table.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from lightning.pytorch.loggers import MLFlowLogger
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.table import Table

from steer.app import build_evaluation, build_logger, build_module
from steer.callbacks.evaluation import EvalResult
from steer.config import ConfigError
from steer.tracking import tracked_run

log = logging.getLogger(__name__)


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


def _device(cfg: DictConfig) -> torch.device:
    accelerator = str(cfg.trainer.get("accelerator", "auto"))
    wants_gpu = accelerator in ("auto", "gpu", "cuda")
    return torch.device("cuda" if wants_gpu and torch.cuda.is_available() else "cpu")


def print_results(results: list[EvalResult], title: str) -> None:
    """One row per (benchmark, accuracy metric) with its 95% CI; entropy and length once per benchmark."""
    table = Table(title=title)
    for column in ("benchmark", "metric", "value [95% CI]", "entropy", "length"):
        table.add_column(column, justify="left" if column in ("benchmark", "metric") else "right")
    for result in results:
        m = result.metrics
        accuracy = [key for key in m if key.startswith(("mean_at_", "pass_at_", "maj_at_")) and "_ci_" not in key]
        for index, key in enumerate(accuracy or ["-"]):
            first = index == 0
            value = f"{m[key]:.3f} [{m[key + '_ci_low']:.2f}, {m[key + '_ci_high']:.2f}]" if key in m else "-"
            table.add_row(
                f"{result.benchmark} ({result.num_prompts})" if first else "", key, value,
                f"{m['entropy']:.3f}" if first and "entropy" in m else "",
                f"{m['response_length_mean']:.0f}" if first and "response_length_mean" in m else "",
            )
    Console().print(table)


def evaluate(cfg: DictConfig) -> dict[str, float]:
    """Evaluate the configured policy on ``eval.benchmarks``; returns ``{eval/<benchmark>/<metric>: value}``."""
    module, _ = build_module(cfg)
    if cfg.get("checkpoint"):
        try:
            load_checkpoint_policy(module.policy, cfg.checkpoint)
        except ValueError as error:  # not our checkpoint, or another architecture than model.*
            raise ConfigError(f"checkpoint: {error}") from None
        log.info("loaded policy weights from %s", cfg.checkpoint)
    module.to(_device(cfg))
    evaluation = build_evaluation(cfg)
    logger = build_logger(cfg)
    with tracked_run(logger):  # the MLflow run exists: it must end FINISHED/FAILED/KILLED
        try:
            results = evaluation.run(module, loggers=[logger] if logger else [])
        finally:
            evaluation.close()

        output = Path(cfg.output_dir) / "eval_results.json"
        output.parent.mkdir(parents=True, exist_ok=True)
        summary = {
            "model": OmegaConf.to_container(cfg.model, resolve=True),
            "checkpoint": cfg.get("checkpoint"),
            "seed": cfg.seed,
            "benchmarks": {r.benchmark: {"metrics": r.metrics, "settings": r.extra, "seconds": r.seconds}
                           for r in results},
        }
        output.write_text(json.dumps(summary, indent=2))
        if logger:
            if isinstance(logger, MLFlowLogger):
                logger.experiment.log_artifact(logger.run_id, str(output))
            logger.finalize("success")
    name = cfg.get("checkpoint") or cfg.model.path or "the embedded tiny model"
    print_results(results, title=f"Evaluation of {name}")
    Console().print(f"results: {output}")
    return {f"eval/{r.benchmark}/{key}": value for r in results for key, value in r.metrics.items()}
