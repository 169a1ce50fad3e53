"""The LightningModule: policy, optional reference model, optimiser, and one RL step.

:meth:`RLVRModule.training_step` is the whole algorithm, top to bottom:

    prompts -> rollout (n samples each) -> reward -> group advantages
            -> old log-probs / entropy (no grad) -> for each mini-batch: forward -> policy loss
               with interventions -> backward -> clip -> optimiser step -> metrics

Optimisation is manual because one rollout batch feeds several optimiser steps.
"""

from __future__ import annotations

import copy
import logging
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import lightning as L
import torch

from steer.algo.advantages import group_advantages
from steer.algo.aggregation import masked_mean
from steer.algo.batching import token_budget_microbatches
from steer.algo.interventions import assemble_interventions
from steer.algo.interventions.base import ClipConfig, Intervention
from steer.algo.interventions.rollout_correction import mismatch_statistics
from steer.algo.logprobs import response_logprobs_and_entropy
from steer.algo.policy_loss import LossTotals, begin_minibatch, policy_loss
from steer.checkpointing import CHECKPOINT_DIR, collect_rng_states, restore_rng_states, save_atomically
from steer.config import AlgorithmConfig
from steer.data.records import PromptBatch
from steer.distributed import check_world_size, gather_objects, max_over_ranks, min_over_ranks, sum_over_ranks
from steer.models.functional import supports_functional
from steer.observers import StepContext, StepObserver
from steer.optimizer import adamw_implementation
from steer.rewards.base import Reward, RewardOutput, score_safely
from steer.rollout.base import RolloutBatch, RolloutEngine, SamplingParams
from steer.step_metrics import MetricAccumulator, PhaseTimer

log = logging.getLogger(__name__)


class NonFiniteError(RuntimeError):
    """Too many consecutive optimiser steps had a non-finite loss or gradient."""


@dataclass
class AccumulatedGradients:
    """What one mini-batch's forward and backward leave for its optimiser step (:meth:`RLVRModule._apply_gradients`)."""

    metrics: MetricAccumulator
    """The micro-batches' loss metrics, token-weighted."""
    loss_sum: torch.Tensor
    """The summed (detached) loss of the micro-batches: a non-finite one skips the optimiser step."""


