"""Benchmark evaluation as a Lightning callback: before training, every N steps, at the end.

Each benchmark samples ``k`` responses per prompt with its own sampling settings, scores them with
a reward and logs, under ``eval/<benchmark>/``:

- ``mean_at_<k>``: accuracy averaged over the k samples of each prompt, then over prompts (avg@k);
- ``pass_at_<j>`` for each j of ``pass_at_k``: the unbiased estimator of Chen et al. (2021) from
  all k samples;
- ``maj_at_<j>`` for each j of ``maj_at_k``: accuracy of the majority answer among the first j
  samples (only with a reward that can extract answers, e.g. :class:`~steer.rewards.math.MathReward`);
- with a ``diversity`` signature (e.g. the arithmetic task's addition order): ``distinct_solutions``
  (distinct signatures among a prompt's correct samples), ``solution_entropy`` (nats), both averaged
  over the prompts with at least one correct sample (``diversity_prompts`` of them), and
  ``unparsed_solution_share``;
- each of those with a percentile-bootstrap 95% interval over prompts: ``<metric>_ci_low`` / ``_ci_high``;
- ``entropy`` (token-mean entropy of the sampled positions, at the sampling temperature, before
  top-p), ``response_length_mean``, ``truncated_rate``,
  ``prompts``, ``dropped_prompts``.

A record with ``num_copies > 1`` (AIME/AMC files repeat each problem 32 times, the released code's
way of getting avg@32) is ONE prompt: it is generated once with ``n = k`` and weighs as one prompt.
``samples_per_prompt: null`` takes k from the records' ``num_copies``.

Results also go to ``eval_results.jsonl`` in the run folder, one line per (step, benchmark).
"""

from __future__ import annotations

import importlib
import json
import logging
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Callable, Hashable, Sequence

import lightning as L
import numpy as np
import torch
from omegaconf import DictConfig
from rich.console import Console
from rich.table import Table
from tqdm.auto import tqdm

from steer.algo.logprobs import response_logprobs_and_entropy
from steer.data.checks import check_records_spec
from steer.data.prompts import encode_prompts
from steer.data.records import PromptRecord
from steer.distributed import gather_objects, rank, world_size
from steer.eval.metrics import bootstrap_ci, maj_at_k, pass_at_k, solution_diversity
from steer.knobs import ConfigError, number, select
from steer.rewards.base import Reward, score_safely
from steer.rollout.base import SamplingParams

log = logging.getLogger(__name__)


@dataclass
class Benchmark:
    name: str
    records: list[PromptRecord]
    samples_per_prompt: int | None = 4
    """k samples per prompt; None: the records' ``num_copies`` (32 for the replicated AIME/AMC files)."""
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 40
    reward: Reward | None = None
    """None: the trainer's reward."""
    batch_prompts: int = 64
    """Prompts generated together (``batch_prompts * k`` sequences in one generate call)."""
    pass_at_k: Sequence[int] | None = None
    """k values of ``pass_at_<k>``; None: ``[k]`` when k > 1. Values above k are skipped."""
    maj_at_k: Sequence[int] | None = None
    """k values of ``maj_at_<k>``; None: ``[k]`` when k > 1. Needs a reward that extracts answers."""
    entropy_batch_size: int = 16
    """Sequences per forward pass when measuring the samples' entropy (bounds memory)."""
    use_chat_template: bool = True
    bootstrap_resamples: int = 1000
    confidence: float = 0.95
    diversity: str | None = None
    """How to tell solutions apart for the diversity metrics: ``"response"`` (the response text with
    whitespace collapsed), or the dotted path of a function ``response -> hashable | None`` (the
    arithmetic task's ``steer.data.arithmetic.order_signature``); None: no diversity metrics."""

    def __post_init__(self) -> None:
        if self.diversity is not None:
            signature_function(self.diversity, self.name)  # fail at start-up, not at the first evaluation


@dataclass
class EvalResult:
    step: int
    benchmark: str
    metrics: dict[str, float]
    seconds: float
    num_prompts: int = 0
    extra: dict = field(default_factory=dict)


