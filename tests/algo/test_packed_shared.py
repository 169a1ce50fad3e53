"""Packed and shared at once (``algorithm.pack_sequences`` + ``algorithm.share_prompt_prefix``): the
hand-applied layers of :mod:`steer.algo.packed_shared` run each prompt once and no padding through
the projections and MLPs, with the log-probs, entropies, loss and gradients of one padded
``[prompt | response]`` forward per row, to float32 round-off (tolerances as in
``test_shared_prompts.py``; a wrong prompt or position moves log-probs by ~1e-1).
"""

from __future__ import annotations

import pytest
import torch

import steer.algo.logprobs as logprobs_module
import steer.algo.packed_shared as packed_shared
from steer.algo.logprobs import response_logprobs_and_entropy
from steer.models.loader import cpp_compiler_found
from steer.models.tiny import build_char_tokenizer, build_tiny_policy
from tests.algo.test_shared_prompts import R, batch


@pytest.fixture(scope="module")
def tokenizer():
    return build_char_tokenizer()


def run(policy, ids, mask, response_mask, **options):
    policy.zero_grad()
    logprobs, entropy = response_logprobs_and_entropy(policy, ids, mask, R, temperature=0.7, **options)
    tokens = response_mask.bool()
    loss = (0.7 * logprobs + 0.3 * entropy)[tokens].mean()
    loss.backward()
    return logprobs.detach(), entropy.detach(), loss.item(), {name: p.grad.clone() for name, p in policy.named_parameters()}


def assert_same(got, expected, response_mask):
    tokens = response_mask.bool()
    torch.testing.assert_close(got[0][tokens], expected[0][tokens], rtol=0, atol=2e-6)
    torch.testing.assert_close(got[1][tokens], expected[1][tokens], rtol=0, atol=2e-6)
    assert torch.all(got[0][~tokens] == 0) and torch.all(got[1][~tokens] == 0)
    assert got[2] == pytest.approx(expected[2], rel=1e-6)
    for name, grad in expected[3].items():
        assert grad.abs().max() > 0, name
        torch.testing.assert_close(got[3][name], grad, rtol=0, atol=1e-5 * float(grad.abs().max()), msg=name)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("kv_heads", [1, 2, 4])
@pytest.mark.parametrize("rows", [slice(0, 9), slice(2, 7)], ids=["whole", "cut_groups"])
@pytest.mark.parametrize("buckets", ["one", "many"])
def test_packed_and_shared_give_the_padded_values_and_gradients(tokenizer, kv_heads, attention, rows, buckets, monkeypatch):
    """``many``: every halving of the response length starts an attention bucket (whole: input widths
    6-4, 3-2 and 1)."""
    made = []
    if buckets == "many":
        monkeypatch.setattr(packed_shared, "BUCKET_MIN_SAVING", 0)
    split = packed_shared.attention_buckets
    monkeypatch.setattr(packed_shared, "attention_buckets", lambda *a, **k: made.append(split(*a, **k)) or made[-1])
    torch.manual_seed(0)
    policy = build_tiny_policy(tokenizer, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=kv_heads)
    policy.config._attn_implementation = attention
    ids, mask, response_mask = (t[rows] for t in batch(tokenizer))
    padded = run(policy, ids, mask, response_mask)
    calls = []
    hidden = logprobs_module.packed_shared_hidden
    monkeypatch.setattr(logprobs_module, "packed_shared_hidden", lambda *a, **k: calls.append(1) or hidden(*a, **k))
    both = run(policy, ids, mask, response_mask, pack=True, share_prompts=True)
    assert calls, "the packed-and-shared path did not run"
    assert (len(made[0]) == 1) == (buckets == "one"), made
    assert_same(both, padded, response_mask)