class RLVRModule(L.LightningModule):
    def __init__(
        self,
        policy: torch.nn.Module,
        tokenizer,
        rollout_engine: RolloutEngine,
        reward: Reward,
        algorithm: AlgorithmConfig,
        sampling: SamplingParams,
        interventions: Sequence[Intervention] = (),
        compile_layers: bool = False,
    ) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.policy = policy
        self.tokenizer = tokenizer
        self.rollout_engine = rollout_engine
        self.reward = reward
        self.algorithm = algorithm
        self.sampling = sampling
        self.compile_layers = compile_layers
        """``model.compile``: the hand-applied layers of the packed + shared forwards through ``torch.compile``."""
        self.clip = ClipConfig(algorithm.clip.low, algorithm.clip.high, algorithm.clip.dual)
        # The configured interventions, then the KL penalty and the rollout correction when they are on.
        self.interventions = assemble_interventions(interventions, algorithm)
        # The reference model exists only when the KL penalty is on: it costs a model's memory.
        self.reference: torch.nn.Module | None = None
        if algorithm.kl.coef > 0:
            self.reference = copy.deepcopy(policy).eval().requires_grad_(False)
        self.observers: list[StepObserver] = []
        self.rl_step = 0
        self._warned_on_policy = False
        self.nonfinite_skips = 0
        """Optimiser steps skipped for a non-finite loss or gradient, over the whole run."""
        self._consecutive_nonfinite = 0
        self._rng_to_restore: dict | None = None
        self._reseed_after_restore = False

    # ------------------------------------------------------------------ optimiser
    def configure_optimizers(self):
        parameters = list(self.policy.parameters())
        optimizer = torch.optim.AdamW(
            parameters,
            lr=self.algorithm.lr,
            weight_decay=self.algorithm.weight_decay,
            betas=tuple(self.algorithm.betas),
            **adamw_implementation(parameters),
        )
        warmup = max(self.algorithm.lr_warmup_steps, 0)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / (warmup + 1)))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    @property
    def optimizer_steps_per_batch(self) -> int:
        return self.algorithm.epochs * (self.algorithm.prompts_per_step // self.algorithm.minibatch_prompts)

    # ------------------------------------------------------------------ the RL step
    def training_step(self, batch: PromptBatch, batch_idx: int) -> None:
        algo, timer, n = self.algorithm, PhaseTimer(), self.sampling.n
        batch = self._same_prompt_count_on_every_rank(batch)
        if not batch.prompt_ids:
            log.warning("step %d: every prompt of the batch was dropped (too long); no update", self.rl_step)
            empty = MetricAccumulator()
            empty.add({"batch/prompts": 0.0, "batch/dropped_prompts": float(batch.dropped)}, how="sum")
            self._finish_step(empty.reduce_over_ranks().result())
            return

        # 1. Rollout: n responses per prompt, adjacent rows per group (each rank samples its own prompts).
        with timer("rollout"):
            self.rollout_engine.sync_weights(self.policy)
            rollout = self.rollout_engine.generate(batch.prompt_ids, self.sampling)

        # 2. Reward: one scalar per response.
        with timer("reward"):
            responses = self.tokenizer.batch_decode(rollout.response_ids, skip_special_tokens=True)
            references = [record.reference for record in batch.records for _ in range(n)]
            scored = score_safely(self.reward, responses, references)
            rewards = torch.tensor(scored.scores, dtype=torch.float32, device=self.device).view(-1, n)

        # 3. Group-normalised advantages, broadcast over each response's tokens.
        lengths = rollout.response_lengths.view(-1, n).float()
        advantages = group_advantages(rewards, algo.estimator, lengths).view(-1, 1)

        # 4. Log-probs and entropy of pi_old (and pi_ref) at every sampled token, no gradient. The first
        #    mini-batch's forward in phase 5 runs on pi_old itself, so it fills in their values (see
        #    reuse_update_logprobs) and only the other mini-batches' policy values are scored here.
        reuse_update_logprobs = self.reuse_update_logprobs
        with timer("old_logprobs"):
            old_logprobs, old_entropy, ref_logprobs = self._score_without_grad(rollout, reuse_update_logprobs)

        context = StepContext(
            step=self.rl_step, batch=batch, rollout=rollout, rewards=rewards, advantages=advantages,
            old_logprobs=old_logprobs, old_entropy=old_entropy, metrics={}, ref_logprobs=ref_logprobs,
        )

        def before_update() -> None:  # once the old values are complete, before the weights change
            with timer("observers"), torch.no_grad():
                for observer in self.observers:
                    observer.before_update(self, context)

        if not reuse_update_logprobs:
            before_update()

        # 5. Policy update: mini-batches of whole groups, micro-batches for memory.
        update_metrics, index = MetricAccumulator(), 0
        for _ in range(algo.epochs):
            for rows in self.minibatch_rows(rollout.response_ids.shape[0]):
                reuse_here = reuse_update_logprobs and index == 0  # this mini-batch's forward supplies its old values
                with timer("update"):
                    accumulated = self._accumulate_gradients(context, rows, reuse_update_logprobs=reuse_here)
                if reuse_here:
                    before_update()
                with timer("update"):
                    step_metrics = self._apply_gradients(accumulated)
                update_metrics.add(step_metrics, weight=1.0)
                with timer("observers"), torch.no_grad():
                    for observer in self.observers:
                        observer.after_optimizer_step(self, context, rows, index)
                index += 1

        # 6. Metrics of this RL step, reduced over ranks (the update's already are).
        metrics = self._step_metrics(context, scored, timer)
        reduced = {**update_metrics.result(), **metrics.reduce_over_ranks().result()}
        for intervention in self.interventions:  # every rank sees the same reduced metrics: controllers stay in step
            intervention.after_rl_step(reduced)
        self._finish_step(reduced)

    def _step_metrics(self, context: StepContext, scored: RewardOutput, timer: PhaseTimer) -> MetricAccumulator:
        """This rank's metrics of the RL step, before the reduction over ranks: means weighted by samples,
        tokens or prompts, counts summed, maxima and phase times (the slowest rank) maximised."""
        rollout, rewards, batch = context.rollout, context.rewards, context.batch
        old_logprobs, old_entropy, advantages = context.old_logprobs, context.old_entropy, context.advantages
        mask = rollout.response_mask
        samples, tokens, prompts = float(mask.shape[0]), float(mask.sum()), float(len(batch.prompt_ids))
        metrics = MetricAccumulator()
        metrics.add({**context.metrics, **self._ratio_inert_metric()})
        metrics.add(timer.seconds, how="max")
        metrics.add({"response/length_max": rollout.response_lengths.max().item()}, how="max")
        metrics.add(
            {
                "reward/mean": rewards.mean().item(),
                "reward/accuracy": sum(scored.correct) / len(scored.correct),
                **{f"reward/{key}": value for key, value in scored.extra.items()},
                "response/length_mean": rollout.response_lengths.float().mean().item(),
                "response/truncated_rate": rollout.truncated.float().mean().item(),
            },
            weight=samples,
        )
        metrics.add(
            {
                "actor/entropy": masked_mean(old_entropy, mask).item(),
                "actor/advantage_abs_mean": masked_mean(advantages.abs().expand_as(mask), mask).item(),
            },
            weight=tokens,
        )
        mismatch = mismatch_statistics(old_logprobs, rollout.sampling_logprobs, mask)
        metrics.add({key: value for key, value in mismatch.items() if not key.endswith("_max")}, weight=tokens)
        metrics.add({key: value for key, value in mismatch.items() if key.endswith("_max")}, how="max")
        metrics.add({"batch/zero_variance_group_rate": (rewards.std(-1) == 0).float().mean().item()}, weight=prompts)
        metrics.add(
            {
                "reward/error_count": float(scored.num_errors),
                "reward/timeout_count": float(scored.num_timeouts),
                "batch/prompts": prompts,
                "batch/dropped_prompts": float(batch.dropped),
            },
            how="sum",
        )
        metrics.add({"batch/optimizer_steps": float(self.optimizer_steps_per_batch)})
        return metrics

    def _finish_step(self, metrics: dict[str, float]) -> None:
        self._publish(metrics)
        self.rl_step += 1
        if self.rl_step >= self.algorithm.steps:
            self.trainer.should_stop = True

    def _accumulate_gradients(
        self, context: StepContext, rows: torch.Tensor, reuse_update_logprobs: bool = False
    ) -> AccumulatedGradients:
        """Forward and backward of the sequences ``rows`` of the rollout batch (this rank's share of
        the mini-batch), micro-batch by micro-batch, the loss normalised by the mini-batch totals over
        all ranks; returns what :meth:`_apply_gradients` needs (the metrics and the summed loss).

        ``reuse_update_logprobs`` (see :attr:`reuse_update_logprobs`): the rows' ``context.old_logprobs``
        and ``context.old_entropy`` are still zeros; each micro-batch's forward writes its detached
        values into them before they are read."""
        rollout = context.rollout
        optimizer = self.optimizers()
        mask = rollout.response_mask[rows]
        tokens_all, sequences_all = sum_over_ranks(float(mask.sum().item()), float(len(rows)), device=self.device)
        totals = LossTotals(
            tokens=tokens_all,
            sequences=sequences_all,
            max_response_length=self.sampling.max_new_tokens,
            data_parallel_size=self.data_parallel_size,
        )
        # The micro-batches, as positions in rows, in the order they run (sorted by length under a
        # token budget); each is cut to its own longest prompt and response. The mini-batch pass of
        # scope-global interventions sees the rows in their own order, and every micro-batch tells
        # them its positions: their selections do not depend on how the mini-batch is split.
        parts = self.microbatches(rollout, rows)
        if any(intervention.needs_minibatch_pass for intervention in self.interventions):
            logprobs = torch.zeros(len(rows), self.response_width(rollout, rows), device=self.device)
            entropy = torch.zeros_like(logprobs)
            with torch.no_grad():  # micro-batch by micro-batch, as the update's forwards (memory)
                for part in parts:
                    width = self.response_width(rollout, rows[part])
                    logprobs[part, :width], entropy[part, :width] = self.logprobs_and_entropy(rollout, rows[part], width)
                whole = context.policy_tokens(rows, logprobs, entropy)
            begin_minibatch(whole, self.clip, self.interventions)

        optimizer.zero_grad(set_to_none=True)
        metrics, loss_sum = MetricAccumulator(), torch.zeros((), device=self.device)
        for index, part in enumerate(parts):
            micro = rows[part]
            width = self.response_width(rollout, micro)
            logprobs, entropy = self.logprobs_and_entropy(rollout, micro, width)
            if reuse_update_logprobs:  # the values phase 4 would have computed: same weights, same rows
                micro_mask = rollout.response_mask[micro, :width]
                context.old_logprobs[micro, :width] = logprobs.detach() * micro_mask
                context.old_entropy[micro, :width] = entropy.detach() * micro_mask
            tokens = context.policy_tokens(micro, logprobs, entropy, minibatch_rows=part)
            loss, micro_metrics = policy_loss(tokens, self.clip, self.interventions, self.algorithm.loss_aggregation, totals)
            # The strategy (DDP/FSDP) averages the ranks' gradients in the last micro-batch's backward
            # (the others accumulate locally), so then every rank holds the global mini-batch gradient.
            with self._gradient_sync(index == len(parts) - 1):
                self.manual_backward(loss)
            loss_sum += loss.detach()
            micro_tokens = max(float(tokens.mask.sum()), 1.0)
            micro_metrics["actor/policy_loss"] = loss.detach() / totals.data_parallel_size * totals.tokens / micro_tokens
            metrics.add(micro_metrics, weight=float(tokens.mask.sum()))
        return AccumulatedGradients(metrics, loss_sum)

    def _apply_gradients(self, accumulated: AccumulatedGradients) -> dict[str, float]:
        """Clip the accumulated gradients and take the optimiser step (skipped when the loss or the
        gradient norm is not finite); returns the optimiser step's metrics."""
        algo, optimizer = self.algorithm, self.optimizers()
        grad_norm = self._clip_gradients(algo.grad_clip if algo.grad_clip > 0 else float("inf"))
        loss_sum = accumulated.loss_sum
        finite = bool(torch.isfinite(loss_sum) and torch.isfinite(grad_norm))
        finite = self.trainer.strategy.reduce_boolean_decision(finite, all=True)  # every rank skips, or none
        if finite:
            optimizer.step()
            self.lr_schedulers().step()
            self._consecutive_nonfinite = 0
        else:
            optimizer.zero_grad(set_to_none=True)
            self._skip_nonfinite(float(loss_sum), float(grad_norm))
        result = accumulated.metrics.reduce_over_ranks().result()
        result["actor/grad_norm"] = float(grad_norm)
        result["actor/lr"] = optimizer.param_groups[0]["lr"]
        result["actor/nonfinite_skip_count"] = float(not finite)
        return result

    def _skip_nonfinite(self, loss: float, grad_norm: float) -> None:
        """Count a skipped optimiser step; after ``max_consecutive_nonfinite`` in a row, save the
        (unchanged, last good) state to ``checkpoints/nonfinite.ckpt`` and stop."""
        self.nonfinite_skips += 1
        self._consecutive_nonfinite += 1
        if self.nonfinite_skips == 1:  # one warning per run; the metric counts every skip
            log.warning("RL step %d: non-finite loss (%s) or gradient norm (%s); optimiser step skipped "
                        "(counted in actor/nonfinite_skip_count)", self.rl_step, loss, grad_norm)
        limit = self.algorithm.max_consecutive_nonfinite
        if limit and self._consecutive_nonfinite >= limit:
            folder = next((getattr(c, "dirpath", None) for c in self.trainer.checkpoint_callbacks), None)
            path = Path(folder or Path(self.trainer.default_root_dir) / CHECKPOINT_DIR) / "nonfinite.ckpt"
            save_atomically(self.trainer, path)
            raise NonFiniteError(
                f"RL step {self.rl_step}: {self._consecutive_nonfinite} consecutive optimiser steps had a non-finite "
                f"loss or gradient (algorithm.max_consecutive_nonfinite={limit}); stopped. The weights and "
                f"optimiser state before them are in {path}; the last periodic checkpoint (exact resume point) "
                f"is {path.with_name('last.ckpt')}. Try a lower algorithm.lr or a grad_clip."
            )

    @contextmanager
    def _gradient_sync(self, sync: bool) -> Iterator[None]:
        """DDP: without ``sync`` the backward only accumulates this rank's gradients (no all-reduce)."""
        wrapped = self._trainer.strategy.model if self._trainer is not None else None
        if sync or not isinstance(wrapped, torch.nn.parallel.DistributedDataParallel):
            yield
            return
        wrapped.require_backward_grad_sync = False  # what DDP.no_sync does; Lightning reads it before each backward
        try:
            yield
        finally:
            wrapped.require_backward_grad_sync = True

    def _clip_gradients(self, max_norm: float) -> torch.Tensor:
        """Clip to ``max_norm``; returns the global gradient norm before clipping (DDP: the gradients
        are already averaged; FSDP: they are sharded tensors whose norm is reduced over ranks)."""
        return torch.nn.utils.clip_grad_norm_(self.policy.parameters(), max_norm)

    @property
    def data_parallel_size(self) -> int:
        """Ranks whose gradients the strategy averages (1 without a trainer or in one process)."""
        return self._trainer.world_size if self._trainer is not None else 1

    def _same_prompt_count_on_every_rank(self, batch: PromptBatch) -> PromptBatch:
        """Every rank must make the same optimiser steps (their collectives pair up): when over-long
        prompts were dropped on some rank, every rank keeps only as many prompts as the fewest kept,
        and counts the rest as dropped."""
        if self.data_parallel_size == 1:
            return batch
        keep = min_over_ranks(len(batch.prompt_ids), device=self.device)
        if keep == len(batch.prompt_ids):
            return batch
        dropped = batch.dropped + len(batch.prompt_ids) - keep
        return PromptBatch(records=batch.records[:keep], prompt_ids=batch.prompt_ids[:keep], dropped=dropped)

    # ------------------------------------------------------------------ helpers
    @property
    def minibatch_sequences(self) -> int:
        """Sequences of this rank's share of one mini-batch (``minibatch_prompts`` is global)."""
        return self.algorithm.minibatch_prompts // self.data_parallel_size * self.sampling.n

    def minibatch_rows(self, num_sequences: int) -> list[torch.Tensor]:
        """Row indices of each mini-batch (this rank's share); whole groups stay together."""
        size = self.minibatch_sequences
        return [torch.arange(start, min(start + size, num_sequences)) for start in range(0, num_sequences, size)]

    def microbatches(self, rollout: RolloutBatch, rows: torch.Tensor, rows_per_forward: int | None = None) -> list[torch.Tensor]:
        """The micro-batches of one pass over the rollout rows ``rows``, as positions in ``rows``, in
        the order they run.

        With ``algorithm.micro_batch_tokens`` set: micro-batches of at most that many padded tokens
        (and at most ``micro_batch_size`` rows when that is set too), the rows sorted by length,
        longest first (:func:`steer.algo.batching.token_budget_microbatches`); under several ranks
        every rank makes as many as the rank that needs the most (FSDP's forwards are collectives).
        Otherwise consecutive slices of ``rows_per_forward`` rows (default ``micro_batch_size``, else
        all of ``rows`` at once)."""
        algo = self.algorithm
        if algo.micro_batch_tokens is None:
            size = rows_per_forward or algo.micro_batch_size or max(len(rows), 1)
            return [torch.arange(start, min(start + size, len(rows)), device=rows.device) for start in range(0, len(rows), size)]
        prompt_lengths, response_lengths = rollout.prompt_mask[rows].sum(-1).cpu(), rollout.response_lengths[rows].cpu()
        parts = token_budget_microbatches(prompt_lengths, response_lengths, algo.micro_batch_tokens, algo.micro_batch_size)
        if self.data_parallel_size > 1:
            count = max_over_ranks(len(parts), device=self.device)
            if count > len(parts):
                parts = token_budget_microbatches(prompt_lengths, response_lengths, algo.micro_batch_tokens,
                                                  algo.micro_batch_size, count=count)
        return [part.to(rows.device) for part in parts]

    @staticmethod
    def response_width(rollout: RolloutBatch, rows: torch.Tensor) -> int:
        """The longest response among ``rows`` (at least 1): the width their forward is cut to."""
        return int(rollout.response_lengths[rows].max().clamp(min=1))

    def logprobs_and_entropy(
        self, rollout: RolloutBatch, rows: torch.Tensor, width: int, model: torch.nn.Module | None = None,
        share_prompts: bool | None = None, pack: bool | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-probs of the sampled tokens and entropies, both ``[len(rows), width]``, at the first
        ``width`` response positions of the rollout rows ``rows`` (the policy unless ``model``), the
        prompts cut to the rows' longest.
        Carries gradient unless called under ``torch.no_grad()``. ``share_prompts``: run each
        prompt once for its adjacent samples (default ``algorithm.share_prompt_prefix``); ``pack``:
        leave the padding out (default ``algorithm.pack_sequences``)."""
        # Select the rows and cut the response first: concatenating the whole batch per micro-batch
        # would copy every sequence once per forward pass. Prompts are left-padded: the columns
        # before the rows' longest prompt are padding in every row, and are left out.
        prompt_mask = rollout.prompt_mask[rows]
        start = prompt_mask.shape[1] - int(prompt_mask.sum(-1).max())
        input_ids = torch.cat([rollout.prompt_ids[rows, start:], rollout.response_ids[rows, :width]], dim=1)
        attention = torch.cat([prompt_mask[:, start:], rollout.response_mask[rows, :width]], dim=1)
        return response_logprobs_and_entropy(
            model or self.policy,
            input_ids,
            attention,
            width,
            temperature=self.sampling.temperature,
            chunk_tokens=self.algorithm.logprob_chunk_tokens,
            share_prompts=self.algorithm.share_prompt_prefix if share_prompts is None else share_prompts,
            pack=self.algorithm.pack_sequences if pack is None else pack,
            compiled=self.compile_layers,
        )

    @property
    def reuse_update_logprobs(self) -> bool:
        """Whether the first mini-batch's old log-probs and entropies come from the update's forward
        (the phase-4 pass then scores only the other mini-batches; with one optimiser step per batch
        it is skipped, as TRL's GRPOTrainer does).

        The first optimiser step differentiates pi_old itself, so its forward over the same rows and
        width gives the same values. ``before_update`` observers (the entropy probe) then run after
        that mini-batch's backward and before its optimiser step: the old values are complete and the
        weights are still pi_old's. Not with an intervention that has a mini-batch pass: that pass
        reads the old values before the update's forward.
        """
        return not any(intervention.needs_minibatch_pass for intervention in self.interventions)

    def _score_without_grad(self, rollout: RolloutBatch, reuse_update_logprobs: bool = False):
        """``(old_logprobs, old_entropy, ref_logprobs)``, each ``[B, R]`` and 0 on padding (``ref``:
        None without a reference model). ``reuse_update_logprobs``: the policy's values of the first
        mini-batch's rows stay zeros (its update forward fills them in, see :attr:`reuse_update_logprobs`)."""
        num_rows, width = rollout.response_ids.shape
        per_forward = self.algorithm.micro_batch_size or self.minibatch_sequences

        def parts(first: int):  # the micro-batches of rows first.. and the width of their longest response
            rows = torch.arange(first, num_rows)
            for part in self.microbatches(rollout, rows, per_forward):
                yield rows[part], self.response_width(rollout, rows[part])

        old_logprobs = torch.zeros(num_rows, width, dtype=torch.float32, device=rollout.response_ids.device)
        old_entropy = torch.zeros_like(old_logprobs)
        ref_logprobs = torch.zeros_like(old_logprobs) if self.reference is not None else None
        with torch.no_grad():
            for rows, row_width in parts(min(self.minibatch_sequences, num_rows) if reuse_update_logprobs else 0):
                old_logprobs[rows, :row_width], old_entropy[rows, :row_width] = self.logprobs_and_entropy(rollout, rows, row_width)
            if ref_logprobs is not None:
                for rows, row_width in parts(0):
                    ref_logprobs[rows, :row_width] = self.logprobs_and_entropy(rollout, rows, row_width, self.reference)[0]
        mask = rollout.response_mask
        return old_logprobs * mask, old_entropy * mask, None if ref_logprobs is None else ref_logprobs * mask

    def _ratio_inert_metric(self) -> dict[str, float]:
        ratio_based = [i.name for i in self.interventions if i.uses_ratio]
        inert = bool(ratio_based) and self.optimizer_steps_per_batch == 1
        if inert and not self._warned_on_policy:
            self._warned_on_policy = True
            log.warning(
                "interventions %s act through the importance ratio, but each rollout batch gets one "
                "optimiser step (one mini-batch, one epoch): the ratio is identically 1 and they do nothing. "
                "Use algorithm.minibatch_prompts < algorithm.prompts_per_step or algorithm.epochs > 1.",
                ratio_based,
            )
        return {"intervention/ratio_inert": float(inert)}

    def _publish(self, metrics: dict[str, float]) -> None:
        """Every metric to the loggers at the RL step; the progress bar reads ``last_metrics``."""
        for logger in self.loggers:
            logger.log_metrics(metrics, step=self.rl_step)
        self.last_metrics = metrics

    def configure_model(self) -> None:
        # trainer=fsdp: the strategy shards the policy's decoder layers in place (FSDP2).
        shard = getattr(self.trainer.strategy, "shard", None)
        if shard is not None:
            shard(self.policy)

    def setup(self, stage: str) -> None:
        # devices=auto is only resolved now: the batch knobs must divide over the actual ranks.
        check_world_size(self.algorithm, self.data_parallel_size)

    def on_fit_start(self) -> None:
        self.policy.train()  # from_pretrained returns modules in eval mode
        if self.algorithm.pack_sequences and self.algorithm.share_prompt_prefix and not supports_functional(self.policy):
            log.warning("algorithm.pack_sequences and algorithm.share_prompt_prefix together need a Qwen2/Llama-family "
                        "policy that is not sharded by FSDP (%s here): the forwards pack without sharing prompts%s",
                        type(self.policy).__name__, " (and model.compile has nothing to compile)" if self.compile_layers else "")
        if self.global_rank > 0:
            # Every rank was seeded alike: without this each would sample its prompts with the same
            # random numbers. Rank 0 keeps the seed (one process is unchanged); interventions that
            # select tokens over all ranks use their own generators, seeded alike on every rank.
            torch.manual_seed(torch.initial_seed() + 1_000_003 * self.global_rank)

    def on_train_start(self) -> None:
        if self.rl_step >= self.algorithm.steps:  # resumed from the final checkpoint: nothing to do
            log.warning("resumed at RL step %d >= algorithm.steps=%d: no training left", self.rl_step, self.algorithm.steps)
            self.trainer.should_stop = True

    def on_train_batch_start(self, batch, batch_idx: int):
        if self.rl_step >= self.algorithm.steps:
            return -1  # Lightning: end the (endless) epoch without running the step
        if self._rng_to_restore is not None:
            # Restored here, right before the first resumed step, not in on_load_checkpoint: nothing
            # Lightning does in between (building loaders and iterators, start hooks) may shift the streams.
            restore_rng_states(self._rng_to_restore)
            self._rng_to_restore = None
            if self._reseed_after_restore:  # a re-sharded resume: keep the ranks' streams apart
                torch.manual_seed(torch.initial_seed() + 1_000_003 * self.global_rank + self.rl_step)
        return None

    # ------------------------------------------------------------------ checkpointing
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["rl_step"] = self.rl_step
        checkpoint["interventions"] = [i.state_dict() for i in self.interventions]
        # Every rank's random generators (ranks sample with their own streams); a collective: Lightning
        # calls this hook on every rank while saving, and rank 0 writes the file.
        checkpoint["rng"] = gather_objects(collect_rng_states())
        checkpoint["nonfinite"] = {"skips": self.nonfinite_skips, "consecutive": self._consecutive_nonfinite}
        mlflow = next((logger for logger in self.loggers if hasattr(logger, "run_id") and hasattr(logger, "_tracking_uri")), None)
        if mlflow is not None:  # the run a resume continues (steer.checkpointing.read_resume_info)
            checkpoint["mlflow_run"] = {"run_id": mlflow.run_id, "tracking_uri": mlflow._tracking_uri}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.rl_step = checkpoint.get("rl_step", 0)
        for intervention, state in zip(self.interventions, checkpoint.get("interventions", [])):
            intervention.load_state_dict(state)
        states = checkpoint.get("rng")
        if isinstance(states, dict):  # saved by one process
            states = [states]
        if states and len(states) != self.data_parallel_size:
            log.warning("resuming with %d ranks from a checkpoint of %d: every rank restores rank 0's random "
                        "state and re-seeds by rank, so the sampled responses differ from an uninterrupted run",
                        self.data_parallel_size, len(states))
        self._rng_to_restore = states[self.global_rank] if states and len(states) == self.data_parallel_size else (states or [None])[0]
        self._reseed_after_restore = bool(states) and len(states) != self.data_parallel_size and self.global_rank > 0
        nonfinite = checkpoint.get("nonfinite", {})
        self.nonfinite_skips = nonfinite.get("skips", 0)
        self._consecutive_nonfinite = nonfinite.get("consecutive", 0)
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        if datamodule is not None and hasattr(datamodule, "start_step"):
            datamodule.start_step = self.rl_step  # the loader yields the batch of step rl_step next
