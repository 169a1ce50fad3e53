"""The HF rollout engine and its decode loop: exact sampler log-probs (temperature, top-p, left
padding, grouped-query attention), the sampled distribution, EOS and padding, seeded reproducibility."""

from __future__ import annotations

import pytest
import torch
from scipy.stats import chisquare
from transformers import TopPLogitsWarper

from steer.algo.logprobs import response_logprobs_and_entropy
from steer.models.tiny import build_char_tokenizer, build_tiny_policy
from steer.rollout.base import SamplingParams, left_pad, response_mask_from_ids
from steer.rollout.decode import gumbel_max, sample, supports_functional, top_p_filter
from steer.rollout.hf import HFRolloutEngine


@pytest.fixture(scope="module")
def engine():
    torch.manual_seed(0)
    tokenizer = build_char_tokenizer()
    policy = build_tiny_policy(tokenizer, hidden_size=32, num_layers=1).eval()
    return tokenizer, policy, HFRolloutEngine(policy, tokenizer.pad_token_id, tokenizer.eos_token_id)


def teacher_forced_sampler_logprobs(policy, prompt_ids, prompt_mask, response_ids, temperature, top_p):
    """Reference: one forward over prompt + response (the model's own attention and masks), then
    transformers' own nucleus warper on logits / temperature; ``[B, R]`` log-probs of the tokens."""
    ids = torch.cat([prompt_ids, response_ids], dim=1)
    mask = torch.cat([prompt_mask, torch.ones_like(response_ids, dtype=torch.bool)], dim=1)
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = policy(input_ids=ids, attention_mask=mask.long(), position_ids=positions).logits.float()
    logits = logits[:, prompt_ids.shape[1] - 1 : -1] / temperature
    if top_p < 1:
        warper = TopPLogitsWarper(top_p)
        logits = torch.stack([warper(None, logits[:, t]) for t in range(logits.shape[1])], dim=1)
    return torch.log_softmax(logits, -1).gather(-1, response_ids[..., None]).squeeze(-1)


@pytest.mark.parametrize("num_kv_heads", [4, 2])
@pytest.mark.parametrize("functional", [True, False])
@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 0.85), (1.3, 0.5)])
def test_sampled_logprobs_equal_a_teacher_forced_forward(functional, num_kv_heads, temperature, top_p):
    tokenizer = build_char_tokenizer()
    policy = build_tiny_policy(tokenizer, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=num_kv_heads).eval()
    assert supports_functional(policy)
    # Left padding of 0, 9 and 15 positions.
    prompts = [tokenizer(text).input_ids for text in ("Q: Compute 12+30+7.\nA: ", "Q: hi\nA: ", "A: ")]
    prompt_ids, prompt_mask = left_pad([p for p in prompts for _ in range(4)], tokenizer.pad_token_id)
    assert prompt_mask.sum(-1).unique().numel() == 3
    torch.manual_seed(0)
    response_ids, logprobs = sample(policy, prompt_ids, prompt_mask, 12, tokenizer.eos_token_id, tokenizer.pad_token_id,
                                    temperature=temperature, top_p=top_p, functional=functional)
    assert logprobs.dtype == torch.float32 and response_ids.shape == logprobs.shape
    reference = teacher_forced_sampler_logprobs(policy, prompt_ids, prompt_mask, response_ids, temperature, top_p)
    mask, _ = response_mask_from_ids(response_ids, tokenizer.eos_token_id)
    assert mask.sum() > 24
    torch.testing.assert_close(logprobs[mask], reference[mask], atol=2e-5, rtol=0)
    assert torch.isfinite(logprobs[mask]).all()  # a filtered token was never drawn


def two_prompts_four_times():
    """A 2-layer tiny policy and 8 left-padded rows of two prompts."""
    tokenizer = build_char_tokenizer()
    policy = build_tiny_policy(tokenizer, hidden_size=32, num_layers=2).eval()
    return policy, *left_pad([tokenizer("Q: 1+2\nA: ").input_ids, tokenizer("A").input_ids] * 4, 0)