def test_attention_buckets_halve_where_it_saves_enough():
    widths = [128, 120, 70, 64, 40, 33, 20, 9, 8, 3, 1]
    assert packed_shared.attention_buckets(widths, 24, min_saving=0) == [(0, 3), (3, 6), (6, 7), (7, 9), (9, 10), (10, 11)]
    # A cut must save min_saving (query, key) pairs: the rows after it x the width they shed x their keys.
    saving_at_3 = (len(widths) - 3) * (128 - 64) * (24 + 128)
    assert packed_shared.attention_buckets(widths, 24, min_saving=saving_at_3 + 1)[0] != (0, 3)
    assert packed_shared.attention_buckets(widths, 24, min_saving=10**9) == [(0, 11)]
    assert packed_shared.attention_buckets([5, 5, 5], 24, min_saving=0) == [(0, 3)]
    assert packed_shared.attention_buckets([], 24) == []


def test_each_prompt_once_and_no_padding_reach_the_projections(tokenizer):
    """The layers see each prompt's real tokens once and each response's real tokens but its last."""
    policy = build_tiny_policy(tokenizer, hidden_size=32, num_layers=1)
    ids, mask, response_mask = batch(tokenizer)
    seen = []
    handle = policy.model.layers[0].self_attn.q_proj.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[0]))
    with torch.no_grad():
        response_logprobs_and_entropy(policy, ids, mask, R, pack=True, share_prompts=True)
    handle.remove()
    prompt_mask = mask[:, : ids.shape[1] - R]
    prompts_once = int(prompt_mask[::3].sum())  # 3 prompts x 3 samples
    responses = int((response_mask.sum(-1) - 1).clamp(min=0).sum())
    assert seen == [prompts_once + responses]
    assert seen[0] < int(mask.sum()) < mask.numel()  # fewer than packing alone, which is fewer than padded


def test_a_wrong_prompt_would_be_seen(tokenizer):
    torch.manual_seed(0)
    policy = build_tiny_policy(tokenizer, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2)
    ids, mask, response_mask = batch(tokenizer)
    prompt = ids.shape[1] - R
    order = [3, 3, 3, 0, 0, 0, 6, 6, 6]
    swapped_ids, swapped_mask = ids.clone(), mask.clone()
    swapped_ids[:, :prompt], swapped_mask[:, :prompt] = ids[order, :prompt], mask[order, :prompt]
    with torch.no_grad():
        right, _ = response_logprobs_and_entropy(policy, ids, mask, R, pack=True, share_prompts=True)
        wrong, _ = response_logprobs_and_entropy(policy, swapped_ids, swapped_mask, R, pack=True, share_prompts=True)
    assert (right - wrong)[response_mask[:3].bool().repeat(3, 1)].abs().max() > 1e-2


def test_responses_of_at_most_one_token(tokenizer):
    """No response has an input token: only the prompts run, and predict every response's token."""
    torch.manual_seed(0)
    policy = build_tiny_policy(tokenizer, hidden_size=64, num_layers=2, num_heads=4)
    ids, mask, response_mask = batch(tokenizer)
    short = response_mask.clone()
    short[:, 1:] = 0
    short[4] = 0  # one empty response
    width = ids.shape[1] - R
    ids, mask = ids.clone(), mask.clone()
    ids[:, width:] *= short
    mask[:, width:] = short
    assert_same(run(policy, ids, mask, short, pack=True, share_prompts=True), run(policy, ids, mask, short), short)


def test_gradient_checkpointing_recomputes_each_layer(tokenizer):
    """Unlike the cache-based sharing, this path keeps sharing under gradient checkpointing: each
    layer runs again in the backward, and the values and gradients stay those of the padded path."""
    torch.manual_seed(0)
    policy = build_tiny_policy(tokenizer, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2)
    policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    policy.train()
    ids, mask, response_mask = batch(tokenizer)
    padded = run(policy, ids, mask, response_mask)
    calls = []
    mlp = policy.model.layers[1].mlp
    forward = mlp.forward  # (forward hooks do not fire in the recomputation)
    mlp.forward = lambda *args: calls.append(1) or forward(*args)
    both = run(policy, ids, mask, response_mask, pack=True, share_prompts=True)
    assert len(calls) == 2  # the forward, then its recomputation in the backward
    assert_same(both, padded, response_mask)


