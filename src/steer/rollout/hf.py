"""Rollouts with Hugging Face ``generate`` on the policy itself (any device; no weight sync needed).

Sampling is plain: no top-k (transformers 5 defaults to top_k=50 unless told otherwise), our own
temperature and nucleus filter, and a last logits processor that records the log-prob of each
sampled token under the exact distribution it was drawn from. Recording one step at a time keeps
memory at ``[B, V]`` instead of the ``[R, B, V]`` that ``output_scores`` would keep.
"""

from __future__ import annotations

from typing import Sequence

import torch
from transformers import LogitsProcessor, LogitsProcessorList, TopPLogitsWarper

from steer.rollout.base import RolloutBatch, SamplingParams, left_pad, response_mask_from_ids


class _Temperature(LogitsProcessor):
    def __init__(self, temperature: float) -> None:
        self.temperature = temperature

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        return scores / self.temperature


class _SampledLogprobRecorder(LogitsProcessor):
    """Keeps the previous step's log-softmax and, once the next call reveals the sampled token
    (the last column of ``input_ids``), stores that token's log-prob."""

    def __init__(self) -> None:
        self.previous: torch.Tensor | None = None
        self.recorded: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self._record(input_ids[:, -1])
        self.previous = torch.log_softmax(scores.float(), dim=-1)
        return scores

    def _record(self, sampled: torch.Tensor) -> None:
        if self.previous is not None:
            self.recorded.append(self.previous.gather(-1, sampled[:, None]).squeeze(-1))

    def finish(self, last_tokens: torch.Tensor) -> torch.Tensor:
        self._record(last_tokens)
        return torch.stack(self.recorded, dim=1)


class HFRolloutEngine:
    """Samples from a live ``transformers`` causal LM."""

    def __init__(self, policy: torch.nn.Module | None = None, pad_token_id: int = 0, eos_token_id: int = 1) -> None:
        self.policy = policy
        self.pad_token_id = pad_token_id
        self.eos_token_id = eos_token_id

    def sync_weights(self, policy: torch.nn.Module) -> None:
        self.policy = policy  # generate runs on the training weights themselves

    @torch.no_grad()
    def generate(self, prompt_token_ids: Sequence[Sequence[int]], params: SamplingParams) -> RolloutBatch:
        if self.policy is None:
            raise RuntimeError("HFRolloutEngine has no policy: call sync_weights(policy) first")
        device = next(self.policy.parameters()).device
        repeated = [ids for ids in prompt_token_ids for _ in range(params.n)]
        prompt_ids, prompt_mask = left_pad(repeated, self.pad_token_id)
        prompt_ids, prompt_mask = prompt_ids.to(device), prompt_mask.to(device)
        recorder = _SampledLogprobRecorder()
        processors = LogitsProcessorList([_Temperature(params.temperature)])
        if params.top_p < 1.0:
            processors.append(TopPLogitsWarper(params.top_p))
        processors.append(recorder)
        was_training = self.policy.training
        self.policy.eval()
        try:
            output = self.policy.generate(
                input_ids=prompt_ids,
                attention_mask=prompt_mask.long(),
                do_sample=True,
                temperature=1.0,
                top_k=0,
                top_p=1.0,
                max_new_tokens=params.max_new_tokens,
                logits_processor=processors,
                pad_token_id=self.pad_token_id,
                eos_token_id=self.eos_token_id,
            )
        finally:
            self.policy.train(was_training)
        response_ids = output[:, prompt_ids.shape[1] :]
        sampling_logprobs = recorder.finish(response_ids[:, -1])
        response_mask, truncated = response_mask_from_ids(response_ids, self.eos_token_id)
        response_ids = response_ids.masked_fill(~response_mask, self.pad_token_id)
        return RolloutBatch(
            prompt_ids=prompt_ids,
            prompt_mask=prompt_mask,
            response_ids=response_ids,
            response_mask=response_mask,
            sampling_logprobs=sampling_logprobs.masked_fill(~response_mask, 0.0),
            truncated=truncated,
        )
