"""Rollouts on the live Hugging Face policy itself (any device; no weight sync needed).

Sampling runs through our own decode loop (:mod:`steer.rollout.decode`), not ``model.generate``:
one prefill, then one single-token forward per step over a preallocated key/value buffer, stopping
once every row has emitted EOS. Sampling is plain: no top-k, temperature then an optional nucleus
filter, one Gumbel-max draw per row (the trainer's seeded torch RNG drives it), and the log-prob
of each sampled token is recorded under the exact distribution it was drawn from. On the tiny
policies this takes 0.5-0.7x the time of ``generate`` with logits processors, whose time is mostly
per-token framework overhead (see ``experiments/benchmarks/bench_decode.py``).
"""

from __future__ import annotations

from typing import Sequence

import torch

from steer.rollout.base import RolloutBatch, SamplingParams, left_pad, response_mask_from_ids
from steer.rollout.decode import sample


class HFRolloutEngine:
    """Samples from a live ``transformers`` causal LM."""

    def __init__(self, policy: torch.nn.Module | None = None, pad_token_id: int = 0, eos_token_id: int = 1) -> None:
        self.policy = policy
        self.pad_token_id = pad_token_id
        self.eos_token_id = eos_token_id

    def sync_weights(self, policy: torch.nn.Module) -> None:
        self.policy = policy  # sampling runs on the training weights themselves

    @torch.no_grad()
    def generate(self, prompt_token_ids: Sequence[Sequence[int]], params: SamplingParams) -> RolloutBatch:
        if self.policy is None:
            raise RuntimeError("HFRolloutEngine has no policy: call sync_weights(policy) first")
        device = next(self.policy.parameters()).device
        repeated = [ids for ids in prompt_token_ids for _ in range(params.n)]
        prompt_ids, prompt_mask = left_pad(repeated, self.pad_token_id)
        prompt_ids, prompt_mask = prompt_ids.to(device), prompt_mask.to(device)
        was_training = self.policy.training
        self.policy.eval()
        try:
            response_ids, sampling_logprobs = sample(
                self.policy, prompt_ids, prompt_mask, params.max_new_tokens, self.eos_token_id, self.pad_token_id,
                temperature=params.temperature, top_p=params.top_p, group=params.n,  # each prompt's n rows are adjacent
            )
        finally:
            self.policy.train(was_training)
        response_mask, truncated = response_mask_from_ids(response_ids, self.eos_token_id)
        return RolloutBatch(
            prompt_ids=prompt_ids,
            prompt_mask=prompt_mask,
            response_ids=response_ids.masked_fill(~response_mask, self.pad_token_id),
            response_mask=response_mask,
            sampling_logprobs=sampling_logprobs.masked_fill(~response_mask, 0.0),
            truncated=truncated,
        )
