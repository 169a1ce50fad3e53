"""Rollouts on the live Hugging Face policy itself (any device; no weight sync needed).

Sampling runs through our own decode loop (:mod:`steer.rollout.decode`), not ``model.generate``:
one prefill, then one single-token forward per step over a preallocated key/value buffer, stopping
once every row has emitted EOS. Sampling is plain: no top-k, temperature then an optional nucleus
filter, one Gumbel-max draw per row (the trainer's seeded torch RNG drives it), and the log-prob
of each sampled token is recorded under the exact distribution it was drawn from. On the tiny
policies this takes 0.5-0.7x the time of ``generate`` with logits processors, whose time is mostly
per-token framework overhead (see ``experiments/benchmarks/bench_decode.py``).

``max_batch_sequences`` bounds how many sequences are decoded at once (whole groups of ``n``): the
key/value cache grows with it, ``sequences x (prompt + response) x 2 x layers x KV heads x head dim``
elements, 120 GB for one rank's 512 sequences of 4,096 tokens of a 7B Qwen2.5 in bfloat16.

``dtype`` is the decoding's arithmetic, as the vLLM engine's: ``auto`` = bfloat16 on a GPU that
supports it, else the policy's dtype (float32 master weights: float32). ``bfloat16`` on an AVX-512
BF16 CPU cuts a 2.38M policy's decoding by about a fifth and slows a 0.31M one by a few percent
(``experiments/benchmarks/bench_sampling_modes.py``). The sampler's log-probs then carry bf16
round-off against the update's, which ``rollout/mismatch_*`` shows.
"""

from __future__ import annotations

from typing import Sequence

import torch

from steer.rollout.base import (ENGINE_DTYPES, RolloutBatch, SamplingParams, check_engine_dtype, left_pad,
                               resolve_engine_dtype)
from steer.rollout.decode import sample


class HFRolloutEngine:
    """Samples from a live ``transformers`` causal LM."""

    def __init__(self, policy: torch.nn.Module | None = None, pad_token_id: int = 0, eos_token_id: int = 1,
                 max_batch_sequences: int | None = None, dtype: str = "auto") -> None:
        check_engine_dtype(dtype)
        if max_batch_sequences is not None and (isinstance(max_batch_sequences, bool) or not isinstance(max_batch_sequences, int)
                                                or max_batch_sequences < 1):
            raise ValueError(f"rollout.engine.max_batch_sequences must be an integer >= 1 or null (all at once), "
                             f"got {max_batch_sequences!r}")
        self.policy = policy
        self.pad_token_id = pad_token_id
        self.eos_token_id = eos_token_id
        self.max_batch_sequences = max_batch_sequences
        self.dtype = dtype

    def sync_weights(self, policy: torch.nn.Module) -> None:
        self.policy = policy  # sampling runs on the training weights themselves

    @torch.no_grad()
    def generate(self, prompt_token_ids: Sequence[Sequence[int]], params: SamplingParams) -> RolloutBatch:
        if self.policy is None:
            raise RuntimeError("HFRolloutEngine has no policy: call sync_weights(policy) first")
        # Whole groups per chunk (at least one), so a prompt's n samples share one prefill.
        prompts_per_chunk = max(1, (self.max_batch_sequences or len(prompt_token_ids) * params.n) // params.n)
        if len(prompt_token_ids) <= prompts_per_chunk:
            return self._generate(prompt_token_ids, params)
        chunks = [self._generate(prompt_token_ids[start:start + prompts_per_chunk], params)
                  for start in range(0, len(prompt_token_ids), prompts_per_chunk)]
        return concatenate(chunks, self.pad_token_id)

    def _generate(self, prompt_token_ids: Sequence[Sequence[int]], params: SamplingParams) -> RolloutBatch:
        device = next(self.policy.parameters()).device
        dtype = ENGINE_DTYPES[resolve_engine_dtype(self.dtype, self.policy, gpu=device.type == "cuda")]
        repeated = [ids for ids in prompt_token_ids for _ in range(params.n)]
        prompt_ids, prompt_mask = left_pad(repeated, self.pad_token_id)
        prompt_ids, prompt_mask = prompt_ids.to(device), prompt_mask.to(device)
        was_training = self.policy.training
        self.policy.eval()
        try:
            response_ids, sampling_logprobs = sample(
                self.policy, prompt_ids, prompt_mask, params.max_new_tokens, self.eos_token_id, self.pad_token_id,
                temperature=params.temperature, top_p=params.top_p, group=params.n,  # each prompt's n rows are adjacent
                dtype=dtype,
            )
        finally:
            self.policy.train(was_training)
        return RolloutBatch.from_padded(prompt_ids, prompt_mask, response_ids, sampling_logprobs,
                                        self.eos_token_id, self.pad_token_id)


def concatenate(batches: Sequence[RolloutBatch], pad_token_id: int) -> RolloutBatch:
    """One batch from several, rows in order: prompts re-padded on the left, responses on the right."""

    def pad(tensors: Sequence[torch.Tensor], value, left: bool) -> torch.Tensor:
        width = max(t.shape[1] for t in tensors)
        return torch.cat([torch.nn.functional.pad(t, (width - t.shape[1], 0) if left else (0, width - t.shape[1]), value=value)
                          for t in tensors])

    return RolloutBatch(
        prompt_ids=pad([b.prompt_ids for b in batches], pad_token_id, left=True),
        prompt_mask=pad([b.prompt_mask for b in batches], False, left=True),
        response_ids=pad([b.response_ids for b in batches], pad_token_id, left=False),
        response_mask=pad([b.response_mask for b in batches], False, left=False),
        sampling_logprobs=pad([b.sampling_logprobs for b in batches], 0.0, left=False),
        truncated=torch.cat([b.truncated for b in batches]),
    )