def test_the_functional_and_the_hf_forward_loops_draw_the_same_tokens():
    policy, prompt_ids, prompt_mask = two_prompts_four_times()
    draws = []
    for functional in (True, False):
        torch.manual_seed(3)
        draws.append(sample(policy, prompt_ids, prompt_mask, 16, 1, 0, temperature=0.8, top_p=0.9, functional=functional))
    assert torch.equal(draws[0][0], draws[1][0])
    torch.testing.assert_close(draws[0][1], draws[1][1], atol=2e-5, rtol=0)


@pytest.mark.parametrize("functional", [True, False])
def test_the_draws_can_enter_the_updates_autograd_graph(functional):
    """The functional loop decodes in inference mode; what it returns are ordinary tensors, which an
    embedding lookup with gradients (the update's first operator) may save for its backward."""
    tokenizer = build_char_tokenizer()
    policy = build_tiny_policy(tokenizer, hidden_size=32, num_layers=1).train()
    prompt_ids, prompt_mask = left_pad([tokenizer("Q: 1+2\nA: ").input_ids] * 4, 0)
    response_ids, logprobs = sample(policy, prompt_ids, prompt_mask, 6, 1, 0, functional=functional, group=4)
    assert not response_ids.is_inference() and not logprobs.is_inference()
    policy.get_input_embeddings()(response_ids).sum().backward()
    assert policy.get_input_embeddings().weight.grad.abs().sum() > 0


@pytest.mark.parametrize("functional", [True, False])
def test_cpu_sampling_under_bf16_autocast_runs_in_float32(functional):
    """model.compute_dtype=bfloat16 on CPU (Lightning's autocast around the whole step): the decoding
    still runs in the parameters' float32 (bf16 decoding is slower on CPU), so the draws and their
    log-probs equal those without autocast, and the teacher-forced float32 forward's. The update
    that follows keeps autocast (checked after the draw)."""
    policy, prompt_ids, prompt_mask = two_prompts_four_times()
    draws = []
    for autocast in (False, True):
        torch.manual_seed(5)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            draws.append(sample(policy, prompt_ids, prompt_mask, 16, 1, 0, functional=functional))
            assert torch.is_autocast_enabled("cpu") == autocast
    assert torch.equal(draws[0][0], draws[1][0])
    assert torch.equal(draws[0][1], draws[1][1])
    # bf16 arithmetic would move these log-probs by ~1e-2 (bench_update_kernels.py: 5e-3 to 7e-3 at larger sizes).
    reference = teacher_forced_sampler_logprobs(policy, prompt_ids, prompt_mask, draws[1][0], 1.0, 1.0)
    mask, _ = response_mask_from_ids(draws[1][0], 1)
    torch.testing.assert_close(draws[1][1][mask], reference[mask], atol=2e-5, rtol=0)


@pytest.mark.parametrize("num_kv_heads", [4, 2])
def test_a_prefill_shared_by_each_prompts_samples_changes_nothing(num_kv_heads):
    """group=n computes each prompt once and copies its keys, values and first logits to its n rows:
    the same tokens and log-probs as computing every row (left padding of 0, 9 and 15 positions)."""
    from steer.rollout.decode import FunctionalDecoder

    tokenizer = build_char_tokenizer()
    policy = build_tiny_policy(tokenizer, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=num_kv_heads).eval()
    prompts = [tokenizer(text).input_ids for text in ("Q: Compute 12+30+7.\nA: ", "Q: hi\nA: ", "A: ")]
    prompt_ids, prompt_mask = left_pad([p for p in prompts for _ in range(4)], tokenizer.pad_token_id)
    positions = (prompt_mask.long().cumsum(-1) - 1).clamp(min=0)
    every_row, shared = (FunctionalDecoder(policy, prompt_mask, prompt_ids.shape[1] + 4) for _ in range(2))
    with torch.no_grad():
        torch.testing.assert_close(shared.prefill(prompt_ids, positions, group=4), every_row.prefill(prompt_ids, positions), atol=1e-6, rtol=0)
    for a, b in zip(shared.keys + shared.values, every_row.keys + every_row.values):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
        assert a[:, :, : prompt_ids.shape[1]].abs().sum() > 0
    draws = []
    for group in (1, 4):
        torch.manual_seed(5)
        draws.append(sample(policy, prompt_ids, prompt_mask, 12, tokenizer.eos_token_id, tokenizer.pad_token_id, group=group))
    assert torch.equal(draws[0][0], draws[1][0])
    torch.testing.assert_close(draws[0][1], draws[1][1], atol=1e-6, rtol=0)
    assert len({tuple(row.tolist()) for row in draws[0][0][:4]}) > 1  # the 4 samples of a prompt differ
    with pytest.raises(ValueError, match="group=5"):
        sample(policy, prompt_ids, prompt_mask, 4, tokenizer.eos_token_id, tokenizer.pad_token_id, group=5)


