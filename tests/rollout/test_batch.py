"""`RolloutBatch.from_padded`, the one assembly both engines use, and the vLLM engine's use of it
checked without vLLM (fake request outputs; `tests/rollout/test_vllm.py` needs the opt-in install)."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from steer.rollout.base import RolloutBatch, left_pad
from steer.rollout.vllm import VLLMRolloutEngine

PAD, EOS = 0, 1


def test_from_padded_masks_after_the_first_eos_and_flags_rows_without_one():
    prompt_ids, prompt_mask = left_pad([[5, 6], [7]], PAD)
    response_ids = torch.tensor([[3, EOS, 4, EOS], [2, 3, 4, 5]])
    logprobs = torch.tensor([[-0.5, -0.25, -1.0, -2.0], [-1.0, -2.0, -3.0, -4.0]])
    batch = RolloutBatch.from_padded(prompt_ids, prompt_mask, response_ids, logprobs, EOS, PAD)
    assert batch.prompt_ids is prompt_ids and batch.prompt_mask is prompt_mask
    assert batch.response_ids.tolist() == [[3, EOS, PAD, PAD], [2, 3, 4, 5]]
    assert batch.response_mask.tolist() == [[True, True, False, False], [True] * 4]
    assert batch.sampling_logprobs.tolist() == [[-0.5, -0.25, 0.0, 0.0], [-1.0, -2.0, -3.0, -4.0]]
    assert batch.truncated.tolist() == [False, True]
    assert batch.response_lengths.tolist() == [2, 4]


def _vllm_outputs(responses: list[list[int]]) -> list:
    """`llm.generate`'s outputs as `_to_batch` reads them: one sample per request, one logprob record per token."""
    return [
        SimpleNamespace(outputs=[SimpleNamespace(
            token_ids=ids, logprobs=[{token: SimpleNamespace(logprob=-(row + 1) - 0.5 * column)} for column, token in enumerate(ids)]
        )])
        for row, ids in enumerate(responses)
    ]


def _engine_without_vllm() -> VLLMRolloutEngine:
    engine = object.__new__(VLLMRolloutEngine)  # __init__ refuses to run without vLLM; _to_batch needs only the ids
    engine.pad_token_id, engine.eos_token_id = PAD, EOS
    return engine


def test_the_vllm_engine_assembles_right_padded_responses_with_their_logprobs():
    prompts = [[5, 6, 7], [8], [9, 10]]
    batch = _engine_without_vllm()._to_batch(prompts, _vllm_outputs([[11, 12, EOS], [13, 14, 15, 16], [EOS]]))
    assert batch.prompt_ids.tolist() == [[5, 6, 7], [PAD, PAD, 8], [PAD, 9, 10]]
    assert batch.prompt_mask.tolist() == [[True] * 3, [False, False, True], [False, True, True]]
    assert batch.response_ids.tolist() == [[11, 12, EOS, PAD], [13, 14, 15, 16], [EOS, PAD, PAD, PAD]]
    assert batch.response_mask.tolist() == [[True, True, True, False], [True] * 4, [True, False, False, False]]
    assert batch.sampling_logprobs.dtype == torch.float32
    assert batch.sampling_logprobs.tolist() == [[-1.0, -1.5, -2.0, 0.0], [-2.0, -2.5, -3.0, -3.5], [-3.0, 0.0, 0.0, 0.0]]
    assert batch.truncated.tolist() == [False, True, False]


def test_the_vllm_engine_keeps_one_response_column_when_every_response_is_empty():
    batch = _engine_without_vllm()._to_batch([[5], [6]], _vllm_outputs([[], []]))
    assert batch.response_ids.tolist() == [[PAD], [PAD]]
    assert batch.sampling_logprobs.tolist() == [[0.0], [0.0]]
    # An empty response has no EOS, so it counts as truncated; its one column is a pad token, not EOS.
    assert batch.response_mask.tolist() == [[True], [True]] and batch.truncated.tolist() == [True, True]
