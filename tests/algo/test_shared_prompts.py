"""Shared prompt prefixes (``algorithm.share_prompt_prefix``): each prompt's forward and backward run
once for the adjacent rows that repeat it, with the same log-probs, entropies, loss and gradients as
one ``[prompt | response]`` forward per row, to float32 round-off.

Tolerances: the forward values come out bitwise equal here; gradients differ by the order in which
float32 sums the n samples' contributions (measured <= 6e-7 of each tensor's largest entry), so
1e-5 relative to that entry. A wrong cache (a response not attending to its prompt, a shifted
position) moves log-probs by ~1e-1.
"""

from __future__ import annotations

import pytest
import torch

from steer.algo.logprobs import prompt_groups, response_logprobs_and_entropy
from steer.models.tiny import build_char_tokenizer, build_tiny_policy
from steer.rollout.base import left_pad

TEXTS = ["Q: 1+2\nA: ", "Q: a longer prompt 7+8\nA: ", "Q: x\nA: "]
N, R = 3, 7


@pytest.fixture(scope="module")
def tokenizer():
    return build_char_tokenizer()


def batch(tokenizer):
    """3 prompts x 3 samples, left-padded prompts, right-padded responses of 1-7 tokens."""
    prompt_ids, prompt_mask = left_pad([tokenizer(t).input_ids for t in TEXTS for _ in range(N)], tokenizer.pad_token_id)
    generator = torch.Generator().manual_seed(1)
    lengths = torch.tensor([7, 3, 5, 1, 6, 7, 2, 7, 4])
    response_mask = (torch.arange(R)[None] < lengths[:, None]).long()
    responses = torch.randint(5, 60, (len(lengths), R), generator=generator) * response_mask
    return torch.cat([prompt_ids, responses], 1), torch.cat([prompt_mask, response_mask], 1), response_mask


def run(policy, ids, mask, response_mask, share, temperature=1.0):
    policy.zero_grad()
    logprobs, entropy = response_logprobs_and_entropy(policy, ids, mask, R, share_prompts=share, temperature=temperature)
    tokens = response_mask.bool()
    loss = (0.7 * logprobs + 0.3 * entropy)[tokens].mean()
    loss.backward()
    return logprobs.detach()[tokens], entropy.detach()[tokens], loss.item(), {
        name: p.grad.clone() for name, p in policy.named_parameters()}


@pytest.mark.parametrize("kv_heads", [1, 2, 4])
@pytest.mark.parametrize("rows", [slice(0, 9), slice(2, 7), slice(4, 5)], ids=["whole", "cut_groups", "one_row"])
def test_shared_prompts_give_the_same_values_and_gradients(tokenizer, kv_heads, rows):
    torch.manual_seed(0)
    policy = build_tiny_policy(tokenizer, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=kv_heads)
    ids, mask, response_mask = batch(tokenizer)
    plain = run(policy, ids[rows], mask[rows], response_mask[rows], share=False, temperature=0.7)
    shared = run(policy, ids[rows], mask[rows], response_mask[rows], share=True, temperature=0.7)
    torch.testing.assert_close(shared[0], plain[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(shared[1], plain[1], rtol=0, atol=1e-6)
    assert shared[2] == pytest.approx(plain[2], rel=1e-6)
    for name, grad in plain[3].items():
        assert grad.abs().max() > 0, name
        torch.testing.assert_close(shared[3][name], grad, rtol=0, atol=1e-5 * float(grad.abs().max()), msg=name)


def test_groups_are_runs_of_adjacent_rows_with_the_same_prompt(tokenizer):
    ids, mask, _ = batch(tokenizer)
    first, group = prompt_groups(ids, mask, R)
    assert first.tolist() == [0, 3, 6] and group.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    first, group = prompt_groups(ids[2:7], mask[2:7], R)
    assert first.tolist() == [0, 1, 4] and group.tolist() == [0, 1, 1, 1, 2]
    distinct = torch.tensor([0, 3, 6])
    assert prompt_groups(ids[distinct], mask[distinct], R) is None  # nothing to share: the plain forward
    # the same ids under another mask are another prompt
    other = mask.clone()
    other[1, 0] = 1 - other[1, 0]
    assert prompt_groups(ids, other, R)[1].tolist()[:3] == [0, 1, 2]


def test_a_wrong_prompt_would_be_seen(tokenizer):
    """The check above can fail: the shared path with the prompts of other rows moves log-probs."""
    torch.manual_seed(0)
    policy = build_tiny_policy(tokenizer, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2)
    ids, mask, response_mask = batch(tokenizer)
    swapped_ids, swapped_mask = ids.clone(), mask.clone()
    prompt = ids.shape[1] - R
    swapped_ids[:, :prompt], swapped_mask[:, :prompt] = ids[[3, 3, 3, 0, 0, 0, 6, 6, 6], :prompt], mask[[3, 3, 3, 0, 0, 0, 6, 6, 6], :prompt]
    with torch.no_grad():
        right, _ = response_logprobs_and_entropy(policy, ids, mask, R, share_prompts=True)
        wrong, _ = response_logprobs_and_entropy(policy, swapped_ids, swapped_mask, R, share_prompts=True)
    assert (right - wrong)[response_mask[:3].bool().repeat(3, 1)].abs().max() > 1e-2


def test_gradient_checkpointing_falls_back_to_the_plain_forward(tokenizer):
    """Hugging Face's checkpointed layers drop a key/value cache while training: sharing would then
    attend without the prompt, so it is skipped (same values as the plain path)."""
    torch.manual_seed(0)
    policy = build_tiny_policy(tokenizer, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2)
    policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    policy.train()
    ids, mask, response_mask = batch(tokenizer)
    plain = run(policy, ids, mask, response_mask, share=False)
    shared = run(policy, ids, mask, response_mask, share=True)
    torch.testing.assert_close(shared[0], plain[0], rtol=0, atol=0)
    for name, grad in plain[3].items():
        torch.testing.assert_close(shared[3][name], grad, rtol=0, atol=0, msg=name)