@pytest.mark.parametrize("functional", [True, False])
def test_bf16_decoding_tracks_the_float32_forward_within_bf16_round_off(functional):
    """dtype=bfloat16 (rollout.engine.dtype): the functional decoder holds its joined projections,
    the head and its key/value buffers in bf16 (the other loop runs under bf16 autocast); the sampler's log-probs stay
    within bf16 round-off of the teacher-forced float32 forward of the drawn tokens, and are not
    the float32 ones (the arithmetic did change)."""
    from steer.rollout.decode import FunctionalDecoder

    policy, prompt_ids, prompt_mask = two_prompts_four_times()
    draws = {}
    for dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(5)
        draws[dtype] = sample(policy, prompt_ids, prompt_mask, 16, 1, 0, functional=functional, dtype=dtype)
    response_ids, logprobs = draws[torch.bfloat16]
    reference = teacher_forced_sampler_logprobs(policy, prompt_ids, prompt_mask, response_ids, 1.0, 1.0)
    mask, _ = response_mask_from_ids(response_ids, 1)
    gap = (logprobs - reference)[mask].abs()
    assert mask.sum() > 40 and 1e-4 < gap.max() < 5e-2, gap.max()
    # The same seed draws nearly the same tokens: the Gumbel noise is shared, the logits differ by round-off.
    assert (draws[torch.float32][0] == response_ids).float().mean() > 0.9
    if functional:
        decoder = FunctionalDecoder(policy, prompt_mask, prompt_ids.shape[1] + 2, dtype=torch.bfloat16)
        projections = [projection for block in decoder.blocks for projection in block[:4]] + [decoder.head_projection]
        assert {t.dtype for projection in projections for t in projection.tensors()} == {torch.bfloat16}
        # The buffers are held in bf16; the residual stream stays in the parameters' float32.
        assert {t.dtype for t in [*decoder.keys, *decoder.values]} == {torch.bfloat16}
        logits = decoder.prefill(prompt_ids, (prompt_mask.long().cumsum(-1) - 1).clamp(min=0))
        assert logits.dtype == torch.bfloat16 and decoder.keys[0][:, :, : prompt_ids.shape[1]].abs().sum() > 0
    with pytest.raises(ValueError, match="rollout.engine.dtype='bf16'"):
        HFRolloutEngine(policy, 0, 1, dtype="bf16")


@pytest.mark.parametrize("functional", [True, False])
def test_the_first_token_follows_the_exact_filtered_softmax(functional):
    """Chi-square of 4,000 first tokens against the teacher-forced distribution after T and top-p."""
    tokenizer = build_char_tokenizer()
    policy = build_tiny_policy(tokenizer, hidden_size=32, num_layers=1, seed=4).eval()
    with torch.no_grad():  # sharpen the random policy so that top-p leaves a handful of tokens
        policy.model.norm.weight.mul_(4.0)
    prompt = tokenizer("Q: 7+8\nA: ").input_ids
    rows = 4000
    prompt_ids, prompt_mask = left_pad([prompt] * rows, 0)
    torch.manual_seed(1)
    response_ids, _ = sample(policy, prompt_ids, prompt_mask, 1, tokenizer.eos_token_id, 0, temperature=0.8, top_p=0.7,
                             functional=functional)
    with torch.no_grad():
        logits = policy(torch.tensor([prompt])).logits[0, -1].float() / 0.8
    probs = torch.softmax(TopPLogitsWarper(0.7)(None, logits[None])[0], -1)
    kept = probs > 0
    assert 5 <= int(kept.sum()) < 50 and probs.max() > 0.2
    counts = torch.bincount(response_ids[:, 0], minlength=len(tokenizer)).double()
    assert counts[~kept].sum() == 0  # nothing outside the nucleus
    expected = probs[kept].double() / probs[kept].double().sum() * rows
    assert chisquare(counts[kept].numpy(), expected.numpy()).pvalue > 1e-3