@dataclass
class BenchmarkSamples:
    """What sampling a benchmark produced, before any summary."""

    correct: np.ndarray
    """``[num_prompts, k]`` booleans."""
    answers: list[list[str | None]] | None
    """Extracted (normalised) answer of each sample, or None when the reward cannot extract answers."""
    entropy_sum: float = 0.0
    token_count: float = 0.0
    truncated: float = 0.0
    dropped_prompts: int = 0
    signatures: list[list[Hashable | None]] | None = None
    """Diversity signature of each sample, or None without a ``diversity`` setting."""


def answer_extractor(reward) -> Callable[[str], str | None] | None:
    """How to read a response's final answer for majority voting: the reward's ``extract_answer``
    method (:meth:`MathReward.extract_answer` normalises, so that ``\\frac12`` and ``\\frac{1}{2}``
    vote together); None without one (maj@k is then skipped)."""
    method = getattr(reward, "extract_answer", None)
    return method if callable(method) else None


def response_signature(response: str) -> str:
    """The generic diversity signature: the response text with runs of whitespace collapsed."""
    return " ".join(response.split())


def signature_function(diversity: str, benchmark: str = "?") -> Callable[[str], Hashable | None]:
    """The function a benchmark's ``diversity`` setting names (``"response"`` or a dotted path)."""
    if diversity == "response":
        return response_signature
    module_name, _, attribute = diversity.rpartition(".")
    try:
        function = getattr(importlib.import_module(module_name), attribute) if module_name else None
    except (ImportError, AttributeError):
        function = None
    if not callable(function):
        raise ValueError(f"eval.benchmarks.{benchmark}.diversity={diversity!r} is neither 'response' nor the "
                         "dotted path of a function response -> signature (e.g. steer.data.arithmetic.order_signature)")
    return function


def _safe_extract(extract: Callable[[str], str | None], response: str) -> str | None:
    try:
        return extract(response)
    except Exception:  # noqa: BLE001 - an odd response must not stop the evaluation; it just casts no vote
        return None


def _valid_ks(requested: Sequence[int] | None, k: int, what: str, benchmark: str) -> list[int]:
    if requested is None:
        return [k] if k > 1 else []
    kept = [j for j in requested if 1 <= j <= k]
    if len(kept) != len(requested):
        log.warning("%s: %s values %s need 1 <= value <= %d samples per prompt; skipped",
                    benchmark, what, sorted(set(requested) - set(kept)), k)
    return kept


def samples_per_prompt(benchmark: Benchmark) -> int:
    """k of a benchmark (from ``num_copies`` when ``samples_per_prompt`` is None)."""
    if benchmark.samples_per_prompt is not None:
        return int(benchmark.samples_per_prompt)
    copies = {record.num_copies for record in benchmark.records}
    if len(copies) > 1:
        raise ValueError(f"benchmark {benchmark.name}: samples_per_prompt=null needs the same num_copies "
                         f"for every record, found {sorted(copies)}; set samples_per_prompt")
    return copies.pop() if copies else 1


