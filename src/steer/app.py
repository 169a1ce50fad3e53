"""Composition: a resolved Hydra config in, a trained policy and a summary out (``mode=train``), or
one evaluation of a policy on the benchmarks (``mode=eval``, :func:`evaluate`).

Order matters for the user: everything that can be wrong in the config is checked (schemas,
interventions' own argument checks, the reward) before any model is built or warmed up.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf
from rich.console import Console

from steer.allocator import reuse_freed_memory
from steer.callbacks.summary import SummaryCallback
from steer.callbacks.threads import ThreadGovernor, busy_cores, threads_for
from steer.checkpointing import load_checkpoint_policy, read_resume_info, skip_logged_steps
from steer.data.checks import check_data
from steer.data.datamodule import PromptDataModule
from steer.data.prompts import check_prompts_fit
from steer.eval.benchmarks import Benchmark, EvaluationCallback, print_results
from steer.knobs import ConfigError, may_use_gpu
from steer.models.loader import load_policy, load_policy_tokenizer
from steer.models.precision import lightning_precision
from steer.module import RLVRModule
from steer.rewards.base import score_safely
from steer.rollout.base import SamplingParams
from steer.startup import check_config
from steer.tracking import tracked_run

log = logging.getLogger(__name__)


def _store_dir() -> str:
    """Where the run's MLflow store lives: the run folder, or the sweep folder in a multirun
    (so that every run of a sweep lands in one store and can be compared)."""
    try:
        hydra = HydraConfig.get()
    except ValueError:  # composed without @hydra.main (tests): use the working directory
        return str(Path.cwd())
    if hydra.mode is not None and hydra.mode.name == "MULTIRUN":
        return str(Path(hydra.sweep.dir).resolve())
    return str(Path(hydra.runtime.output_dir).resolve())


if not OmegaConf.has_resolver("store_dir"):
    OmegaConf.register_new_resolver("store_dir", _store_dir)
if not OmegaConf.has_resolver("lightning_precision"):  # trainer.precision from model.compute_dtype
    OmegaConf.register_new_resolver("lightning_precision", lightning_precision)


def choose_threads(setting, cores: int | None = None, busy: float | None = None) -> int | None:
    """torch's CPU thread count for ``threads=<setting>``: an integer as given, None for torch's
    default, ``auto`` for the cores this process may use (``os.sched_getaffinity``) minus the ones
    other work keeps busy at start-up (:func:`steer.callbacks.threads.busy_cores`, rounded), at least 1;
    during training :class:`~steer.callbacks.threads.ThreadGovernor` re-picks it every RL step.

    Why: on a 2-core machine with one core busy, 2 threads wait on each other at every parallel
    region; 1 thread was faster there, and 2 threads 1.5x faster on a quiet machine
    (experiments/benchmarks/bench_threads.py).
    """
    if setting is None:
        return None
    if str(setting) != "auto":
        return int(setting)
    cores = len(os.sched_getaffinity(0)) if cores is None else cores
    busy = busy_cores() if busy is None else busy
    chosen = threads_for(cores, busy)
    log.info("threads=auto: %d of %d cores (%.2f busy at start-up)", chosen, cores, busy)
    return chosen


def build_interventions(cfg: DictConfig) -> list:
    components = cfg.intervention.get("components") or {}
    interventions = []
    for key, spec in components.items():
        try:
            interventions.append(instantiate(spec))
        except Exception as error:  # surface the intervention's own ValueError, not Hydra's wrapper
            cause = error.__cause__ or error
            raise ConfigError(f"intervention.components.{key}: {cause}") from None
    return interventions


def build_benchmarks(cfg: DictConfig) -> list[Benchmark]:
    benchmarks = []
    for name, spec in (cfg.eval.get("benchmarks") or {}).items():
        spec = OmegaConf.to_container(spec, resolve=True)
        records = instantiate(spec.pop("records"))
        reward = instantiate(spec.pop("reward")) if spec.get("reward") else None
        benchmarks.append(Benchmark(name=name, records=list(records), reward=reward, **spec))
    return benchmarks


def run(cfg: DictConfig) -> dict[str, float]:
    """What ``src/run.py`` calls: ``mode=train`` (default) or ``mode=eval`` (benchmarks only)."""
    if cfg.get("mode", "train") == "eval":
        return evaluate(cfg)
    if cfg.get("mode", "train") != "train":
        raise ConfigError(f"mode={cfg.mode!r} is not valid; choose one of ['eval', 'train']")
    return train(cfg)


def load_train_prompts(cfg: DictConfig):
    """The training prompts (``data.train``), after the start-up checks of their files."""
    check_data(cfg)
    try:
        return instantiate(cfg.data.train)
    except (OSError, ValueError, KeyError, TypeError) as error:
        cause = error.__cause__ or error
        raise ConfigError(f"data.train: {type(cause).__name__}: {cause}") from None


def build_module(cfg: DictConfig, prompts=None) -> tuple[RLVRModule, dict | None]:
    """Validate the config, then build reward, policy (loading or warming it up) and the module.

    ``prompts`` (training only): the training prompts; some must fit ``rollout.max_prompt_length``,
    which is checked with the policy's tokenizer before any weights are loaded.
    """
    algorithm, rollout = check_config(cfg)
    interventions = build_interventions(cfg)
    threads = choose_threads(cfg.get("threads"))
    if threads is not None:
        torch.set_num_threads(threads)
    if cfg.get("reuse_freed_memory", True):  # glibc keeps freed CPU memory for reuse (steer.allocator)
        reuse_freed_memory()
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    reward = instantiate(cfg.reward)  # its arguments were checked by check_config
    task = instantiate(cfg.data.task) if cfg.data.get("task") else None
    prompts_checked = False
    if prompts is not None:
        try:
            tokenizer = load_policy_tokenizer(cfg.model.path, cfg.model.get("gguf_file"))
        except Exception as error:  # e.g. a Hub id without network: the model load below reports it
            log.debug("tokenizer not loadable before the model (%s); checking prompt lengths after loading", error)
        else:
            check_prompts_fit(prompts, tokenizer, rollout.max_prompt_length, cfg.data.use_chat_template, algorithm.prompts_per_step)
            prompts_checked = True

    def is_correct(responses, references):
        return score_safely(reward, responses, references).correct

    tokenizer, policy, warmup_info = load_policy(
        cfg.model.path,
        cfg.model.dtype,
        cfg.model.get("gguf_file"),
        OmegaConf.to_container(cfg.model.tiny, resolve=True) if cfg.model.get("tiny") else {},
        OmegaConf.to_container(cfg.model.warmup, resolve=True) if cfg.model.get("warmup") else None,
        task,
        is_correct,
        cfg.model.cache_dir,
        gradient_checkpointing=bool(cfg.model.get("gradient_checkpointing", False)),
        attn_implementation=cfg.model.get("attn_implementation"),
    )
    if prompts is not None and not prompts_checked:
        check_prompts_fit(prompts, tokenizer, rollout.max_prompt_length, cfg.data.use_chat_template, algorithm.prompts_per_step)
    L.seed_everything(cfg.seed, workers=True, verbose=False)  # warm-up or loading consumed random state

    engine = instantiate(rollout.engine, policy=policy, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    sampling = SamplingParams(rollout.temperature, rollout.top_p, rollout.max_new_tokens, n=algorithm.n)
    return RLVRModule(policy, tokenizer, engine, reward, algorithm, sampling, interventions,
                      compile_layers=bool(cfg.model.get("compile", False))), warmup_info


def build_evaluation(cfg: DictConfig) -> EvaluationCallback:
    return EvaluationCallback(
        build_benchmarks(cfg),
        every_n_steps=cfg.eval.every_n_steps,
        max_prompt_length=cfg.eval.max_prompt_length,
        output_file=str(Path(cfg.output_dir) / "eval_results.jsonl"),
    )


def build_logger(cfg: DictConfig, resume: dict | None = None):
    """The configured logger with the resolved config as params, or False. ``resume``
    (:func:`steer.checkpointing.read_resume_info`) continues the checkpoint's MLflow run."""
    saved = (resume or {}).get("mlflow")
    if saved and cfg.get("logger"):
        logger = instantiate(cfg.logger, run_id=saved["run_id"], tracking_uri=saved["tracking_uri"])
        if rank_zero_only.rank == 0:  # the other ranks of a multi-process run hold a stand-in experiment
            skip_logged_steps(logger, resume["rl_step"])
            logged = logger.experiment.get_run(logger.run_id).data.params  # MLflow refuses to change a param
            logger.log_hyperparams({k: v for k, v in _flat_params(cfg).items() if k not in logged})
        return logger
    logger = instantiate(cfg.logger) if cfg.get("logger") else False
    if logger:
        logger.log_hyperparams(_flat_params(cfg))
    return logger


