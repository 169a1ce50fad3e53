"""Bucketed weight sync (steer.rollout.weight_sync) and the engine-layout start-up check, without vLLM."""

from __future__ import annotations

import pytest
import torch

from steer.knobs import ConfigError
from steer.models.tiny import build_char_tokenizer, build_tiny_policy
from steer.rollout.vllm import check_engine_layout
from steer.rollout.weight_sync import SyncStats, weight_buckets, weight_unit
from tests.conftest import compose


@pytest.fixture(scope="module")
def state():
    policy = build_tiny_policy(build_char_tokenizer(), hidden_size=32, num_layers=3, num_heads=2)
    return policy.state_dict()


def test_units_are_whole_decoder_layers_or_single_tensors():
    assert weight_unit("model.layers.12.self_attn.q_proj.weight") == "model.layers.12"
    assert weight_unit("model.layers.3.mlp.up_proj.weight") == "model.layers.3"
    assert weight_unit("model.embed_tokens.weight") == "model.embed_tokens.weight"
    assert weight_unit("lm_head.weight") == "lm_head.weight"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_buckets_hold_every_tensor_once_whole_layers_and_at_most_the_limit(state, dtype):
    itemsize = torch.empty((), dtype=dtype).element_size()
    layer = sum(t.numel() for name, t in state.items() if name.startswith("model.layers.0.")) * itemsize
    stats = SyncStats()
    buckets = list(weight_buckets(state, dtype, layer, stats))
    names = [name for bucket in buckets for name, _ in bucket]
    assert names == list(state)  # every tensor, once, in state_dict order
    for bucket in buckets:
        for name, tensor in bucket:
            assert tensor.dtype == dtype and torch.equal(tensor, state[name].to(dtype))
        units = [weight_unit(name) for name, _ in bucket]
        layers = {unit for unit in units if ".layers." in unit}
        # a layer never spans two buckets; a bucket over the limit is one unit (here: the embedding)
        size = sum(t.numel() for _, t in bucket) * itemsize
        assert size <= layer or len(set(units)) == 1, (units, size, layer)
        assert len(layers) <= 1
    split = [unit for unit in {weight_unit(n) for n in state} if sum(any(weight_unit(n) == unit for n, _ in b) for b in buckets) > 1]
    assert not split
    embedding = state["model.embed_tokens.weight"].numel() * itemsize
    assert stats.peak_bytes == max(layer, embedding) and stats.tensors == len(state)
    assert stats.total_bytes == sum(t.numel() for t in state.values()) * itemsize
    # one large bucket holds everything
    one = SyncStats()
    assert len(list(weight_buckets(state, dtype, 2**40, one))) == 1 and one.peak_bytes == one.total_bytes


def test_a_non_positive_bucket_is_refused(state):
    with pytest.raises(ValueError, match="sync_bucket_bytes"):
        next(weight_buckets(state, torch.float32, 0))


def test_the_engine_layout_check_names_the_knob_and_the_divisors():
    paper = compose(["+experiment=steer_math"])
    check_engine_layout(paper)  # 8 ranks, 2 engines of 4
    with pytest.raises(ConfigError, match=r"rollout.engine.tensor_parallel_size=4 does not divide the 6 ranks.*\[1, 2, 3, 6\]"):
        check_engine_layout(compose(["+experiment=steer_math", "trainer.devices=6"]))
    check_engine_layout(compose(["+experiment=steer_math", "trainer.devices=2", "trainer.num_nodes=2"]))
    with pytest.raises(ConfigError, match="sync_bucket_bytes"):
        check_engine_layout(compose(["+experiment=steer_math", "rollout.engine.sync_bucket_bytes=0"]))
    check_engine_layout(compose(["+experiment=steer_math", "rollout=hf", "trainer.devices=6"]))  # not vLLM: nothing to check
