"""The pure tensor functions against independent float64 references (loops, not the same vector code)."""

from __future__ import annotations

import math

import pytest
import torch

from steer.algo.advantages import group_advantages
from steer.algo.aggregation import aggregate
from steer.algo.interventions.kl_penalty import kl_estimate
from steer.algo.logprobs import chunked_logprobs_and_entropy, logprobs_and_entropy_from_logits
from steer.algo.policy_loss import LossTotals, policy_loss, ppo_token_loss
from steer.algo.interventions.base import ClipConfig, PolicyTokens
from steer.rollout.base import left_pad, response_mask_from_ids


def test_logprobs_and_entropy_match_float64_loop():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 7) * 3
    targets = torch.randint(0, 7, (3, 5))
    logprob, entropy = logprobs_and_entropy_from_logits(logits, targets, temperature=0.7)
    for b in range(3):
        for t in range(5):
            z = [float(v) / 0.7 for v in logits[b, t].double()]
            norm = math.log(sum(math.exp(v) for v in z))
            probs = [math.exp(v - norm) for v in z]
            assert logprob[b, t].item() == pytest.approx(z[targets[b, t]] - norm, abs=1e-5)
            assert entropy[b, t].item() == pytest.approx(-sum(p * math.log(p) for p in probs), abs=1e-5)


