"""model.attn_implementation: the attention kernel of the update and scoring forwards. ``eager`` gives
the same log-probs, entropies and gradients as the model's own SDPA (float32 round-off), reaches the
policy and the reference model, leaves the warm-up cache alone, and a run with it trains; a wrong name
stops at start-up with the allowed ones."""

from __future__ import annotations

import pytest
import torch

from steer.algo.logprobs import response_logprobs_and_entropy
from steer.knobs import ConfigError
from steer.models.tiny import build_char_tokenizer, build_tiny_policy
from tests.conftest import TINY_RUN, compose


def _values_and_gradients(kernel: str, share_prompts: bool):
    policy = build_tiny_policy(build_char_tokenizer(), hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                               max_positions=64, seed=3).train()
    if kernel:
        policy.set_attn_implementation(kernel)
    generator = torch.Generator().manual_seed(0)
    prompts = torch.randint(3, 90, (3, 10), generator=generator).repeat_interleave(2, 0)  # 3 prompts x 2 samples
    input_ids = torch.cat([prompts, torch.randint(3, 90, (6, 12), generator=generator)], 1)
    attention = torch.ones_like(input_ids)
    attention[:2, :4] = 0  # left padding
    attention[3, -5:] = 0  # a response that ended early
    logprobs, entropy = response_logprobs_and_entropy(policy, input_ids, attention, 12, share_prompts=share_prompts)
    mask = attention[:, -12:].bool()
    loss = -(logprobs * torch.linspace(-1, 1, 12))[mask].mean() - 0.1 * entropy[mask].mean()
    loss.backward()
    return logprobs[mask].detach(), entropy[mask].detach(), [p.grad.clone() for p in policy.parameters()]


@pytest.mark.parametrize("share_prompts", [False, True])
def test_eager_attention_gives_the_sdpa_values_and_gradients(share_prompts):
    logprobs, entropy, gradients = _values_and_gradients("", share_prompts)
    eager_logprobs, eager_entropy, eager_gradients = _values_and_gradients("eager", share_prompts)
    torch.testing.assert_close(eager_logprobs, logprobs, atol=1e-5, rtol=0)
    torch.testing.assert_close(eager_entropy, entropy, atol=1e-5, rtol=0)
    assert all(g.abs().sum() > 0 for g in gradients)
    for g, g_eager in zip(gradients, eager_gradients):
        torch.testing.assert_close(g_eager, g, atol=1e-5 * float(g.abs().max()), rtol=0)


def test_the_knob_reaches_policy_and_reference_and_the_run_trains(tmp_path, monkeypatch):
    import steer.app

    built = {}
    build_module = steer.app.build_module

    def build_and_keep(cfg, prompts=None):
        module, info = build_module(cfg, prompts)
        built["module"], built["start"] = module, [p.detach().clone() for p in module.policy.parameters()]
        return module, info

    monkeypatch.setattr(steer.app, "build_module", build_and_keep)
    run = [*TINY_RUN, "algorithm.kl.coef=0.1", "intervention=entropy_bonus", "callbacks.entropy_probe=null"]  # a bonus: gradients even when every reward is 0
    default = steer.app.build_module(compose(run, tmp_path / "default"))[0]
    metrics = steer.app.train(compose([*run, "model.attn_implementation=eager"], tmp_path / "eager"))
    module = built["module"]
    assert default.policy.config._attn_implementation == "sdpa"
    assert module.policy.config._attn_implementation == "eager"
    assert module.reference.config._attn_implementation == "eager"
    # The warm-up cache is keyed without it: both runs start from the same weights.
    for p, q in zip(default.policy.parameters(), built["start"]):
        assert torch.equal(p, q)
    moved = [not torch.equal(a, p.detach()) for a, p in zip(built["start"], module.policy.parameters())]
    assert sum(moved) >= len(moved) - 1, moved  # every tensor but at most one moved in 2 steps
    assert metrics["actor/entropy"] > 0


def test_a_wrong_kernel_name_is_refused_at_start_up(tmp_path):
    from steer.startup import check_config

    with pytest.raises(ConfigError, match=r"model.attn_implementation='flash'.*'eager', 'sdpa'"):
        check_config(compose([*TINY_RUN, "model.attn_implementation=flash"], tmp_path))


def test_flash_attention_without_its_package_or_a_gpu_is_refused_at_start_up(tmp_path):
    import importlib.util

    from steer.startup import check_config

    if importlib.util.find_spec("flash_attn") is not None and torch.cuda.is_available():
        pytest.skip("flash-attn and a GPU are here: the kernel is allowed")
    with pytest.raises(ConfigError, match=r"flash_attention_2 needs a CUDA GPU and the 'flash_attn' package.*allowed here"):
        check_config(compose([*TINY_RUN, "model.attn_implementation=flash_attention_2"], tmp_path))
