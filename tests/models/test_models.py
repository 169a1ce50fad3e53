"""The tiny policy, its tokenizer and the warm-up cache."""

from __future__ import annotations

import torch

from steer.data.arithmetic import ArithmeticTask
from steer.models.tiny import build_char_tokenizer, build_tiny_policy
from steer.models.warmup import WarmupConfig, cached_warmup


def test_char_tokenizer_round_trips_any_printable_text():
    tokenizer = build_char_tokenizer()
    text = "Compute 12+45+30.\nA: 45+30=75, 75+12=87. \\boxed{87}"
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert len(ids) == len(text)
    assert tokenizer.decode(ids) == text
    assert tokenizer.padding_side == "left"
    assert tokenizer("<eos>").input_ids == [tokenizer.eos_token_id]


def test_tiny_policy_is_seeded_and_small():
    tokenizer = build_char_tokenizer()
    a, b = build_tiny_policy(tokenizer, seed=1), build_tiny_policy(tokenizer, seed=1)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    assert 1e5 < sum(p.numel() for p in a.parameters()) < 5e6


def test_warmup_is_cached_by_config(tmp_path):
    calls = []

    def build():
        calls.append(1)
        tokenizer = build_char_tokenizer()
        return tokenizer, build_tiny_policy(tokenizer, hidden_size=16, num_layers=1, num_heads=2)

    always_right = lambda responses, references: [True] * len(responses)  # noqa: E731
    task = ArithmeticTask(num_heldout=4)
    config = WarmupConfig(max_steps=3, batch_size=4, eval_every=2, eval_prompts=4, max_new_tokens=4)
    _, policy, info = cached_warmup(build, task, config, always_right, tmp_path, key_parts=["a"])
    assert info["steps"] == 2 and info["accuracy"] == 1.0  # stopped at the first check
    tokenizer_again, loaded, info_again = cached_warmup(build, task, config, always_right, tmp_path, key_parts=["a"])
    assert len(calls) == 1 and info_again == info
    text = "Q: Compute 1+2.\nA: 1+2=3. \\boxed{3}"
    assert tokenizer_again(text).input_ids == build_char_tokenizer()(text).input_ids
    for (name, x), (_, y) in zip(policy.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(x, y), name
    cached_warmup(build, task, config, always_right, tmp_path, key_parts=["b"])  # another config
    assert len(calls) == 2
    assert len(list(tmp_path.iterdir())) == 2


def test_a_saved_character_tokenizer_reloads_as_itself(tmp_path):
    """transformers 5's AutoTokenizer would pick Qwen2Tokenizer from the model config and drop spaces."""
    from steer.models.loader import load_tokenizer

    tokenizer = build_char_tokenizer()
    tokenizer.save_pretrained(tmp_path)
    build_tiny_policy(tokenizer, hidden_size=16, num_layers=1, num_heads=2).save_pretrained(tmp_path)
    loaded = load_tokenizer(str(tmp_path))
    text = "Q: Compute 1+2.\nA: 1+2=3. \\boxed{3}"
    assert loaded(text).input_ids == tokenizer(text).input_ids
    assert loaded.padding_side == "left"
    assert loaded.apply_chat_template([{"role": "user", "content": "x y"}], add_generation_prompt=True, tokenize=False) == "Q: x y\nA: "
