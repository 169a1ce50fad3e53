"""Supervised warm-up of the tiny policy on the embedded task, cached on disk by its config.

RL from a random policy never sees a reward, so the embedded default first imitates worked
answers (every addition order at random) until its sampled held-out accuracy first reaches
``target_accuracy``. Stopping on accuracy rather than a fixed step count lands every seed in the
same band (a fixed count gave 0.36-0.67 across seeds on a prototype). The result is saved with
``save_pretrained`` under ``cache_dir/<hash of every input>`` and reused by later runs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from steer.data.arithmetic import ArithmeticTask
from steer.data.prompts import encode_prompts, render_prompt
from steer.models.tokenizer import load_tokenizer
from steer.rollout.base import SamplingParams
from steer.rollout.hf import HFRolloutEngine

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WarmupConfig:
    max_steps: int = 3000
    batch_size: int = 64
    lr: float = 1e-3
    eval_every: int = 25
    eval_prompts: int = 200
    target_accuracy: float = 0.3
    max_new_tokens: int = 40
    seed: int = 0


def warmup_key(*parts: object) -> str:
    blob = json.dumps([asdict(p) if hasattr(p, "__dataclass_fields__") else p for p in parts], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def sampled_accuracy(
    policy, tokenizer, records, is_correct: Callable[[Sequence[str], Sequence[str]], Sequence[bool]], max_new_tokens: int
) -> float:
    """Share of held-out prompts answered correctly with one sample each at temperature 1."""
    _, prompt_ids, _ = encode_prompts(records, tokenizer, max_prompt_length=10_000)
    engine = HFRolloutEngine(policy, tokenizer.pad_token_id, tokenizer.eos_token_id)
    batch = engine.generate(prompt_ids, SamplingParams(max_new_tokens=max_new_tokens))
    responses = tokenizer.batch_decode(batch.response_ids, skip_special_tokens=True)
    correct = is_correct(responses, [r.reference for r in records])
    return sum(map(bool, correct)) / len(records)


def supervised_warmup(
    policy,
    tokenizer,
    task: ArithmeticTask,
    config: WarmupConfig,
    is_correct: Callable[[Sequence[str], Sequence[str]], Sequence[bool]],
) -> dict[str, float]:
    """Train ``policy`` in place with next-token cross-entropy on the answer tokens only."""
    rng = random.Random(config.seed)
    torch.manual_seed(config.seed)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=config.lr)
    heldout = task.heldout()[: config.eval_prompts]
    start, accuracy, step = time.perf_counter(), 0.0, 0
    policy.train()
    for step in range(1, config.max_steps + 1):
        sequences, answer_starts = [], []
        for index in range(config.batch_size):
            terms = task.train_terms(config.seed + 7919, step * config.batch_size + index)
            prompt = render_prompt(task.record(terms), tokenizer)
            prompt_ids = tokenizer(prompt, add_special_tokens=False).input_ids
            answer_ids = tokenizer(task.solution(terms, rng), add_special_tokens=False).input_ids
            sequences.append(prompt_ids + answer_ids + [tokenizer.eos_token_id])
            answer_starts.append(len(prompt_ids))
        width = max(map(len, sequences))
        input_ids = torch.full((len(sequences), width), tokenizer.pad_token_id)
        labels = torch.full((len(sequences), width), -100)
        for row, (seq, answer_start) in enumerate(zip(sequences, answer_starts)):
            input_ids[row, : len(seq)] = torch.tensor(seq)
            labels[row, answer_start : len(seq)] = torch.tensor(seq[answer_start:])
        loss = policy(input_ids=input_ids, attention_mask=(labels != -100) | (input_ids != tokenizer.pad_token_id), labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % config.eval_every == 0:
            policy.eval()
            accuracy = sampled_accuracy(policy, tokenizer, heldout, is_correct, config.max_new_tokens)
            policy.train()
            log.info("warm-up step %d: loss %.3f, sampled held-out accuracy %.3f", step, loss.item(), accuracy)
            if accuracy >= config.target_accuracy:
                break
    policy.eval()
    return {"steps": step, "accuracy": accuracy, "seconds": time.perf_counter() - start}


def cached_warmup(
    build: Callable[[], tuple[object, object]],
    task: ArithmeticTask,
    config: WarmupConfig,
    is_correct: Callable[[Sequence[str], Sequence[str]], Sequence[bool]],
    cache_dir: str | Path,
    key_parts: Sequence[object],
):
    """Load the warmed-up ``(tokenizer, policy)`` from the cache, or build, warm up and save them."""
    from transformers import AutoModelForCausalLM

    folder = Path(cache_dir).expanduser() / warmup_key(task, config, *key_parts)
    if (folder / "warmup.json").exists():
        info = json.loads((folder / "warmup.json").read_text())
        log.info("loaded warmed-up policy from %s (held-out accuracy %.3f)", folder, info["accuracy"])
        tokenizer = load_tokenizer(str(folder))
        return tokenizer, AutoModelForCausalLM.from_pretrained(folder), info
    tokenizer, policy = build()
    log.info("supervised warm-up of the tiny policy (cached afterwards in %s)", folder)
    info = supervised_warmup(policy, tokenizer, task, config, is_correct)
    folder.mkdir(parents=True, exist_ok=True)
    policy.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / "warmup.json").write_text(json.dumps(info))  # written last: marks the folder complete
    return tokenizer, policy, info