def test_gumbel_max_draws_the_softmax_distribution_and_never_a_masked_token():
    torch.manual_seed(0)
    logprobs = torch.log_softmax(torch.tensor([2.0, 1.0, 0.0, -1.0, float("-inf"), 0.5]), -1)
    draws = gumbel_max(logprobs.expand(40_000, -1))
    counts = torch.bincount(draws, minlength=6).double()
    assert counts[4] == 0
    expected = logprobs.double().exp()
    keep = expected > 0
    expected = expected / expected[keep].sum() * 40_000
    assert chisquare(counts[keep].numpy(), expected[keep].numpy()).pvalue > 1e-3
    # A wrong sampler (e.g. a uniform one) is rejected by the same check.
    uniform = torch.bincount(torch.randint(0, 6, (40_000,)), minlength=6).double()
    uniform = uniform[keep] / uniform[keep].sum() * 40_000
    assert chisquare(uniform.numpy(), expected[keep].numpy()).pvalue < 1e-6


def test_top_p_filter_keeps_the_same_tokens_as_transformers():
    torch.manual_seed(0)
    logits = torch.randn(64, 101) * 3
    for top_p in (0.1, 0.5, 0.9, 0.99):
        ours = top_p_filter(logits, top_p)
        theirs = TopPLogitsWarper(top_p)(None, logits.clone())
        assert torch.equal(torch.isinf(ours), torch.isinf(theirs)), top_p
        assert torch.equal(ours[~torch.isinf(ours)], logits[~torch.isinf(ours)])
    assert (~torch.isinf(top_p_filter(logits, 1e-6))).sum(-1).eq(1).all()  # at least the top token


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_engine_logprobs_equal_the_policy_logprobs_at_the_same_temperature(engine, temperature):
    tokenizer, policy, rollout_engine = engine
    prompts = [tokenizer("Q: Compute 1+2.\nA: ").input_ids, tokenizer("Q: hi\nA: ").input_ids]
    batch = rollout_engine.generate(prompts, SamplingParams(temperature=temperature, max_new_tokens=12, n=3))
    assert batch.response_ids.shape[0] == 6
    assert torch.equal(batch.prompt_ids[0], batch.prompt_ids[2])  # the n samples of a prompt are adjacent
    logprobs, _ = response_logprobs_and_entropy(
        policy, batch.input_ids, batch.attention_mask, batch.response_ids.shape[1], temperature=temperature
    )
    mask = batch.response_mask
    torch.testing.assert_close(logprobs[mask], batch.sampling_logprobs[mask], atol=1e-5, rtol=0)
    assert torch.all(batch.sampling_logprobs[~mask] == 0)


