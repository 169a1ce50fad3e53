"""model.gradient_checkpointing: the decoder layers recompute their activations in the backward pass,
the gradient is unchanged, and generation (eval mode, KV cache) is unaffected."""

from __future__ import annotations

import torch

from steer.algo.logprobs import response_logprobs_and_entropy
from steer.models.loader import enable_activation_checkpointing
from steer.models.tiny import build_char_tokenizer, build_tiny_policy
from tests.conftest import TINY_RUN, compose


def _policy():
    return build_tiny_policy(build_char_tokenizer(), hidden_size=32, num_layers=2, num_heads=4, max_positions=64, seed=3).train()


def _loss_gradient_and_layer_calls(policy) -> tuple[torch.Tensor, list[torch.Tensor], int]:
    calls = []
    hooks = [layer.mlp.register_forward_pre_hook(lambda *_: calls.append(1)) for layer in policy.model.layers]
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(3, 90, (6, 20), generator=generator)
    attention = torch.ones_like(input_ids)
    attention[:2, :4] = 0  # left padding, as the rollout batch has
    policy.zero_grad(set_to_none=True)
    logprobs, entropy = response_logprobs_and_entropy(policy, input_ids, attention, 12, chunk_tokens=16)
    loss = -(logprobs * torch.linspace(-1, 1, 12)).mean() - 0.1 * entropy.mean()
    loss.backward()
    for hook in hooks:
        hook.remove()
    return loss.detach(), [p.grad.clone() for p in policy.parameters()], len(calls)


def test_checkpointing_recomputes_the_layers_and_keeps_the_gradient():
    plain = _policy()
    checkpointed = _policy()
    enable_activation_checkpointing(checkpointed)
    loss, gradients, calls = _loss_gradient_and_layer_calls(plain)
    loss_ckpt, gradients_ckpt, calls_ckpt = _loss_gradient_and_layer_calls(checkpointed)
    layers = len(plain.model.layers)
    assert calls == layers and calls_ckpt == 2 * layers  # each layer's MLP runs again in the backward
    assert torch.equal(loss, loss_ckpt)
    assert all(g.abs().sum() > 0 for g in gradients[1:])
    for g, g_ckpt in zip(gradients, gradients_ckpt):
        torch.testing.assert_close(g_ckpt, g, rtol=1e-6, atol=1e-8)


def test_the_knob_turns_it_on_for_the_policy_and_generation_still_works(tmp_path):
    import steer.app

    off, _ = steer.app.build_module(compose(TINY_RUN, tmp_path / "off"))
    on, _ = steer.app.build_module(compose([*TINY_RUN, "model.gradient_checkpointing=true", "algorithm.kl.coef=0.1"], tmp_path / "on"))
    assert not off.policy.is_gradient_checkpointing
    assert on.policy.is_gradient_checkpointing
    on.policy.train()
    assert not on.reference.training  # eval mode: the layers never checkpoint there
    from steer.rollout.base import SamplingParams

    prompts = [on.tokenizer.encode("Q: Compute 1+2.\nA: ")] * 2
    batch = on.rollout_engine.generate(prompts, SamplingParams(1.0, 1.0, 8, n=2))
    assert batch.response_ids.shape[0] == 4 and batch.response_lengths.min() >= 1
    assert on.policy.training  # the engine restores train mode after generating


def test_a_non_boolean_knob_is_refused(tmp_path):
    import pytest

    from steer.knobs import ConfigError
    from steer.startup import check_config

    with pytest.raises(ConfigError, match="model.gradient_checkpointing"):
        check_config(compose([*TINY_RUN, "model.gradient_checkpointing=sometimes"], tmp_path))