def summarize(
    correct: np.ndarray,
    answers: list[list[str | None]] | None,
    pass_ks: Sequence[int],
    maj_ks: Sequence[int],
    num_resamples: int = 1000,
    confidence: float = 0.95,
    signatures: list[list[Hashable | None]] | None = None,
) -> dict[str, float]:
    """mean@k, pass@j, maj@j of a ``[num_prompts, k]`` correctness matrix, each with its bootstrap CI;
    with ``signatures``, the diversity of the correct samples (:func:`solution_diversity`).

    Every metric is a mean over prompts of a per-prompt value; the CI resamples prompts (for the
    diversity metrics, the prompts with at least one correct sample).
    """
    correct = np.asarray(correct, dtype=bool)
    num_samples = correct.shape[1]
    per_prompt: dict[str, np.ndarray] = {f"mean_at_{num_samples}": correct.mean(axis=1)}
    for j in pass_ks:
        per_prompt[f"pass_at_{j}"] = np.array([pass_at_k(num_samples, int(row.sum()), j) for row in correct])
    if answers is not None:
        for j in maj_ks:
            per_prompt[f"maj_at_{j}"] = np.array(
                [maj_at_k([row_answers], [row_correct], j) for row_answers, row_correct in zip(answers, correct)]
            )
    if signatures is not None:
        diversity = solution_diversity(signatures, correct)
        if diversity["distinct"].size:  # no correct sample at all: nothing to tell apart
            per_prompt["distinct_solutions"] = diversity["distinct"]
            per_prompt["solution_entropy"] = diversity["entropy"]
            per_prompt["unparsed_solution_share"] = diversity["unparsed"]
    metrics: dict[str, float] = {}
    if signatures is not None:  # always logged, so that a run without any correct sample still shows why
        metrics["diversity_prompts"] = float(diversity["distinct"].size)
    for name, values in per_prompt.items():
        metrics[name] = float(values.mean())
        low, high = bootstrap_ci(values, num_resamples=num_resamples, confidence=confidence)
        metrics[f"{name}_ci_low"], metrics[f"{name}_ci_high"] = low, high
    return metrics


def sample_benchmark(module, benchmark: Benchmark, max_prompt_length: int) -> BenchmarkSamples:
    """Generate ``k`` responses per prompt with the module's rollout engine; score and measure them."""
    reward = benchmark.reward or module.reward
    extract = answer_extractor(reward)
    signature = signature_function(benchmark.diversity, benchmark.name) if benchmark.diversity else None
    k = samples_per_prompt(benchmark)
    records, prompt_ids, dropped = encode_prompts(
        benchmark.records, module.tokenizer, max_prompt_length, benchmark.use_chat_template,
        what=f"{benchmark.name} prompts",
    )
    params = SamplingParams(benchmark.temperature, benchmark.top_p, benchmark.max_new_tokens, n=k)
    chunk_tokens = getattr(getattr(module, "algorithm", None), "logprob_chunk_tokens", 4096)
    samples = BenchmarkSamples(np.zeros((0, k), dtype=bool), [] if extract else None,
                               signatures=[] if signature else None, dropped_prompts=dropped)
    correct_rows = []
    module.rollout_engine.sync_weights(module.policy)
    progress = tqdm(total=len(records), desc=f"eval {benchmark.name}", unit="prompt", disable=None, leave=False)
    for start in range(0, len(records), benchmark.batch_prompts):
        chunk = records[start : start + benchmark.batch_prompts]
        rollout = module.rollout_engine.generate(prompt_ids[start : start + benchmark.batch_prompts], params)
        responses = module.tokenizer.batch_decode(rollout.response_ids, skip_special_tokens=True)
        scored = score_safely(reward, responses, [record.reference for record in chunk for _ in range(k)])
        correct_rows.append(np.asarray(scored.correct, dtype=bool).reshape(len(chunk), k))
        if extract is not None:
            answers = [_safe_extract(extract, response) for response in responses]
            samples.answers.extend(answers[row * k : (row + 1) * k] for row in range(len(chunk)))
        if signature is not None:
            signed = [_safe_extract(signature, response) for response in responses]
            samples.signatures.extend(signed[row * k : (row + 1) * k] for row in range(len(chunk)))
        input_ids, attention_mask = rollout.input_ids, rollout.attention_mask
        with torch.no_grad():  # entropy of the tempered distribution (before top-p) at each sampled position
            for first in range(0, rollout.response_ids.shape[0], benchmark.entropy_batch_size):
                rows = slice(first, first + benchmark.entropy_batch_size)
                mask = rollout.response_mask[rows]
                width = int(mask.sum(-1).max().clamp(min=1))
                cut = input_ids.shape[1] - rollout.response_ids.shape[1] + width
                _, entropy = response_logprobs_and_entropy(
                    module.policy, input_ids[rows, :cut], attention_mask[rows, :cut], width,
                    temperature=benchmark.temperature, chunk_tokens=chunk_tokens, share_prompts=True,  # k samples a prompt
                )
                samples.entropy_sum += float((entropy * mask[:, :width]).sum())
        samples.token_count += float(rollout.response_mask.sum())
        samples.truncated += float(rollout.truncated.sum())
        progress.update(len(chunk))
    progress.close()
    if correct_rows:
        samples.correct = np.concatenate(correct_rows)
    return samples


