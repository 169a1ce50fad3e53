"""Rollout/trainer mismatch correction: float64 references, gradients, and the HF engine's ~0 mismatch."""

from __future__ import annotations

import math

import pytest
import torch

from steer.algo.interventions.base import ClipConfig, PolicyTokens
from steer.algo.interventions.rollout_correction import (
    RolloutCorrection,
    mismatch_keep_mask,
    mismatch_statistics,
    sequence_mismatch,
    truncated_importance_weights,
)
from steer.algo.logprobs import response_logprobs_and_entropy
from steer.algo.policy_loss import policy_loss
from steer.models.tiny import build_char_tokenizer, build_tiny_policy
from steer.rollout.base import SamplingParams
from steer.rollout.hf import HFRolloutEngine


def _tokens(seed: int = 0, rows: int = 4, width: int = 6, spread: float = 1.0) -> PolicyTokens:
    generator = torch.Generator().manual_seed(seed)
    old = -torch.rand(rows, width, generator=generator, dtype=torch.float64) * 3
    sampler = old + spread * torch.randn(rows, width, generator=generator, dtype=torch.float64)
    logprobs = (old + 0.05 * torch.randn(rows, width, generator=generator, dtype=torch.float64)).requires_grad_(True)
    mask = torch.ones(rows, width, dtype=torch.bool)
    mask[1, 4:] = False
    mask[3, 2:] = False
    advantages = torch.tensor([1.0, -1.0, 0.5, -0.5], dtype=torch.float64)[:, None].expand(rows, width)
    return PolicyTokens(
        logprobs=logprobs, entropy=torch.zeros(rows, width, dtype=torch.float64), old_logprobs=old,
        old_entropy=torch.zeros(rows, width, dtype=torch.float64), advantages=advantages, mask=mask,
        sampler_logprobs=sampler,
    )


def test_truncated_weights_match_a_python_float_reference():
    tokens = _tokens()
    weights, truncated = truncated_importance_weights(tokens.old_logprobs, tokens.sampler_logprobs, cap=2.0)
    for (i, j), value in zip(torch.cartesian_prod(torch.arange(4), torch.arange(6)).tolist(), weights.flatten().tolist()):
        ratio = math.exp(tokens.old_logprobs[i, j].item()) / math.exp(tokens.sampler_logprobs[i, j].item())
        assert value == pytest.approx(min(ratio, 2.0), rel=1e-12)
        assert bool(truncated[i, j]) == (ratio > 2.0)
    assert weights.dtype == torch.float64 and 0 < truncated.sum() < truncated.numel()


def test_sequence_mismatch_and_keep_mask_by_hand():
    old = torch.tensor([[-1.0, -2.0, -3.0], [-1.0, -1.0, -1.0]])
    sampler = torch.tensor([[-1.1, -1.7, -9.0], [-1.0, -1.3, -1.0]])
    mask = torch.tensor([[True, True, False], [True, True, True]])
    # row 0: (0.1 + 0.3) / 2 = 0.2 (the padded -9 does not count); row 1: 0.3 / 3 = 0.1
    torch.testing.assert_close(sequence_mismatch(old, sampler, mask), torch.tensor([0.2, 0.1], dtype=torch.float64))
    keep = mismatch_keep_mask(old, sampler, mask, threshold=0.15)
    assert keep.tolist() == [[False] * 3, [True] * 3]
    stats = mismatch_statistics(old, sampler, mask)
    assert stats["rollout/mismatch_abs_mean"] == pytest.approx((0.1 + 0.3 + 0.3) / 5)
    assert stats["rollout/mismatch_abs_max"] == pytest.approx(0.3)
    assert stats["rollout/mismatch_mean"] == pytest.approx((0.1 - 0.3 + 0.3) / 5)
    assert stats["rollout/mismatch_seq_abs_max"] == pytest.approx(0.2)


def _gradient(tokens: PolicyTokens, interventions) -> tuple[torch.Tensor, dict]:
    tokens.logprobs.grad = None
    loss, metrics = policy_loss(tokens, ClipConfig(0.2, 0.2, None), interventions, "token-mean")
    loss.backward()
    return tokens.logprobs.grad.clone(), metrics


