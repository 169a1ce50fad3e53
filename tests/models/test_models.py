"""The tiny policy, its tokenizer and the warm-up cache."""

from __future__ import annotations

import pytest
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
    from steer.models.tokenizer import load_tokenizer

    tokenizer = build_char_tokenizer()
    tokenizer.save_pretrained(tmp_path)
    build_tiny_policy(tokenizer, hidden_size=16, num_layers=1, num_heads=2).save_pretrained(tmp_path)
    loaded = load_tokenizer(str(tmp_path))
    text = "Q: Compute 1+2.\nA: 1+2=3. \\boxed{3}"
    assert loaded(text).input_ids == tokenizer(text).input_ids
    assert loaded.padding_side == "left"
    assert loaded.apply_chat_template([{"role": "user", "content": "x y"}], add_generation_prompt=True, tokenize=False) == "Q: x y\nA: "


def test_num_kv_heads_builds_grouped_query_attention():
    tokenizer = build_char_tokenizer()
    full = build_tiny_policy(tokenizer, hidden_size=32, num_layers=1, num_heads=4)
    grouped = build_tiny_policy(tokenizer, hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2)
    assert full.config.num_key_value_heads == 4 and grouped.config.num_key_value_heads == 2
    # k_proj and v_proj shrink from 32x32 (+32 bias) to 32x16 (+16 bias) each.
    saved = sum(p.numel() for p in full.parameters()) - sum(p.numel() for p in grouped.parameters())
    assert saved == 2 * (32 * 16 + 16)
    assert grouped.model.layers[0].self_attn.k_proj.weight.shape == (16, 32)
    with torch.no_grad():  # and it runs
        assert grouped(torch.tensor([[5, 6, 7]])).logits.shape == (1, 3, len(tokenizer))
    with pytest.raises(ValueError, match="num_kv_heads=3"):
        build_tiny_policy(tokenizer, hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=3)


@pytest.mark.parametrize("value", [3, 0, 8, "two"])
def test_a_num_kv_heads_that_does_not_divide_the_heads_is_a_config_error(tmp_path, value):
    from steer.knobs import ConfigError
    from steer.models.loader import check_model
    from tests.conftest import compose

    cfg = compose([f"model.tiny.num_kv_heads={value}"], tmp_path)
    with pytest.raises(ConfigError, match=r"model\.tiny\.num_kv_heads=.* must divide model\.tiny\.num_heads=4; "
                                          r"allowed: null \(= num_heads\) or one of \[1, 2, 4\]"):
        check_model(cfg)
    check_model(compose(["model.tiny.num_kv_heads=2"], tmp_path))  # a divisor is fine
    check_model(compose([], tmp_path))  # and the default (null)
