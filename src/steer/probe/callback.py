"""The entropy-dynamics probe: predicted vs measured entropy change, quadrants, entropy detail, figures.

A Lightning callback that is also a :class:`steer.observers.StepObserver` (it registers itself with the
module in ``setup``). What it logs, into the step's metrics (names in docs/metrics_entropy_dynamics.md):

- every ``every_n_steps`` RL steps, on ``probe_sequences`` sampled sequences of the mini-batch that
  optimiser step ``optimizer_step`` trains on: the entropy at every response state before that
  optimiser step and at the same states after it; the measured per-token change is compared with
  the three per-token predictors of :mod:`steer.probe.entropy_dynamics` and the parameter-space
  predictor ``<grad_theta H(s), Delta theta>`` of the actual update, one forward-mode JVP over the
  probed states (``probe/<predictor>/...``; it keeps one copy of the parameters from just before the
  probed optimiser step until just after it);
- every step, from tensors the RL step already has (no forward pass): quadrant statistics
  (``quadrant/...``), entropy quantiles and entropy per data source (``entropy/...``), and for
  every STEER-type intervention, why its weights do or do not act (``steer_diag/<name>/...``);
- at the end: pooled agreement over all probes (``probe_summary/...``), the probe's per-token data
  (``entropy_probe/probe_data.npz``) and PNG figures (``figures/*.png``), as MLflow artifacts and in
  the run folder. ``experiments/plot_run.py`` redraws the figures of a finished run from MLflow.
"""

from __future__ import annotations

import logging
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import lightning as L
from lightning.pytorch.loggers import MLFlowLogger
import numpy as np
import torch

from steer.algo.interventions.base import PolicyTokens
from steer.algo.interventions.steer import SteerReweighting
from steer.algo.policy_loss import effective_clip, ppo_token_loss
from steer.observers import StepContext, StepObserver
from steer.probe import entropy_dynamics as ed

log = logging.getLogger(__name__)

FIGURES = ("entropy", "accuracy", "scatter", "quadrants", "steer_weights")
History = dict[str, list[tuple[int, float]]]
"""Metric name -> ``[(step, value), ...]``, the shape of an MLflow metric history."""


def metric_safe(name: str) -> str:
    """A name fit for an MLflow metric key (letters, digits, ``_ - . /`` and spaces)."""
    return re.sub(r"[^A-Za-z0-9_\-./ ]", "_", name) or "unknown"


def finite_only(metrics: Mapping[str, float]) -> dict[str, float]:
    """Drop undefined statistics (a correlation of constant data is NaN): absent, not NaN, in MLflow."""
    return {key: float(value) for key, value in metrics.items() if math.isfinite(float(value))}


@dataclass
class _PendingProbe:
    """The probe's state before the optimiser step it measures."""

    step: int
    rows: torch.Tensor
    width: int
    mask: torch.Tensor
    entropy_before: torch.Tensor
    predictions: dict[str, torch.Tensor]
    advantages: torch.Tensor
    logprobs: torch.Tensor
    params_before: dict[str, torch.Tensor] | None = None
    """A copy of the trainable parameters before the probed step (parameter-space predictor only)."""


