"""The HF rollout engine: plain sampling, exact sampler log-probs, EOS and padding handling."""

from __future__ import annotations

import pytest
import torch

from steer.algo.logprobs import response_logprobs_and_entropy
from steer.models.tiny import build_char_tokenizer, build_tiny_policy
from steer.rollout.base import SamplingParams
from steer.rollout.hf import HFRolloutEngine


@pytest.fixture(scope="module")
def engine():
    torch.manual_seed(0)
    tokenizer = build_char_tokenizer()
    policy = build_tiny_policy(tokenizer, hidden_size=32, num_layers=1).eval()
    return tokenizer, policy, HFRolloutEngine(policy, tokenizer.pad_token_id, tokenizer.eos_token_id)


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_sampler_logprobs_equal_the_policy_logprobs_at_the_same_temperature(engine, temperature):
    tokenizer, policy, rollout_engine = engine
    prompts = [tokenizer("Q: Compute 1+2.\nA: ").input_ids, tokenizer("Q: hi\nA: ").input_ids]
    batch = rollout_engine.generate(prompts, SamplingParams(temperature=temperature, max_new_tokens=12, n=3))
    assert batch.response_ids.shape[0] == 6
    assert torch.equal(batch.prompt_ids[0], batch.prompt_ids[2])  # the n samples of a prompt are adjacent
    logprobs, _ = response_logprobs_and_entropy(
        policy, batch.input_ids, batch.attention_mask, batch.response_ids.shape[1], temperature=temperature
    )
    mask = batch.response_mask
    torch.testing.assert_close(logprobs[mask], batch.sampling_logprobs[mask], atol=1e-4, rtol=0)


def test_padding_after_eos_and_truncation_flags(engine):
    tokenizer, policy, rollout_engine = engine
    batch = rollout_engine.generate([tokenizer("Q: x\nA: ").input_ids] * 16, SamplingParams(max_new_tokens=6, n=1))
    eos = tokenizer.eos_token_id
    for row in range(16):
        ids, mask = batch.response_ids[row], batch.response_mask[row]
        length = int(mask.sum())
        assert torch.all(ids[length:] == tokenizer.pad_token_id)
        has_eos = bool((ids[:length] == eos).any())
        assert bool(batch.truncated[row]) == (not has_eos)
        if has_eos:
            assert ids[length - 1] == eos


def test_no_top_k_is_applied(engine):
    """With a uniform policy every token of the vocabulary must be reachable (top_k=50 would cut it)."""
    tokenizer, policy, _ = engine
    uniform = build_tiny_policy(tokenizer, hidden_size=32, num_layers=1)
    with torch.no_grad():
        for p in uniform.parameters():
            p.zero_()
    rollout_engine = HFRolloutEngine(uniform, tokenizer.pad_token_id, tokenizer.eos_token_id)
    batch = rollout_engine.generate([[5]] * 64, SamplingParams(max_new_tokens=8))
    assert len(tokenizer) > 50
    assert len(set(batch.response_ids[batch.response_mask].tolist())) > 50
