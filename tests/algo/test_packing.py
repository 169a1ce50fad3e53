"""Packed sequences (``algorithm.pack_sequences``): every row's real tokens laid end to end in rows
as long as the longest sequence, positions restarting per sequence, attention kept within each
sequence by Hugging Face's packed-sequence masks. The same log-probs, entropies and gradients as
one padded forward, to float32 round-off (different matrix shapes add in another order)."""

from __future__ import annotations

import pytest
import torch

from steer.algo.logprobs import pack_rows, packed_logprobs_and_entropy, response_logprobs_and_entropy
from steer.models.tiny import build_char_tokenizer, build_tiny_policy
from tests.algo.test_shared_prompts import R, batch, run


@pytest.fixture(scope="module")
def tokenizer():
    return build_char_tokenizer()


def test_pack_rows_fills_rows_first_fit_without_overlap():
    lengths = torch.tensor([9, 3, 5, 7, 2, 9, 4])
    row_of, start_of, rows = pack_rows(lengths, capacity=9)
    assert rows == 5 < len(lengths)  # 39 tokens in 5 rows of 9 instead of 7
    for row in range(rows):
        spans = sorted((int(start_of[i]), int(start_of[i] + lengths[i])) for i in range(len(lengths)) if row_of[i] == row)
        assert spans[-1][1] <= 9 and all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("kv_heads", [1, 2, 4])
def test_packed_rows_give_the_padded_values_and_gradients(tokenizer, kv_heads, attention):
    torch.manual_seed(0)
    policy = build_tiny_policy(tokenizer, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=kv_heads)
    policy.config._attn_implementation = attention
    ids, mask, response_mask = batch(tokenizer)
    padded = run(policy, ids, mask, response_mask, share=False, temperature=0.7)
    policy.zero_grad()
    logprobs, entropy = response_logprobs_and_entropy(policy, ids, mask, R, temperature=0.7, pack=True)
    tokens = response_mask.bool()
    assert torch.all(logprobs[~tokens] == 0) and torch.all(entropy[~tokens] == 0)
    loss = (0.7 * logprobs + 0.3 * entropy)[tokens].mean()
    loss.backward()
    torch.testing.assert_close(logprobs[tokens], padded[0], rtol=0, atol=2e-6)
    torch.testing.assert_close(entropy[tokens], padded[1], rtol=0, atol=2e-6)
    assert loss.item() == pytest.approx(padded[2], rel=1e-6)
    for name, parameter in policy.named_parameters():
        grad = padded[3][name]
        assert grad.abs().max() > 0, name
        torch.testing.assert_close(parameter.grad, grad, rtol=0, atol=1e-5 * float(grad.abs().max()), msg=name)


def test_packing_really_removes_the_padding(tokenizer, monkeypatch):
    """The decoder sees fewer token slots than the padded batch, and every real token once."""
    import steer.algo.logprobs as logprobs

    policy = build_tiny_policy(tokenizer, hidden_size=32, num_layers=1)
    ids, mask, _ = batch(tokenizer)
    seen = {}
    backbone = logprobs._backbone
    monkeypatch.setattr(logprobs, "_backbone", lambda model, **inputs: seen.update(inputs) or backbone(model, **inputs))
    with torch.no_grad():
        packed_logprobs_and_entropy(policy, ids, mask, R)
    assert seen["input_ids"].numel() < ids.numel()
    assert seen["input_ids"].shape[1] == int(mask.sum(-1).max())  # rows as long as the longest sequence
    assert int(mask.sum()) <= seen["input_ids"].numel()
    assert sorted(seen["input_ids"][seen["input_ids"] != 0].tolist()) == sorted(ids[mask.bool() & (ids != 0)].tolist())
