"""Held-out / benchmark evaluation as a Lightning callback: before training, every N steps, at the end.

Each benchmark samples ``samples_per_prompt`` responses per prompt with its own sampling settings,
scores them with a reward, and logs ``eval/<benchmark>/mean_at_<k>`` (accuracy averaged over the k
samples) and ``eval/<benchmark>/entropy`` (token-mean entropy of the evaluation samples). Results
also go to ``eval_results.jsonl`` in the run folder, one line per (step, benchmark).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import lightning as L
import numpy as np
import torch

from steer.algo.aggregation import masked_mean
from steer.algo.logprobs import response_logprobs_and_entropy
from steer.data.prompts import encode_prompts
from steer.data.records import PromptRecord
from steer.rewards.base import Reward
from steer.rollout.base import SamplingParams

log = logging.getLogger(__name__)


@dataclass
class Benchmark:
    name: str
    records: list[PromptRecord]
    samples_per_prompt: int = 4
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 40
    reward: Reward | None = None
    """None: the trainer's reward."""
    batch_prompts: int = 64
    """Prompts generated together."""


@dataclass
class EvalResult:
    step: int
    benchmark: str
    metrics: dict[str, float]
    seconds: float
    num_prompts: int = 0
    extra: dict = field(default_factory=dict)


def evaluate_benchmark(module, benchmark: Benchmark, max_prompt_length: int) -> dict[str, float]:
    """Generate, score and summarise one benchmark with the module's policy and rollout engine."""
    reward = benchmark.reward or module.reward
    records, prompt_ids, dropped = encode_prompts(
        benchmark.records, module.tokenizer, max_prompt_length, what=f"{benchmark.name} prompts"
    )
    k = benchmark.samples_per_prompt
    params = SamplingParams(benchmark.temperature, benchmark.top_p, benchmark.max_new_tokens, n=k)
    correct_rows, entropy_sum, token_count = [], 0.0, 0.0
    module.rollout_engine.sync_weights(module.policy)
    for start in range(0, len(records), benchmark.batch_prompts):
        chunk = records[start : start + benchmark.batch_prompts]
        rollout = module.rollout_engine.generate(prompt_ids[start : start + benchmark.batch_prompts], params)
        responses = module.tokenizer.batch_decode(rollout.response_ids, skip_special_tokens=True)
        scored = reward(responses, [r.reference for r in chunk for _ in range(k)])
        correct_rows.append(np.asarray(scored.correct, dtype=float).reshape(len(chunk), k))
        with torch.no_grad():
            width = rollout.response_ids.shape[1]
            _, entropy = response_logprobs_and_entropy(
                module.policy, rollout.input_ids, rollout.attention_mask, width, temperature=benchmark.temperature
            )
        mask = rollout.response_mask
        entropy_sum += float((entropy * mask).sum())
        token_count += float(mask.sum())
    correct = np.concatenate(correct_rows) if correct_rows else np.zeros((0, k))
    return {
        f"mean_at_{k}": float(correct.mean()) if correct.size else 0.0,
        "entropy": entropy_sum / max(token_count, 1.0),
        "prompts": float(len(records)),
        "dropped_prompts": float(dropped),
    }


class EvaluationCallback(L.Callback):
    """Evaluates ``benchmarks`` at step 0, every ``every_n_steps`` RL steps and after the last step."""

    def __init__(self, benchmarks: Sequence[Benchmark], every_n_steps: int = 50, max_prompt_length: int = 1024,
                 output_file: str | None = None) -> None:
        if every_n_steps < 1:
            raise ValueError(f"eval.every_n_steps must be >= 1, got {every_n_steps}")
        self.benchmarks = list(benchmarks)
        self.every_n_steps = every_n_steps
        self.max_prompt_length = max_prompt_length
        self.output_file = Path(output_file) if output_file else None
        self.history: list[EvalResult] = []
        self._last_evaluated_step = -1

    def run(self, module, loggers=None) -> list[EvalResult]:
        """Evaluate every benchmark now; log to ``loggers`` (default: the module's)."""
        loggers = module.loggers if loggers is None else loggers
        was_training = module.policy.training
        module.policy.eval()
        results = []
        for benchmark in self.benchmarks:
            start = time.perf_counter()
            metrics = evaluate_benchmark(module, benchmark, self.max_prompt_length)
            result = EvalResult(module.rl_step, benchmark.name, metrics, time.perf_counter() - start, int(metrics["prompts"]))
            results.append(result)
            for logger in loggers:
                logger.log_metrics({f"eval/{benchmark.name}/{k}": v for k, v in metrics.items()}, step=module.rl_step)
            log.info("eval step %d %s: %s", module.rl_step, benchmark.name,
                     ", ".join(f"{k} {v:.3f}" for k, v in metrics.items()))
            if self.output_file is not None:
                self.output_file.parent.mkdir(parents=True, exist_ok=True)
                with self.output_file.open("a") as handle:
                    handle.write(json.dumps(result.__dict__) + "\n")
        module.policy.train(was_training)
        self.history.extend(results)
        self._last_evaluated_step = module.rl_step
        return results

    def on_train_start(self, trainer: L.Trainer, module) -> None:
        self.run(module)

    def on_train_batch_end(self, trainer: L.Trainer, module, outputs, batch, batch_idx: int) -> None:
        if module.rl_step % self.every_n_steps == 0 and module.rl_step != self._last_evaluated_step:
            self.run(module)

    def on_train_end(self, trainer: L.Trainer, module) -> None:
        if module.rl_step != self._last_evaluated_step:
            self.run(module)
