"""The output head's hand-written backward: exact gradients, one [tokens, V] tensor kept per chunk."""

from __future__ import annotations

import torch

from steer.algo.logprobs import _head_chunk, _LogprobEntropy, chunked_logprobs_and_entropy, logprobs_and_entropy_from_logits


def test_the_backward_is_the_analytic_gradient():
    torch.manual_seed(0)
    z = torch.randn(9, 13, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 13, (9,))
    assert torch.autograd.gradcheck(lambda logits: _LogprobEntropy.apply(logits, targets), (z,))


def test_chunked_head_matches_plain_autograd_values_and_gradients():
    torch.manual_seed(1)
    hidden = torch.randn(3, 10, 16, requires_grad=True)
    weight = torch.randn(40, 16, requires_grad=True)
    targets = torch.randint(0, 40, (3, 10))
    for temperature in (1.0, 0.6):
        lp, ent = chunked_logprobs_and_entropy(hidden, weight, targets, temperature=temperature, chunk_tokens=7)
        ref_lp, ref_ent = logprobs_and_entropy_from_logits(hidden @ weight.T, targets, temperature)
        assert torch.equal(lp, ref_lp) and torch.equal(ent, ref_ent)  # the forward is unchanged, bit for bit
        g_lp, g_ent = torch.randn_like(lp), torch.randn_like(ent)
        got = torch.autograd.grad((lp * g_lp).sum() + (ent * g_ent).sum(), (hidden, weight))
        want = torch.autograd.grad((ref_lp * g_lp).sum() + (ref_ent * g_ent).sum(), (hidden, weight))
        for a, b in zip(got, want):
            assert b.abs().max() > 0
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_a_chunk_keeps_one_logits_tensor_for_its_backward():
    tokens, vocab = 64, 500
    hidden = torch.randn(tokens, 8, requires_grad=True)
    weight = torch.randn(vocab, 8, requires_grad=True)
    targets = torch.randint(0, vocab, (tokens,))
    saved: list[int] = []

    def pack(tensor):
        saved.append(tensor.numel() * tensor.element_size())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        _head_chunk(hidden, weight, None, targets, 1.0)
    logits_bytes = tokens * vocab * 4
    assert sum(saved) < 1.5 * logits_bytes  # autograd through softmax * z would keep three such tensors
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        saved.clear()
        logprobs_and_entropy_from_logits(hidden @ weight.T, targets)
    assert sum(saved) >= 2.5 * logits_bytes  # the reference it replaces (so this test can tell them apart)