class EntropyProbe(L.Callback, StepObserver):
    """Entropy-dynamics instruments (see the module docstring).

    Args:
        every_n_steps: probe the entropy change every this many RL steps (0 disables the probe; the
            per-step statistics stay on).
        probe_sequences: sequences in the probe, drawn (seeded) from the probed mini-batch.
        optimizer_step: which optimiser step of the RL step to measure (0 = the first, on-policy).
        quadrants, entropy_detail, steer_diagnostics: turn the per-step statistics on or off.
        figures: names from :data:`FIGURES` to draw at the end (empty: none).
        output_dir: run folder for ``figures/`` and ``entropy_probe/`` (None: MLflow only).
        seed: seeds the choice of probe sequences.
        parameter_space: also log the parameter-space predictor (one JVP per probe, and one copy of
            the trainable parameters held across the probed optimiser step).
    """

    def __init__(
        self,
        every_n_steps: int = 10,
        probe_sequences: int = 32,
        optimizer_step: int = 0,
        quadrants: bool = True,
        entropy_detail: bool = True,
        steer_diagnostics: bool = True,
        figures: Sequence[str] = FIGURES,
        output_dir: str | None = None,
        seed: int = 0,
        parameter_space: bool = True,
    ) -> None:
        if every_n_steps < 0 or probe_sequences < 1 or optimizer_step < 0:
            raise ValueError(
                "entropy_probe needs every_n_steps >= 0, probe_sequences >= 1 and optimizer_step >= 0, got "
                f"{every_n_steps}, {probe_sequences}, {optimizer_step}"
            )
        unknown = sorted(set(figures) - set(FIGURES))
        if unknown:
            raise ValueError(f"entropy_probe figures {unknown} unknown; valid: {list(FIGURES)}")
        self.every_n_steps = every_n_steps
        self.probe_sequences = probe_sequences
        self.optimizer_step = optimizer_step
        self.quadrants = quadrants
        self.entropy_detail = entropy_detail
        self.steer_diagnostics = steer_diagnostics
        self.figures = tuple(figures)
        self.output_dir = Path(output_dir) if output_dir else None
        self.seed = seed
        self.parameter_space = parameter_space
        self._pending: _PendingProbe | None = None
        self._probe_this_step = False
        self.records: list[dict[str, np.ndarray]] = []
        self.steer_weights: dict[str, list[np.ndarray]] = {}
        self.metric_history: History = {}  # not `history`: SummaryCallback looks for the evaluation's `history`
        self._warned_no_step = False

    # ------------------------------------------------------------------ registration
    def setup(self, trainer: L.Trainer, pl_module, stage: str) -> None:
        observers = getattr(pl_module, "observers", None)
        if observers is not None and self not in observers:
            observers.append(self)

    # ------------------------------------------------------------------ StepObserver hooks
    def before_update(self, module, context: StepContext) -> None:
        mask = context.rollout.response_mask
        if self.quadrants:
            context.metrics.update(finite_only(self._quadrant_metrics(context.advantages, context.old_logprobs, context.old_entropy, mask)))
        if self.entropy_detail:
            context.metrics.update(finite_only(self._entropy_metrics(context)))
        self._probe_this_step = self.every_n_steps > 0 and context.step % self.every_n_steps == 0
        if self.steer_diagnostics:
            context.metrics.update(finite_only(self._steer_metrics(module, context, keep_weights=self._probe_this_step)))
        if not self._probe_this_step:
            return
        if self.optimizer_step >= module.optimizer_steps_per_batch:
            if not self._warned_no_step:
                self._warned_no_step = True
                log.warning("entropy_probe.optimizer_step=%d but an RL step makes only %d optimiser steps: no probe",
                            self.optimizer_step, module.optimizer_steps_per_batch)
            return
        if self.optimizer_step == 0:
            self._pending = self._capture(module, context)

    def after_optimizer_step(self, module, context: StepContext, rows: torch.Tensor, index: int) -> None:
        if not self._probe_this_step:
            return
        if index == self.optimizer_step - 1:
            self._pending = self._capture(module, context)
        elif index == self.optimizer_step and self._pending is not None:
            context.metrics.update(finite_only(self._measure(module, context, self._pending)))
            self._pending = None

    # ------------------------------------------------------------------ the probe
    def _probe_rows(self, module, context: StepContext) -> torch.Tensor:
        minibatches = module.minibatch_rows(context.rollout.response_ids.shape[0])
        candidates = minibatches[self.optimizer_step % len(minibatches)]
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + context.step)
        chosen = torch.randperm(len(candidates), generator=generator)[: self.probe_sequences]
        return candidates[chosen.sort().values]

    def _capture(self, module, context: StepContext) -> _PendingProbe:
        rows = self._probe_rows(module, context)
        rollout = context.rollout
        width = int(rollout.response_lengths[rows].max().clamp(min=1))
        logprobs, entropy = module.logprobs_and_entropy(rollout, rows, width)
        mask = rollout.response_mask[rows, :width]
        advantages = context.advantages[rows].expand(-1, width)
        old_logprobs = context.old_logprobs[rows, :width]
        old_entropy = context.old_entropy[rows, :width]
        ppo = ppo_token_loss(logprobs, old_logprobs, advantages, effective_clip(module.clip, module.interventions))
        predictions = {
            "released_omega": ed.released_omega_prediction(advantages, logprobs, old_logprobs, old_entropy, mask),
            "first_order_omega": ed.first_order_omega_prediction(advantages, ppo.ratio, ppo.clipped, logprobs, entropy, mask),
            "covariance": ed.covariance_prediction(advantages, logprobs, mask),
        }
        params_before = None
        if self.parameter_space:  # theta_before: the point the update starts from
            params_before = {name: p.detach().clone() for name, p in module.policy.named_parameters() if p.requires_grad}
        return _PendingProbe(context.step, rows, width, mask, entropy, predictions, advantages, logprobs, params_before)

    def _measure(self, module, context: StepContext, pending: _PendingProbe) -> dict[str, float]:
        started = time.perf_counter()
        _, entropy_after = module.logprobs_and_entropy(context.rollout, pending.rows, pending.width)
        forward_seconds = time.perf_counter() - started
        measured = ed.measured_entropy_change(pending.entropy_before, entropy_after, pending.mask)
        valid = pending.mask.bool()
        predictions = dict(pending.predictions)
        metrics: dict[str, float] = {}
        if pending.params_before is not None:
            metrics.update(self._parameter_space(module, context, pending, predictions, forward_seconds))
        pending.params_before = None  # free the copy before the next optimiser step
        metrics.update({
            "probe/tokens": float(valid.sum()),
            "probe/measured_sum": float(measured[valid].sum()),
            "probe/measured_abs_mean": float(measured[valid].abs().mean()) if bool(valid.any()) else math.nan,
        })
        # States of tokens with zero advantage get no update of their own: what they move measures the
        # spill-over of the other tokens' updates through the shared weights (no per-token predictor models it).
        spill = valid & (pending.advantages == 0)
        if bool(spill.any()):
            metrics["probe/zero_adv_measured_abs_mean"] = float(measured[spill].abs().mean())
        for name, prediction in predictions.items():
            for key, value in ed.compare_prediction(prediction, measured, pending.mask).items():
                metrics[f"probe/{name}/{key}"] = value
        exact = predictions.get(ed.PARAMETER_SPACE)
        if exact is not None:
            # Face value (no fitted scale): what is left is the step's higher-order part; and how far each
            # per-token predictor is from the exact first-order change (the shared-weight coupling it ignores).
            for key, value in ed.absolute_agreement(exact, measured, pending.mask).items():
                metrics[f"probe/{ed.PARAMETER_SPACE}/{key}"] = value
            for name in ed.PER_TOKEN_PREDICTORS:
                metrics[f"probe/{name}/pearson_to_parameter_space"] = ed.pearson(predictions[name][valid], exact[valid])
            if bool(spill.any()):  # where the per-token predictors claim nothing: is the spill-over first order?
                metrics[f"probe/{ed.PARAMETER_SPACE}/zero_adv_pearson"] = ed.pearson(exact[spill], measured[spill])
                metrics[f"probe/{ed.PARAMETER_SPACE}/zero_adv_r2"] = ed.absolute_agreement(exact, measured, spill)["r2"]
        record = {name: prediction[valid].float().cpu().numpy() for name, prediction in predictions.items()}
        record["measured"] = measured[valid].float().cpu().numpy()
        record["advantage"] = pending.advantages[valid].float().cpu().numpy()
        record["logprob"] = pending.logprobs[valid].float().cpu().numpy()
        record["entropy"] = pending.entropy_before[valid].float().cpu().numpy()
        record["step"] = np.full(int(valid.sum()), pending.step, dtype=np.int64)
        self.records.append(record)
        return metrics

    def _parameter_space(self, module, context: StepContext, pending: _PendingProbe,
                         predictions: dict[str, torch.Tensor], forward_seconds: float) -> dict[str, float]:
        """Adds the parameter-space prediction to ``predictions``; returns its cost metrics."""
        rollout, rows, width = context.rollout, pending.rows, pending.width
        before = pending.params_before
        live = dict(module.policy.named_parameters())
        delta = {name: live[name].detach() - value for name, value in before.items()}  # Adam's actual step

        def entropy_of(model: torch.nn.Module) -> torch.Tensor:
            # one plain forward under torch.func's forward-mode transform (no key/value cache in it)
            return module.logprobs_and_entropy(rollout, rows, width, model=model, share_prompts=False, pack=False)[1]

        started = time.perf_counter()
        try:
            _, change = ed.parameter_space_entropy_change(module.policy, entropy_of, before, delta)
        except (NotImplementedError, RuntimeError) as error:  # e.g. an op without a forward-mode rule
            log.warning("entropy_probe: the parameter-space predictor is off for the rest of the run, its "
                        "forward-mode JVP failed: %s", error)
            self.parameter_space = False
            return {}
        seconds = time.perf_counter() - started
        predictions[ed.PARAMETER_SPACE] = ed.parameter_space_prediction(change, pending.mask)
        return {
            "time/probe_jvp_s": seconds,
            "time/probe_jvp_per_forward": seconds / forward_seconds if forward_seconds > 0 else math.nan,
        }

    # ------------------------------------------------------------------ per-step statistics
    @staticmethod
    def _quadrant_metrics(advantages, logprobs, entropy, mask) -> dict[str, float]:
        ones = torch.ones_like(logprobs)
        prediction = ed.first_order_omega_prediction(advantages, ones, torch.zeros_like(mask, dtype=torch.bool), logprobs, entropy, mask)
        metrics = {}
        total = float(mask.sum())
        for quadrant, stats in ed.quadrant_statistics(advantages, logprobs, entropy, mask, prediction).items():
            for key, value in stats.items():
                metrics[f"quadrant/{quadrant}/{key}"] = value
            metrics[f"quadrant/{quadrant}/token_share"] = stats["tokens"] / total if total else math.nan
        return metrics

    @staticmethod
    def _entropy_metrics(context: StepContext) -> dict[str, float]:
        mask = context.rollout.response_mask.bool()
        entropy = context.old_entropy
        metrics = dict(zip(("entropy/p10", "entropy/p50", "entropy/p90"),
                           ed.nearest_rank_quantiles(entropy[mask], (0.1, 0.5, 0.9))))
        n = context.rewards.shape[1]
        sources = [metric_safe(record.data_source) for record in context.batch.records for _ in range(n)]
        for source in sorted(set(sources)):
            rows = torch.tensor([s == source for s in sources], device=mask.device)
            selected = mask & rows[:, None]
            metrics[f"entropy/source/{source}"] = float(entropy[selected].mean()) if bool(selected.any()) else math.nan
        return metrics

    def _steer_metrics(self, module, context: StepContext, keep_weights: bool) -> dict[str, float]:
        metrics: dict[str, float] = {}
        for intervention in module.interventions:
            if not isinstance(intervention, SteerReweighting):
                continue
            weights, omega = steer_weights_on_policy(module, context, intervention)
            mask = context.rollout.response_mask
            for key, value in ed.steer_diagnostics(weights, omega, context.old_logprobs, mask).items():
                metrics[f"steer_diag/{intervention.name}/{key}"] = value
            if keep_weights:
                self.steer_weights.setdefault(intervention.name, []).append(weights[mask.bool()].float().cpu().numpy())
        return metrics

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict:
        """What the end-of-run figures and summary need from the steps before a resume (as tensors)."""
        return {
            "records": [{k: torch.from_numpy(v) for k, v in record.items()} for record in self.records],
            "steer_weights": {k: [torch.from_numpy(c) for c in chunks] for k, chunks in self.steer_weights.items()},
            "metric_history": {k: [(int(s), float(v)) for s, v in points] for k, points in self.metric_history.items()},
            "warned_no_step": self._warned_no_step,
        }

    def load_state_dict(self, state: dict) -> None:
        self.records = [{k: v.numpy() for k, v in record.items()} for record in state["records"]]
        self.steer_weights = {k: [c.numpy() for c in chunks] for k, chunks in state["steer_weights"].items()}
        self.metric_history = {k: [tuple(p) for p in points] for k, points in state["metric_history"].items()}
        self._warned_no_step = state["warned_no_step"]

    # ------------------------------------------------------------------ end of run
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        metrics = getattr(pl_module, "last_metrics", None)
        if not metrics:
            return
        step = pl_module.rl_step - 1
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and math.isfinite(float(value)):
                self.metric_history.setdefault(key, []).append((step, float(value)))

    def on_train_end(self, trainer, pl_module) -> None:
        summary = self.summary()
        if summary:
            for logger in pl_module.loggers:
                logger.log_metrics(summary, step=max(pl_module.rl_step - 1, 0))

    def on_fit_end(self, trainer, pl_module) -> None:
        # on_fit_end runs after every callback's on_train_end: the final evaluation is in by now.
        if not trainer.is_global_zero:  # one rank writes the files (each rank probes its own rows)
            return
        for callback in trainer.callbacks:
            results = getattr(callback, "history", None)
            for result in results if isinstance(results, list) else []:
                if hasattr(result, "benchmark") and hasattr(result, "metrics"):
                    for key, value in result.metrics.items():
                        self.metric_history.setdefault(f"eval/{result.benchmark}/{key}", []).append((result.step, float(value)))
        probe_data = self.probe_data()
        paths: list[Path] = []
        folder = self.output_dir or Path(trainer.default_root_dir)
        data_path = folder / "entropy_probe" / "probe_data.npz"
        if probe_data:
            data_path.parent.mkdir(parents=True, exist_ok=True)
            np.savez_compressed(data_path, **probe_data)
        if self.figures:
            paths = write_figures(self.metric_history, probe_data, folder / "figures", self.figures)
        mlflow_logger = next((lg for lg in trainer.loggers if isinstance(lg, MLFlowLogger)), None)
        if mlflow_logger is not None:
            try:
                if probe_data:
                    mlflow_logger.experiment.log_artifact(mlflow_logger.run_id, str(data_path), "entropy_probe")
                for path in paths:
                    mlflow_logger.experiment.log_artifact(mlflow_logger.run_id, str(path), "figures")
            except Exception as error:  # an artifact store problem must not fail a finished run
                log.warning("entropy_probe: could not log artifacts to MLflow: %s", error)

    def probe_data(self) -> dict[str, np.ndarray]:
        """Per-token probe data of every probe step, concatenated (the scatter's input)."""
        data: dict[str, np.ndarray] = {}
        if self.records:
            # a key missing from some probe (the parameter-space predictor turned off mid-run) is left out
            for key in self.records[0]:
                if all(key in record for record in self.records):
                    data[key] = np.concatenate([record[key] for record in self.records])
        for name, chunks in self.steer_weights.items():
            data[f"steer_weights/{name}"] = np.concatenate(chunks)
        return data

    def summary(self) -> dict[str, float]:
        """Agreement pooled over every probe token, one scale per predictor (``probe_summary/...``)."""
        data = self.probe_data()
        if "measured" not in data:
            return {}
        measured = torch.from_numpy(data["measured"]).double()
        steps = data["step"]
        measured_sums = np.array([data["measured"][steps == s].sum() for s in np.unique(steps)], dtype=np.float64)
        metrics: dict[str, float] = {"probe_summary/tokens": float(measured.numel())}
        for name in (name for name in ed.PREDICTORS if name in data):
            predicted = torch.from_numpy(data[name]).double()
            stats = ed.compare_prediction(predicted, measured, torch.ones_like(measured, dtype=torch.bool))
            if name == ed.PARAMETER_SPACE:
                for key, value in ed.absolute_agreement(predicted, measured, torch.ones_like(measured, dtype=torch.bool)).items():
                    metrics[f"probe_summary/{name}/{key}"] = value
            for key in ("pearson", "spearman", "sign_agreement", "pearson_top10", "sign_agreement_top10", "scale",
                        "relative_error"):
                metrics[f"probe_summary/{name}/{key}"] = stats[key]
            predicted_sums = np.array([data[name][steps == s].sum() for s in np.unique(steps)], dtype=np.float64)
            scaled = stats["scale"] * predicted_sums
            metrics[f"probe_summary/{name}/sum_pearson"] = ed.pearson(torch.from_numpy(predicted_sums), torch.from_numpy(measured_sums))
            denominator = np.abs(measured_sums).sum()
            metrics[f"probe_summary/{name}/sum_relative_error"] = (
                float(np.abs(scaled - measured_sums).sum() / denominator) if denominator > 0 else math.nan
            )
        return finite_only(metrics)