def train(cfg: DictConfig) -> dict[str, float]:
    """Run the configured RL job; returns the last step's metrics."""
    prompts = load_train_prompts(cfg)
    module, warmup_info = build_module(cfg, prompts)
    datamodule = PromptDataModule(
        prompts,
        module.tokenizer,
        module.algorithm.prompts_per_step,
        cfg.rollout.max_prompt_length,
        seed=cfg.seed,
        shuffle=cfg.data.shuffle,
        use_chat_template=cfg.data.use_chat_template,
        minibatch_prompts=module.algorithm.minibatch_prompts,
    )
    resume = read_resume_info(cfg.resume) if cfg.get("resume") else None
    logger = build_logger(cfg, resume)
    tracking_uri = getattr(logger, "_tracking_uri", None) if logger else None
    with tracked_run(logger):  # from here on the MLflow run exists: it must end FINISHED/FAILED/KILLED
        callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c]
        callbacks += [build_evaluation(cfg), SummaryCallback(tracking_uri, warmup_info)]
        if str(cfg.get("threads")) == "auto":  # the thread count follows the other processes' load
            callbacks.append(ThreadGovernor())
        # The DataModule shards each step's prompts over ranks itself: Lightning must not swap in a
        # DistributedSampler (it would split whole groups' prompts differently and lose the data order).
        trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=logger, use_distributed_sampler=False)
        trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("resume"))
    return dict(getattr(module, "last_metrics", {}))


def _flat_params(cfg: DictConfig) -> dict[str, str]:
    """The resolved config as flat ``a.b.c`` MLflow params (values as strings, within MLflow's limits)."""
    flat: dict[str, str] = {}

    def walk(node, prefix: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, f"{prefix}{key}.")
        else:
            flat[prefix[:-1]] = str(node)[:6000]

    walk(OmegaConf.to_container(cfg, resolve=True), "")
    return flat


def _device(cfg: DictConfig) -> torch.device:
    wants_gpu = may_use_gpu(cfg.trainer.get("accelerator", "auto"))
    return torch.device("cuda" if wants_gpu and torch.cuda.is_available() else "cpu")


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