def test_token_tis_scales_each_token_gradient_by_its_weight():
    tokens = _tokens()
    plain, _ = _gradient(tokens, [])
    corrected, metrics = _gradient(tokens, [RolloutCorrection("token_tis", cap=2.0)])
    weights, truncated = truncated_importance_weights(tokens.old_logprobs, tokens.sampler_logprobs, 2.0)
    torch.testing.assert_close(corrected, plain * weights * tokens.mask)
    assert not torch.equal(corrected, plain)
    share = truncated[tokens.mask].double().mean()
    torch.testing.assert_close(metrics["rollout/correction_truncated_share"], share)


def test_seq_mask_zeroes_the_gradient_of_dropped_responses_only():
    tokens = _tokens(spread=0.0)
    tokens.sampler_logprobs = tokens.old_logprobs.clone()
    tokens.sampler_logprobs[2] -= 1.0  # one response the trainer would not have sampled
    plain, _ = _gradient(tokens, [])
    corrected, metrics = _gradient(tokens, [RolloutCorrection("seq_mask", threshold=0.5)])
    assert torch.all(corrected[2] == 0) and torch.any(plain[2] != 0)
    others = torch.tensor([0, 1, 3])
    torch.testing.assert_close(corrected[others], plain[others])
    assert metrics["rollout/correction_masked_share"].item() == pytest.approx(6 / tokens.mask.sum().item())


def test_none_mode_and_bad_knobs():
    tokens = _tokens()
    plain, _ = _gradient(tokens, [])
    same, _ = _gradient(tokens, [RolloutCorrection("none")])
    torch.testing.assert_close(same, plain)
    with pytest.raises(ValueError, match="algorithm.rollout_correction must be one of"):
        RolloutCorrection("tis")
    with pytest.raises(ValueError, match="rollout_correction_cap"):
        RolloutCorrection("token_tis", cap=0.0)


def test_hf_engine_mismatch_is_round_off_and_the_correction_does_nothing():
    """The HF engine samples from the policy itself: |log pi_train - log pi_sampler| is float32 round-off."""
    torch.manual_seed(0)
    tokenizer = build_char_tokenizer()
    policy = build_tiny_policy(tokenizer, hidden_size=32, num_layers=1).eval()
    engine = HFRolloutEngine(policy, tokenizer.pad_token_id, tokenizer.eos_token_id)
    batch = engine.generate([tokenizer("Q: Compute 1+2.\nA: ").input_ids] * 4, SamplingParams(temperature=0.7, max_new_tokens=12, n=2))
    with torch.no_grad():
        train, _ = response_logprobs_and_entropy(policy, batch.input_ids, batch.attention_mask, batch.response_ids.shape[1], temperature=0.7)
    stats = mismatch_statistics(train, batch.sampling_logprobs, batch.response_mask)
    assert stats["rollout/mismatch_abs_max"] < 1e-4
    weights, truncated = truncated_importance_weights(train, batch.sampling_logprobs, cap=1.0 + 1e-3)
    assert not truncated.any()
    torch.testing.assert_close(weights[batch.response_mask], torch.ones_like(weights[batch.response_mask]), atol=1e-4, rtol=0)
    assert mismatch_keep_mask(train, batch.sampling_logprobs, batch.response_mask, threshold=1e-4).all()


@pytest.mark.parametrize("mode", ["token_tis", "seq_mask"])
def test_training_with_a_correction_logs_the_mismatch_every_step(mode, tmp_path):
    """The README command with rollout=hf and tiny overrides: the module appends the correction,
    the mismatch is round-off, and nothing is truncated or masked."""
    from steer.app import train
    from tests.conftest import TINY_RUN, compose

    metrics = train(compose([*TINY_RUN, "logger=none", f"algorithm.rollout_correction={mode}"], tmp_path))
    assert metrics["rollout/mismatch_abs_max"] < 1e-4
    assert metrics["rollout/mismatch_abs_mean"] <= metrics["rollout/mismatch_abs_max"]
    key = "rollout/correction_truncated_share" if mode == "token_tis" else "rollout/correction_masked_share"
    assert metrics[key] == 0.0
