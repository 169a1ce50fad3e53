"""The output head's hand-written backward: exact gradients, one [tokens, V] tensor kept per chunk."""

from __future__ import annotations

import torch

from steer.algo.logprobs import _head_chunk, _LogprobEntropy, chunked_logprobs_and_entropy, logprobs_and_entropy_from_logits


def test_the_backward_is_the_analytic_gradient():
    torch.manual_seed(0)
    z = torch.randn(9, 13, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 13, (9,))
    assert torch.autograd.gradcheck(lambda logits: _LogprobEntropy.apply(logits, targets), (z,))


def _rounding_bound(hidden: torch.Tensor, weight: torch.Tensor, temperature: float) -> torch.Tensor:
    """How far two float32 evaluations of the same log-prob or entropy may drift apart, per token.

    The chunked head runs the same float32 operations as the plain path, on blocks of rows instead
    of the whole matrix. A BLAS kernel may add a row's D products in another order for another
    block shape, so each logit carries a different rounding: at most D units of roundoff
    (u = 2^-24) times the largest partial sum, |h| @ |w|^T (the dot-product bound, Higham, Accuracy
    and Stability of Numerical Algorithms, eq. 3.5). log_softmax and the entropy then subtract
    quantities of that size, adding a few roundings each. So: (2 D + 8) u * max_v |h||w|_v / T per
    token: 4e-5 to 1e-4 here, against 2e-6 to 4e-6 measured. What it rules out: any real error of the chunking (a wrong row, a
    chunk dropped or taken twice, a wrong temperature) moves values by 0.1 or more.
    """
    unit_roundoff = torch.finfo(torch.float32).eps / 2
    scale = (hidden.detach().abs() @ weight.detach().abs().T).amax(-1) / temperature
    return (2 * hidden.shape[-1] + 8) * unit_roundoff * scale


def test_chunked_head_matches_plain_autograd_values_and_gradients():
    torch.manual_seed(1)
    hidden = torch.randn(3, 10, 16, requires_grad=True)
    weight = torch.randn(40, 16, requires_grad=True)
    targets = torch.randint(0, 40, (3, 10))
    for temperature in (1.0, 0.6):
        lp, ent = chunked_logprobs_and_entropy(hidden, weight, targets, temperature=temperature, chunk_tokens=7)
        ref_lp, ref_ent = logprobs_and_entropy_from_logits(hidden @ weight.T, targets, temperature)
        exact_lp, exact_ent = logprobs_and_entropy_from_logits(hidden.double() @ weight.double().T, targets, temperature)
        bound = _rounding_bound(hidden, weight, temperature)
        assert bound.max() < 2e-4  # a tolerance that still tells a right value from a wrong one
        for got_value, plain, exact in ((lp, ref_lp, exact_lp), (ent, ref_ent, exact_ent)):
            # the same values as the plain path up to float32 rounding, and as close to float64 as it is
            assert ((got_value - plain).abs() <= bound).all(), (got_value - plain).abs().max()
            assert ((got_value.double() - exact).abs() <= bound).all(), (got_value.double() - exact).abs().max()
        wrong_row = lp.flatten().roll(1).view_as(lp)  # what a chunk-offset error would give
        assert not ((wrong_row - ref_lp).abs() <= bound).all()
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