def rank_share(records: Sequence[PromptRecord], rank: int, world_size: int) -> list[PromptRecord]:
    """The contiguous share of ``records`` that rank ``rank`` of ``world_size`` evaluates."""
    count = len(records)
    return list(records[rank * count // world_size : (rank + 1) * count // world_size])


def merge_samples(parts: Sequence[BenchmarkSamples]) -> BenchmarkSamples:
    """The ranks' samples (in rank order) as if one process had sampled every prompt."""
    answers = None if parts[0].answers is None else [row for part in parts for row in part.answers]
    signatures = None if parts[0].signatures is None else [row for part in parts for row in part.signatures]
    return BenchmarkSamples(
        correct=np.concatenate([part.correct for part in parts]),
        answers=answers,
        signatures=signatures,
        entropy_sum=sum(part.entropy_sum for part in parts),
        token_count=sum(part.token_count for part in parts),
        truncated=sum(part.truncated for part in parts),
        dropped_prompts=sum(part.dropped_prompts for part in parts),
    )


def evaluate_benchmark(module, benchmark: Benchmark, max_prompt_length: int) -> dict[str, float]:
    """Generate, score and summarise one benchmark with the module's policy and rollout engine.

    Under data parallelism every rank samples its own contiguous share of the prompts and the
    samples are gathered before the summary, so the full set is evaluated once, not once per rank.
    """
    k = samples_per_prompt(benchmark)
    share = replace(benchmark, records=rank_share(benchmark.records, rank(), world_size()))
    samples = merge_samples(gather_objects(sample_benchmark(module, share, max_prompt_length)))
    num_prompts = samples.correct.shape[0]
    metrics = {"prompts": float(num_prompts), "dropped_prompts": float(samples.dropped_prompts)}
    if num_prompts == 0:
        log.warning("%s: no prompt left to evaluate (all longer than max_prompt_length=%d?)",
                    benchmark.name, max_prompt_length)
        return metrics
    pass_ks = _valid_ks(benchmark.pass_at_k, k, "pass_at_k", benchmark.name)
    maj_ks = _valid_ks(benchmark.maj_at_k, k, "maj_at_k", benchmark.name)
    metrics.update(summarize(samples.correct, samples.answers, pass_ks, maj_ks,
                             benchmark.bootstrap_resamples, benchmark.confidence, samples.signatures))
    sequences = num_prompts * k
    metrics["entropy"] = samples.entropy_sum / max(samples.token_count, 1.0)
    metrics["response_length_mean"] = samples.token_count / sequences
    metrics["truncated_rate"] = samples.truncated / sequences
    return metrics


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
        try:
            for benchmark in self.benchmarks:
                start = time.perf_counter()
                metrics = evaluate_benchmark(module, benchmark, self.max_prompt_length)
                result = EvalResult(module.rl_step, benchmark.name, metrics, time.perf_counter() - start,
                                    int(metrics["prompts"]), extra=self._settings(benchmark))
                results.append(result)
                for logger in loggers:
                    logger.log_metrics({f"eval/{benchmark.name}/{k}": v for k, v in metrics.items()}, step=module.rl_step)
                if rank() != 0:  # every rank holds the gathered result: one rank reports and writes it
                    continue
                log.info("eval step %d %s: %s", module.rl_step, benchmark.name,
                         ", ".join(f"{k} {v:.3f}" for k, v in metrics.items() if "_ci_" not in k))
                if self.output_file is not None:
                    self.output_file.parent.mkdir(parents=True, exist_ok=True)
                    with self.output_file.open("a") as handle:
                        handle.write(json.dumps(asdict(result)) + "\n")
        finally:
            module.policy.train(was_training)
        self.history.extend(results)
        self._last_evaluated_step = module.rl_step
        return results

    @staticmethod
    def _settings(benchmark: Benchmark) -> dict:
        """The sampling settings, kept next to the numbers in the JSON file."""
        return {
            "samples_per_prompt": samples_per_prompt(benchmark),
            "temperature": benchmark.temperature,
            "top_p": benchmark.top_p,
            "max_new_tokens": benchmark.max_new_tokens,
            "diversity": benchmark.diversity,
            "reward": "trainer's reward" if benchmark.reward is None
            else f"{type(benchmark.reward).__name__}(mode={getattr(benchmark.reward, 'mode', None)!r})",
        }

    def close(self) -> None:
        """Stop the benchmark rewards' worker processes (restarted if evaluated again)."""
        for benchmark in self.benchmarks:
            close = getattr(benchmark.reward, "close", None)
            if callable(close):
                close()

    def state_dict(self) -> dict:
        return {"history": [asdict(result) for result in self.history], "last_evaluated_step": self._last_evaluated_step}

    def load_state_dict(self, state: dict) -> None:
        self.history = [EvalResult(**result) for result in state["history"]]
        self._last_evaluated_step = state["last_evaluated_step"]

    def on_train_start(self, trainer: L.Trainer, module) -> None:
        if module.rl_step == 0:  # the "before training" evaluation; a resumed run has it in its history
            self.run(module)
        elif self.output_file is not None and trainer.is_global_zero:
            # A killed process may have appended evaluations after its last checkpoint; the resumed
            # run makes them again, so the file restarts from the checkpoint's history.
            self.output_file.write_text("".join(json.dumps(asdict(result)) + "\n" for result in self.history))

    def on_train_batch_end(self, trainer: L.Trainer, module, outputs, batch, batch_idx: int) -> None:
        if module.rl_step % self.every_n_steps == 0 and module.rl_step != self._last_evaluated_step:
            self.run(module)

    def on_train_end(self, trainer: L.Trainer, module) -> None:
        if module.rl_step != self._last_evaluated_step:
            self.run(module)
        self.close()


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


def check_eval(cfg: DictConfig) -> None:
    """``eval.*``: the schedule, each benchmark's sampling knobs and data."""
    if select(cfg, "eval") is None:
        return
    number("eval.every_n_steps", select(cfg, "eval.every_n_steps"), 1, integer=True)
    number("eval.max_prompt_length", select(cfg, "eval.max_prompt_length"), 1, integer=True)
    allowed_keys = sorted(f.name for f in fields(Benchmark) if f.name != "name")
    for name in (select(cfg, "eval.benchmarks") or {}):
        knob = f"eval.benchmarks.{name}"
        spec = select(cfg, knob)
        unknown = sorted(set(spec) - set(allowed_keys))
        if unknown:
            raise ConfigError(f"{knob}: unknown key(s) {unknown}; allowed keys: {', '.join(allowed_keys)}")
        if "records" not in spec:
            raise ConfigError(f"{knob}.records is missing; allowed: a dataset spec with a _target_ loader")
        samples = select(spec, "samples_per_prompt", 4)
        if samples is not None:
            number(f"{knob}.samples_per_prompt", samples, 1, integer=True,
                    allowed="an integer >= 1, or null for the records' num_copies")
        number(f"{knob}.temperature", select(spec, "temperature", 1.0), 0, low_open=True)
        number(f"{knob}.top_p", select(spec, "top_p", 1.0), 0, 1, low_open=True)
        number(f"{knob}.max_new_tokens", select(spec, "max_new_tokens", 40), 1, integer=True)
        number(f"{knob}.batch_prompts", select(spec, "batch_prompts", 64), 1, integer=True)
        for key in ("pass_at_k", "maj_at_k"):
            for k in select(spec, key) or []:
                number(f"{knob}.{key}", k, 1, integer=True, allowed="a list of integers >= 1, or null")
        check_records_spec(f"{knob}.records", spec.records)