def test_bf16_autocast_stays_within_bf16_round_off(tokenizer):
    """Under ``model.compute_dtype=bfloat16`` both paths run the same operators in bf16: their values
    differ by bf16 round-off (the order of the sums), far less than a wrong prompt would move them."""
    torch.manual_seed(0)
    policy = build_tiny_policy(tokenizer, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2)
    policy.config._attn_implementation = "eager"
    ids, mask, response_mask = batch(tokenizer)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        padded = run(policy, ids, mask, response_mask)
        both = run(policy, ids, mask, response_mask, pack=True, share_prompts=True)
    tokens = response_mask.bool()
    assert (both[0] - padded[0])[tokens].abs().max() < 3e-2
    for name, grad in padded[3].items():
        cosine = torch.nn.functional.cosine_similarity(both[3][name].flatten(), grad.flatten(), dim=0)
        assert cosine > 0.99, name


def test_models_it_cannot_apply_fall_back_to_packing(tokenizer, monkeypatch):
    """Where the layers cannot be applied by hand (another architecture, FSDP-sharded parameters),
    both knobs pack without sharing, with the same values."""
    torch.manual_seed(0)
    policy = build_tiny_policy(tokenizer, hidden_size=64, num_layers=2, num_heads=4)
    ids, mask, response_mask = batch(tokenizer)
    monkeypatch.setattr(logprobs_module, "supports_functional", lambda model: False)
    monkeypatch.setattr(logprobs_module, "packed_shared_hidden", lambda *a, **k: pytest.fail("not supported"))
    packed = []
    original = logprobs_module.packed_logprobs_and_entropy
    monkeypatch.setattr(logprobs_module, "packed_logprobs_and_entropy", lambda *a, **k: packed.append(1) or original(*a, **k))
    assert_same(run(policy, ids, mask, response_mask, pack=True, share_prompts=True), run(policy, ids, mask, response_mask),
                response_mask)
    assert packed == [1]


@pytest.mark.skipif(not cpp_compiler_found(), reason="torch.compile's CPU kernels need a C++ compiler")
def test_compiled_layers_give_the_padded_values_and_gradients(tokenizer):
    """``model.compile``: the layers' arithmetic around attention through torch.compile (dynamic
    shapes) gives the padded path's values and gradients to float32 round-off, also for a batch of
    other widths (the cut rows) without a new graph, and under gradient checkpointing."""
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    policy = build_tiny_policy(tokenizer, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2)
    policy.config._attn_implementation = "eager"
    packed_shared.compiled_layer_pieces.cache_clear()
    for rows in (slice(0, 9), slice(2, 7)):
        ids, mask, response_mask = (t[rows] for t in batch(tokenizer))
        padded = run(policy, ids, mask, response_mask)
        compiled = run(policy, ids, mask, response_mask, pack=True, share_prompts=True, compiled=True)
        assert_same(compiled, padded, response_mask)
        if rows.start == 0:
            graphs = counters["stats"]["unique_graphs"]
            assert graphs >= 2  # the two pieces (forward graphs; their backward is compiled with them)
    assert packed_shared.compiled_layer_pieces.cache_info().currsize == 1
    assert counters["stats"]["unique_graphs"] == graphs  # the other widths reused the dynamic graphs
    # Under gradient checkpointing the backward recomputes each layer through the compiled pieces.
    policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    policy.train()  # (checkpointed layers recompute only while training)
    ids, mask, response_mask = batch(tokenizer)
    assert_same(run(policy, ids, mask, response_mask, pack=True, share_prompts=True, compiled=True),
                run(policy, ids, mask, response_mask), response_mask)