def steer_weights_on_policy(module, context: StepContext, intervention: SteerReweighting) -> tuple[torch.Tensor, torch.Tensor]:
    """The weights a STEER-type intervention gives every token of the RL step, and its signed Omega.

    Evaluated at the rollout policy (ratio 1, nothing clipped: exact for the first optimiser step)
    through the intervention's own ``token_weights``, with the trainer's mini-batch / micro-batch
    split, so that ``scope`` and normalisers behave as in the update. Returns two ``[B, R]`` tensors
    (weights 1 and Omega 0 on padding).
    """
    rollout = context.rollout
    weights = torch.ones_like(context.old_logprobs, dtype=torch.float64)
    omega = torch.zeros_like(weights)
    clip = effective_clip(module.clip, module.interventions)
    for rows in module.minibatch_rows(rollout.response_ids.shape[0]):
        width = int(rollout.response_lengths[rows].max().clamp(min=1))
        logprobs = context.old_logprobs[rows, :width]
        entropy = context.old_entropy[rows, :width]
        tokens = PolicyTokens(logprobs, entropy, logprobs, entropy, context.advantages[rows].expand(-1, width),
                              rollout.response_mask[rows, :width])
        ppo = ppo_token_loss(tokens.logprobs, tokens.old_logprobs, tokens.advantages, clip)
        if intervention.needs_minibatch_pass:
            intervention.begin_minibatch(tokens, ppo)
        for part in module.microbatches(rollout, rows):  # positions in rows, in the update's order
            sub = PolicyTokens(*(t[part] for t in (tokens.logprobs, tokens.entropy, tokens.old_logprobs,
                                                   tokens.old_entropy, tokens.advantages, tokens.mask)), minibatch_rows=part)
            sub_ppo = ppo_token_loss(sub.logprobs, sub.old_logprobs, sub.advantages, clip)
            weights[rows[part], :width] = intervention.token_weights(sub, sub_ppo, {}).double()
        omega[rows, :width] = intervention.signed_omega(tokens, ppo)
    return weights, omega * context.rollout.response_mask