@pytest.mark.parametrize("chunk", [1, 4, 7, 100])
def test_chunked_head_equals_full_logits_in_value_and_gradient(chunk):
    torch.manual_seed(1)
    hidden = torch.randn(2, 6, 8, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(11, 8, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 11, (2, 6))
    full_lp, full_ent = logprobs_and_entropy_from_logits(hidden @ weight.T, targets)
    (full_lp.sum() + 0.5 * full_ent.sum()).backward()
    expected = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    lp, ent = chunked_logprobs_and_entropy(hidden, weight, targets, chunk_tokens=chunk)
    (lp.sum() + 0.5 * ent.sum()).backward()
    torch.testing.assert_close(lp, full_lp.float())
    torch.testing.assert_close(ent, full_ent.float())
    # The head computes in float32 (logits.float()) and its backward is hand-written: float32 round-off.
    torch.testing.assert_close(hidden.grad, expected[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(weight.grad, expected[1], rtol=1e-5, atol=1e-6)


def _loop_advantages(rewards, estimator, lengths):
    out = []
    for row, lens in zip(rewards.tolist(), lengths.tolist()):
        n, mean = len(row), sum(row) / len(row)
        std = math.sqrt(sum((r - mean) ** 2 for r in row) / (n - 1))
        for i, r in enumerate(row):
            if estimator == "grpo":
                out.append((r - mean) / (std + 1e-6))
            elif estimator == "drgrpo":
                out.append(r - mean)
            elif estimator == "rloo":
                out.append(r - (sum(row) - r) / (n - 1))
            else:
                out.append(r - sum(l * x for l, x in zip(lens, row)) / sum(lens))
    return torch.tensor(out, dtype=torch.float64).view_as(rewards)


@pytest.mark.parametrize("estimator", ["grpo", "drgrpo", "rloo", "opo"])
def test_group_advantages_match_loop(estimator):
    torch.manual_seed(2)
    rewards = torch.randint(0, 2, (5, 4)).double()
    rewards[0] = 1.0  # a zero-variance group
    lengths = torch.randint(1, 30, (5, 4)).double()
    got = group_advantages(rewards, estimator, lengths)
    torch.testing.assert_close(got, _loop_advantages(rewards, estimator, lengths))
    assert torch.all(got[0] == 0)


def test_group_advantages_reject_bad_input():
    with pytest.raises(ValueError, match="valid"):
        group_advantages(torch.zeros(2, 4), "nope")
    with pytest.raises(ValueError, match="n>=2"):
        group_advantages(torch.zeros(2, 1), "grpo")


def _loop_ppo(lp, old, adv, low, high, dual):
    loss = torch.zeros_like(lp, dtype=torch.float64)
    for i in range(lp.shape[0]):
        for t in range(lp.shape[1]):
            r = math.exp(float(lp[i, t]) - float(old[i, t]))
            a = float(adv[i, t])
            value = max(-a * r, -a * min(max(r, 1 - low), 1 + high))
            if dual is not None and a < 0:
                value = min(value, -a * dual)
            loss[i, t] = value
    return loss


def test_ppo_token_loss_matches_loop_with_dual_clip():
    torch.manual_seed(3)
    lp = torch.randn(4, 9, dtype=torch.float64)
    old = lp + torch.randn(4, 9, dtype=torch.float64) * 1.5  # ratios far outside the clip range
    adv = torch.randn(4, 9, dtype=torch.float64)
    clip = ClipConfig(low=0.2, high=0.28, dual=3.0)
    terms = ppo_token_loss(lp, old, adv, clip)
    torch.testing.assert_close(terms.loss, _loop_ppo(lp, old, adv, 0.2, 0.28, 3.0))
    ratio = torch.exp(lp - old)
    assert torch.equal(terms.clipped_high, (adv > 0) & (ratio > 1.28))
    assert torch.equal(terms.clipped_low, (adv < 0) & (ratio < 0.8))
    assert torch.equal(terms.clipped_dual, (adv < 0) & (ratio > 3.0))
    assert terms.clipped_dual.any() and terms.clipped_high.any() and terms.clipped_low.any()


def test_ppo_gradient_is_zero_exactly_on_clipped_tokens():
    torch.manual_seed(4)
    lp = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    old = (lp + torch.randn(3, 8, dtype=torch.float64)).detach()
    adv = torch.randn(3, 8, dtype=torch.float64)
    terms = ppo_token_loss(lp, old, adv, ClipConfig())
    terms.loss.sum().backward()
    clipped = terms.clipped
    assert torch.all(lp.grad[clipped] == 0)
    ratio = torch.exp(lp - old)
    torch.testing.assert_close(lp.grad[~clipped], (-adv * ratio)[~clipped].detach())


def _loop_aggregate(values, mask, mode, max_len):
    seqs = []
    for row, m in zip(values.tolist(), mask.tolist()):
        seqs.append([v for v, k in zip(row, m) if k])
    if mode == "token-mean":
        flat = [v for s in seqs for v in s]
        return sum(flat) / len(flat)
    if mode == "seq-mean-token-mean":
        return sum(sum(s) / len(s) for s in seqs) / len(seqs)
    if mode == "seq-mean-token-sum":
        return sum(sum(s) for s in seqs) / len(seqs)
    return sum(sum(s) for s in seqs) / (len(seqs) * max_len)


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"])
def test_aggregation_matches_loop_and_is_additive_over_micro_batches(mode):
    torch.manual_seed(5)
    values = torch.randn(6, 10, dtype=torch.float64)
    lengths = torch.tensor([10, 3, 1, 7, 5, 9])
    mask = torch.arange(10)[None, :] < lengths[:, None]
    whole = aggregate(values, mask, mode, max_response_length=12)
    assert whole.item() == pytest.approx(_loop_aggregate(values, mask, mode, 12), rel=1e-12)
    totals = dict(total_tokens=float(mask.sum()), total_sequences=6.0, max_response_length=12)
    parts = sum(aggregate(values[i : i + 2], mask[i : i + 2], mode, **totals) for i in range(0, 6, 2))
    assert parts.item() == pytest.approx(whole.item(), rel=1e-12)


def test_policy_loss_micro_batches_sum_to_mini_batch_gradient():
    torch.manual_seed(6)
    lp = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    old = (lp + 0.3 * torch.randn(4, 6, dtype=torch.float64)).detach()
    adv = torch.randn(4, 1, dtype=torch.float64).expand(4, 6)
    mask = torch.arange(6)[None, :] < torch.tensor([6, 2, 4, 1])[:, None]

    def tokens(rows):
        return PolicyTokens(lp[rows], lp[rows].detach() * 0, old[rows], old[rows] * 0, adv[rows], mask[rows])

    full, _ = policy_loss(tokens(slice(0, 4)), ClipConfig())
    (grad_full,) = torch.autograd.grad(full, lp)
    totals = LossTotals(float(mask.sum()), 4.0, 6)
    split = sum(policy_loss(tokens(slice(i, i + 2)), ClipConfig(), totals=totals)[0] for i in (0, 2))
    (grad_split,) = torch.autograd.grad(split, lp)
    torch.testing.assert_close(split, full)
    torch.testing.assert_close(grad_split, grad_full)


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_kl_estimators(estimator):
    lp = torch.tensor([-1.0, -2.0, -0.5], dtype=torch.float64)
    ref = torch.tensor([-1.5, -1.0, -0.5], dtype=torch.float64)
    d = (lp - ref).tolist()
    expected = {"k1": d, "k2": [x * x / 2 for x in d], "k3": [math.exp(-x) - 1 + x for x in d]}[estimator]
    torch.testing.assert_close(kl_estimate(lp, ref, estimator), torch.tensor(expected, dtype=torch.float64))


def test_clip_config_rejects_bad_values():
    with pytest.raises(ValueError, match="clip ratios"):
        ClipConfig(low=-0.1)
    with pytest.raises(ValueError, match="dual"):
        ClipConfig(dual=0.5)


def test_response_mask_stops_after_first_eos_and_flags_truncation():
    ids = torch.tensor([[5, 6, 1, 0, 0], [5, 1, 7, 1, 0], [5, 6, 7, 8, 9]])
    mask, truncated = response_mask_from_ids(ids, eos_token_id=1)
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]]
    assert truncated.tolist() == [False, False, True]


def test_left_pad():
    ids, mask = left_pad([[1, 2, 3], [4]], pad_id=0)
    assert ids.tolist() == [[1, 2, 3], [0, 0, 4]]
    assert mask.tolist() == [[True, True, True], [False, False, True]]