@pytest.mark.parametrize("max_batch_sequences", [4, 1])
def test_max_batch_sequences_decodes_whole_groups_in_chunks_and_joins_them_exactly(engine, max_batch_sequences, monkeypatch):
    """Chunks of whole groups (at least one prompt's n rows), each decoded as a batch of its own,
    joined with prompts re-padded on the left and responses on the right: the same rows as decoding
    the chunks one by one, and log-probs that still equal a teacher-forced forward of the joined batch."""
    import steer.rollout.hf as hf

    tokenizer, policy, _ = engine
    prompts = [tokenizer(text).input_ids for text in ("Q: Compute 12+30+7.\nA: ", "Q: hi\nA: ", "A: ", "Q: 3+4\nA: ", "Q:\n")]
    params = SamplingParams(max_new_tokens=10, n=2)
    rows_per_call, real_sample = [], hf.sample
    monkeypatch.setattr(hf, "sample", lambda policy, ids, *args, **kwargs: rows_per_call.append(ids.shape[0]) or real_sample(policy, ids, *args, **kwargs))
    torch.manual_seed(3)
    chunked = HFRolloutEngine(policy, tokenizer.pad_token_id, tokenizer.eos_token_id, max_batch_sequences).generate(prompts, params)
    assert rows_per_call == ([4, 4, 2] if max_batch_sequences == 4 else [2] * 5)
    torch.manual_seed(3)
    whole = HFRolloutEngine(policy, tokenizer.pad_token_id, tokenizer.eos_token_id)
    step = 2 if max_batch_sequences == 4 else 1
    parts = [whole.generate(prompts[start:start + step], params) for start in range(0, len(prompts), step)]
    rows = [(part, row) for part in parts for row in range(part.response_ids.shape[0])]
    assert chunked.response_ids.shape[0] == len(rows) == 10
    for index, (part, row) in enumerate(rows):
        length = int(part.response_mask[row].sum())
        assert torch.equal(chunked.response_ids[index, :length], part.response_ids[row, :length])
        assert not chunked.response_mask[index, length:].any()
        assert torch.equal(chunked.sampling_logprobs[index, :length], part.sampling_logprobs[row, :length])
        assert chunked.prompt_ids[index][chunked.prompt_mask[index]].tolist() == prompts[index // 2]
    logprobs, _ = response_logprobs_and_entropy(policy, chunked.input_ids, chunked.attention_mask, chunked.response_ids.shape[1])
    torch.testing.assert_close(logprobs[chunked.response_mask], chunked.sampling_logprobs[chunked.response_mask], atol=1e-5, rtol=0)


@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_max_batch_sequences_must_be_a_positive_integer(bad):
    with pytest.raises(ValueError, match="rollout.engine.max_batch_sequences must be an integer >= 1 or null"):
        HFRolloutEngine(None, 0, 1, bad)


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


def eos_loving_policy(tokenizer):
    """All layers silent (zero weights), embeddings on one axis with EOS 3x longer: after any
    token the EOS logit leads by ~11 nats, so nearly every row ends at its first or second token."""
    policy = build_tiny_policy(tokenizer, hidden_size=32, num_layers=1)
    with torch.no_grad():
        for p in policy.parameters():
            p.zero_()
        policy.model.norm.weight.fill_(1.0)
        for layer in policy.model.layers:
            layer.input_layernorm.weight.fill_(1.0)
            layer.post_attention_layernorm.weight.fill_(1.0)
        policy.model.embed_tokens.weight[:, 0] = 1.0
        policy.model.embed_tokens.weight[tokenizer.eos_token_id, 0] = 3.0
    return policy.eval()


def test_decoding_stops_once_every_row_has_ended():
    tokenizer = build_char_tokenizer()
    engine = HFRolloutEngine(eos_loving_policy(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id)
    torch.manual_seed(0)
    batch = engine.generate([tokenizer("Q: 1\nA: ").input_ids, tokenizer("A: ").input_ids], SamplingParams(max_new_tokens=32, n=32))
    assert batch.response_ids.shape == (64, batch.response_ids.shape[1]) and batch.response_ids.shape[1] < 6
    assert not batch.truncated.any()
    lengths = batch.response_mask.sum(-1)
    assert torch.all(batch.response_ids[torch.arange(64), lengths - 1] == tokenizer.eos_token_id)
    assert torch.equal(batch.response_mask, response_mask_from_ids(batch.response_ids, tokenizer.eos_token_id)[0])
    assert torch.all(batch.response_ids[~batch.response_mask] == tokenizer.pad_token_id)


def test_same_seed_same_samples_other_seed_other_samples(engine):
    tokenizer, _, rollout_engine = engine
    prompts = [tokenizer("Q: Compute 3+4.\nA: ").input_ids, tokenizer("Q: a\nA: ").input_ids]
    params = SamplingParams(temperature=0.9, top_p=0.95, max_new_tokens=10, n=4)
    batches = []
    for seed in (5, 5, 6):
        torch.manual_seed(seed)
        batches.append(rollout_engine.generate(prompts, params))
    assert torch.equal(batches[0].response_ids, batches[1].response_ids)
    assert torch.equal(batches[0].sampling_logprobs, batches[1].sampling_logprobs)
    assert not torch.equal(batches[0].response_ids, batches[2].response_ids)


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


def test_a_training_policy_is_sampled_in_eval_mode_and_left_in_training_mode(engine):
    tokenizer, _, _ = engine
    policy = build_tiny_policy(tokenizer, hidden_size=32, num_layers=1).train()
    seen = []
    policy.model.embed_tokens.register_forward_hook(lambda module, args, out: seen.append(module.training))
    HFRolloutEngine(policy, 0, 1).generate([[5, 6]], SamplingParams(max_new_tokens=3))
    assert seen and not any(seen) and policy.training


def tiny_llama():
    """A SmolLM2-shaped (Llama: no attention bias, grouped KV heads, tied head) random decoder."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=101, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=6,
                         num_key_value_heads=2, max_position_embeddings=128, rope_theta=100000.0, tie_word_embeddings=True,
                         pad_token_id=0, eos_token_id=1, bos_token_id=None)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def test_a_llama_family_model_takes_the_functional_path_exactly():
    policy = tiny_llama()
    assert supports_functional(policy)
    prompt_ids, prompt_mask = left_pad([[5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 17]], 0)
    torch.manual_seed(2)
    response_ids, logprobs = sample(policy, prompt_ids, prompt_mask, 10, 1, 0, temperature=0.9, top_p=0.8)
    reference = teacher_forced_sampler_logprobs(policy, prompt_ids, prompt_mask, response_ids, 0.9, 0.8)
    mask, _ = response_mask_from_ids(response_ids, 1)
    torch.testing.assert_close(logprobs[mask], reference[mask], atol=2e-5, rtol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_policies_sample_close_to_their_teacher_forced_forward(dtype):
    tokenizer = build_char_tokenizer()
    policy = build_tiny_policy(tokenizer, hidden_size=32, num_layers=2).to(dtype).eval()
    prompt_ids, prompt_mask = left_pad([tokenizer("Q: 1+2\nA: ").input_ids, tokenizer("A: ").input_ids] * 2, 0)
    torch.manual_seed(0)
    response_ids, logprobs = sample(policy, prompt_ids, prompt_mask, 8, 1, 0)
    reference = teacher_forced_sampler_logprobs(policy, prompt_ids, prompt_mask, response_ids, 1.0, 1.0)
    mask, _ = response_mask_from_ids(response_ids, 1)
    assert logprobs.dtype == torch.float32 and torch.isfinite(logprobs[mask]).all()
    torch.testing.assert_close(logprobs[mask], reference[mask], atol=0.1, rtol=0)  # half-precision round-off


@pytest.mark.parametrize("functional", [True, False])
def test_finished_rows_leave_the_decoder_and_the_running_rows_are_unchanged(functional, monkeypatch):
    """With EOS about 1/6 likely per token the responses end anywhere in the budget; rows that ended
    leave the decoder (its key/value buffers, or the model's cache, are cut to the running rows), and
    every sampled log-prob still equals the teacher-forced one: a row that kept another row's cache
    or position would be off by far more than round-off."""
    import math

    import steer.rollout.decode as decode

    tokenizer = build_char_tokenizer()
    torch.manual_seed(0)
    policy = build_tiny_policy(tokenizer, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2).eval()
    head = policy.get_output_embeddings()
    biased = torch.nn.Linear(head.in_features, head.out_features, bias=True)
    biased.weight = head.weight
    with torch.no_grad():
        biased.bias.zero_()
        biased.bias[tokenizer.eos_token_id] = math.log((head.out_features - 1) / 5)  # p(EOS) ~ 1/6
    policy.set_output_embeddings(biased)
    prompts = [tokenizer(text).input_ids for text in ("Q: Compute 12+30+7.\nA: ", "Q: hi\nA: ", "A: ")]
    prompt_ids, prompt_mask = left_pad([p for p in prompts for _ in range(8)], tokenizer.pad_token_id)
    rows_per_step = []
    draw = decode.gumbel_max
    monkeypatch.setattr(decode, "gumbel_max", lambda logprobs: rows_per_step.append(logprobs.shape[0]) or draw(logprobs))
    torch.manual_seed(1)
    response_ids, logprobs = sample(policy, prompt_ids, prompt_mask, 20, tokenizer.eos_token_id, tokenizer.pad_token_id,
                                    temperature=0.9, functional=functional)
    mask, truncated = response_mask_from_ids(response_ids, tokenizer.eos_token_id)
    assert len(set(mask.sum(-1).tolist())) >= 6 and not truncated.all()  # lengths spread over the budget
    assert rows_per_step[0] == 24 and min(rows_per_step) < 12  # finished rows left the decoder
    assert all(a >= b for a, b in zip(rows_per_step, rows_per_step[1:]))
    assert sum(rows_per_step) < 0.6 * 24 * len(rows_per_step)
    reference = teacher_forced_sampler_logprobs(policy, prompt_ids, prompt_mask, response_ids, 0.9, 1.0)
    torch.testing.assert_close(logprobs[mask], reference[mask], atol=2e-5, rtol=0)
    assert torch.all(response_ids[~mask] == tokenizer.pad_token_id)


@pytest.mark.parametrize("family", ["qwen2", "llama"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prepacked_projections_decode_as_the_plain_ones(family, dtype, monkeypatch):
    """On a CPU the decoder prepacks weights of at least PREPACK_MIN_WEIGHTS elements for oneDNN; the
    tiny policies' weights are all below it, so the threshold is lowered to pack every projection
    and the head. float32: the sampler's log-probs still equal the teacher-forced forward at 2e-5;
    both dtypes: the same tokens and log-probs as the decoder with nothing packed."""
    from steer.rollout import decode

    if family == "qwen2":  # biases on q/k/v
        tokenizer = build_char_tokenizer()
        policy = build_tiny_policy(tokenizer, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2).eval()
        with torch.no_grad():  # initialised to zeros: make them count
            for name, parameter in policy.named_parameters():
                if name.endswith("bias"):
                    parameter.normal_(0, 0.5)
        prompt_ids, prompt_mask = left_pad([tokenizer(t).input_ids for t in ("Q: 3+4\nA: ", "A: ") for _ in range(3)], 0)
    else:
        policy = tiny_llama()
        prompt_ids, prompt_mask = left_pad([[5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 17]], 0)
    draws = {}
    for threshold in (10**12, 0):
        monkeypatch.setattr(decode, "PREPACK_MIN_WEIGHTS", threshold)
        torch.manual_seed(4)
        draws[threshold] = sample(policy, prompt_ids, prompt_mask, 10, 1, 0, temperature=0.9, top_p=0.8, dtype=dtype)
    if not decode.prepacks(torch.zeros(1, dtype=dtype)):  # the threshold is 0 now
        pytest.skip(f"this torch build or CPU has no oneDNN {dtype} prepacked linear")
    decoder = decode.FunctionalDecoder(policy, prompt_mask, prompt_ids.shape[1] + 2, dtype=dtype)
    projections = [projection for block in decoder.blocks for projection in block[:4]] + [decoder.head_projection]
    assert all(projection.packed is not None and projection.weight is None for projection in projections)
    response_ids, logprobs = draws[0]
    assert torch.equal(response_ids, draws[10**12][0])
    mask, _ = response_mask_from_ids(response_ids, 1)
    assert mask.sum() > 15
    torch.testing.assert_close(logprobs[mask], draws[10**12][1][mask], atol=2e-5 if dtype == torch.float32 else 2e-2, rtol=0)
    if dtype == torch.float32:
        reference = teacher_forced_sampler_logprobs(policy, prompt_ids, prompt_mask, response_ids, 0.9, 0.8)
        torch.testing.assert_close(logprobs[mask], reference[mask], atol=2e-5, rtol=0)