# --------------------------------------------------------------------------- figures


def _series(history: Mapping[str, list[tuple[int, float]]], key: str) -> tuple[np.ndarray, np.ndarray]:
    points = sorted(history.get(key, []))
    return np.array([p[0] for p in points], dtype=float), np.array([p[1] for p in points], dtype=float)


def _smooth(values: np.ndarray, window: int) -> np.ndarray:
    if values.size < window or window <= 1:
        return values
    kernel = np.ones(window) / window
    padded = np.concatenate([np.full(window - 1, values[0]), values])
    return np.convolve(padded, kernel, mode="valid")


def write_figures(
    history: Mapping[str, list[tuple[int, float]]],
    probe_data: Mapping[str, np.ndarray],
    folder: Path,
    which: Sequence[str] = FIGURES,
) -> list[Path]:
    """Draw the requested figures as PNGs in ``folder``; skips a figure whose data is missing.

    Args:
        history: metric name -> ``[(step, value)]`` (the run's MLflow metric histories).
        probe_data: the arrays of ``probe_data.npz`` (may be empty).
    Returns:
        The paths written.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []

    def save(fig, name: str) -> None:
        path = folder / f"{name}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=80)
        plt.close(fig)
        written.append(path)

    eval_keys = sorted(k for k in history if k.startswith("eval/"))
    if "entropy" in which and history.get("actor/entropy"):
        fig, ax = plt.subplots(figsize=(6, 3.5))
        steps, values = _series(history, "actor/entropy")
        ax.plot(steps, values, label="train token entropy (mean)", color="C0")
        if history.get("entropy/p10") and history.get("entropy/p90"):
            s10, p10 = _series(history, "entropy/p10")
            s90, p90 = _series(history, "entropy/p90")
            if len(s10) == len(s90):
                ax.fill_between(s10, p10, p90, alpha=0.15, color="C0", label="p10-p90")
        if history.get("entropy/p50"):
            ax.plot(*_series(history, "entropy/p50"), color="C0", linestyle=":", label="median")
        for i, key in enumerate(k for k in eval_keys if k.endswith("/entropy")):
            s, v = _series(history, key)
            ax.plot(s, v, "o--", color=f"C{i + 1}", label=f"held-out {key.split('/')[1]}")
        ax.set_xlabel("RL step")
        ax.set_ylabel("entropy (nats)")
        ax.legend(fontsize=7)
        save(fig, "entropy")
    if "accuracy" in which and history.get("reward/accuracy"):
        fig, ax = plt.subplots(figsize=(6, 3.5))
        steps, values = _series(history, "reward/accuracy")
        ax.plot(steps, _smooth(values, 10), label="train accuracy (10-step mean)", color="C0")
        for i, key in enumerate(k for k in eval_keys if "/mean_at_" in k):
            s, v = _series(history, key)
            ax.plot(s, v, "o--", color=f"C{i + 1}", label=f"held-out {key.split('/', 1)[1]}")
        ax.set_xlabel("RL step")
        ax.set_ylabel("accuracy")
        ax.set_ylim(0, 1)
        ax.legend(fontsize=7)
        save(fig, "accuracy")
    if "scatter" in which and "measured" in probe_data and len(probe_data["measured"]):
        measured = np.asarray(probe_data["measured"], dtype=np.float64)
        names = [name for name in ed.PREDICTORS if name in probe_data]
        fig, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 3.6), squeeze=False)
        keep = np.random.default_rng(0).permutation(measured.size)[:5000]
        for ax, name in zip(axes[0], names):
            predicted = np.asarray(probe_data[name], dtype=np.float64)
            stats = ed.compare_prediction(torch.from_numpy(predicted), torch.from_numpy(measured),
                                          torch.ones(measured.size, dtype=torch.bool))
            ax.scatter(stats["scale"] * predicted[keep], measured[keep], s=3, alpha=0.4)
            low, high = np.percentile(np.concatenate([measured, stats["scale"] * predicted]), [0.5, 99.5])
            ax.plot([low, high], [low, high], "k--", linewidth=0.8)
            ax.set_xlabel(f"{name} x fitted scale")
            ax.set_ylabel("measured dH")
            ax.set_title(f"{name}: r={stats['pearson']:.2f} rho={stats['spearman']:.2f} sign={stats['sign_agreement']:.2f}",
                         fontsize=8)
        save(fig, "predicted_vs_measured")
    if "quadrants" in which and history.get(f"quadrant/{ed.QUADRANTS[0]}/predicted_sum"):
        fig, axes = plt.subplots(2, 1, figsize=(6, 5), sharex=True)
        series = {q: _series(history, f"quadrant/{q}/predicted_sum") for q in ed.QUADRANTS}
        shares = {q: _series(history, f"quadrant/{q}/token_share") for q in ed.QUADRANTS}
        steps = series[ed.QUADRANTS[0]][0]
        bins = max(1, int(math.ceil(len(steps) / 40)))  # at most ~40 bars
        starts = steps[::bins]
        for panel, data, label in ((axes[0], shares, "token share"), (axes[1], series, "summed predicted dH")):
            bottom_pos = np.zeros(len(starts))
            bottom_neg = np.zeros(len(starts))
            for i, q in enumerate(ed.QUADRANTS):
                values = data[q][1]
                if len(values) != len(steps):
                    continue
                means = np.array([values[j : j + bins].mean() for j in range(0, len(values), bins)])
                bottom = np.where(means >= 0, bottom_pos, bottom_neg)
                panel.bar(starts, means, width=bins * 0.9, bottom=bottom, color=f"C{i}", label=q, align="edge")
                bottom_pos += np.where(means >= 0, means, 0)
                bottom_neg += np.where(means < 0, means, 0)
            panel.set_ylabel(label)
        axes[0].legend(fontsize=7, ncol=2)
        axes[1].set_xlabel("RL step")
        save(fig, "quadrants")
    weight_keys = [k for k in probe_data if k.startswith("steer_weights/")]
    if "steer_weights" in which and weight_keys:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for i, key in enumerate(weight_keys):
            weights = np.asarray(probe_data[key], dtype=np.float64)
            ax.hist(weights, bins=50, alpha=0.6, color=f"C{i}",
                    label=f"{key.split('/', 1)[1]}: mean {weights.mean():.4f}, <0.99: {(weights < 0.99).mean():.1%}")
        ax.set_yscale("log")
        ax.set_xlabel("token weight")
        ax.set_ylabel("tokens (probe steps)")
        ax.legend(fontsize=7)
        save(fig, "steer_weights")
    return written
