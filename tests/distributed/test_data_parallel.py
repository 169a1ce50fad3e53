"""Data parallelism: 2 CPU processes under Lightning DDP and FSDP (gloo) against 1 process over the
same global batch, the data order, metric reduction, sharded evaluation and the start-up errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from steer.eval.benchmarks import BenchmarkSamples, merge_samples, rank_share
from steer.distributed import check_world_size
from steer.knobs import ConfigError
from steer.startup import check_config
from steer.data.datamodule import StepBatchSampler
from steer.step_metrics import MetricAccumulator
from tests.conftest import REPO, TINY_RUN, compose
from tests.distributed import ddp_driver

# float32 tolerance. The two runs add the same per-token terms in a different order (one batched
# backward over a mini-batch vs. two half-batches summed by DDP's all-reduce; different left
# padding widths in attention), so they agree to float32 rounding of sums over a few hundred
# tokens, ~1e-7 relative per step; after 6 AdamW steps parameters still agree to ~1e-6. 1e-4
# relative / 1e-6 absolute leaves margin and still fails on any real difference (a lost factor 2,
# a rank's tokens missing, a rank-local selection change gradients by >= 1e-2 relative).
RTOL, ATOL = 1e-4, 1e-6
# Metrics that must be the same on 1 and 2 processes (quantiles of per-micro-batch values and the
# entropy probe, which measures each rank's own random rows, legitimately differ).
INVARIANT_PREFIXES = ("reward/", "actor/", "response/", "batch/", "intervention/ratio_inert")
INVARIANT_INTERVENTION_KEYS = ("selected_count", "share_masked", "share_penalised", "weight_mean", "omega_abs_max")


def _invariant(metrics: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in metrics.items()
            if k.startswith(INVARIANT_PREFIXES) or (k.startswith("intervention/") and k.endswith(INVARIANT_INTERVENTION_KEYS))}


@pytest.fixture(scope="module")
def one_and_two_processes(tmp_path_factory):
    """Every case on 2 DDP processes (one launch, in a subprocess) and, meanwhile, on 1 process here."""
    out = tmp_path_factory.mktemp("ddp")
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "STEER_CACHE": str(out / "cache2"), "PYTHONHASHSEED": "0"}
    env.pop("WORLD_SIZE", None)
    launch = subprocess.Popen([sys.executable, str(REPO / "tests/distributed/ddp_driver.py"), str(out / "two"), "2"],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        with pytest.MonkeyPatch.context() as patch:  # the fixture outlives one test's monkeypatch
            patch.setenv("STEER_CACHE", str(out / "cache1"))
            ddp_driver.save_model(out / "one" / "model")
            one = {case: ddp_driver.run_case(case, 1, out / "one") for case in ddp_driver.CASES}
        output, _ = launch.communicate(timeout=600)
    finally:
        if launch.poll() is None:
            launch.kill()
    assert launch.returncode == 0, output[-4000:]
    two = {case: torch.load(out / "two" / f"{case}.pt") for case in ddp_driver.CASES}
    return one, two


@pytest.mark.parametrize("case", list(ddp_driver.CASES))
def test_two_ddp_processes_give_the_one_process_update(one_and_two_processes, case):
    one, two = (runs[case] for runs in one_and_two_processes)
    assert two["world_size"] == 2 and one["world_size"] == 1
    for name, value in one["initial"].items():  # the same starting policy
        torch.testing.assert_close(two["initial"][name], value, rtol=0, atol=0)
    assert len(one["steps"]) == len(two["steps"]) == 3
    for step, (a, b) in enumerate(zip(one["steps"], two["steps"])):
        # Rank 0 (whose batch is recorded) took the first half of each of the two mini-batches.
        assert b["prompts"] == a["prompts"][0:2] + a["prompts"][4:6]
        assert sum(g.abs().sum() for g in a["grads"].values()) > 0
        for name, grad in a["grads"].items():
            torch.testing.assert_close(b["grads"][name], grad, rtol=RTOL, atol=ATOL, msg=f"{case} step {step} grad {name}")
        for name, param in a["params"].items():
            torch.testing.assert_close(b["params"][name], param, rtol=RTOL, atol=ATOL, msg=f"{case} step {step} param {name}")
        ma, mb = _invariant(a["metrics"]), _invariant(b["metrics"])
        assert ma.keys() == mb.keys()
        for key in ma:
            assert mb[key] == pytest.approx(ma[key], rel=RTOL, abs=ATOL), f"{case} step {step} {key}"
    moved = sum(float((one["steps"][-1]["params"][k] - v).abs().sum()) for k, v in one["initial"].items())
    assert moved > 0
    # The evaluation was sharded over the two ranks and gathered: same prompts, same numbers.
    assert [s for s, _ in one["eval"]] == [s for s, _ in two["eval"]]
    for (_, ea), (_, eb) in zip(one["eval"], two["eval"]):
        assert eb["prompts"] == ea["prompts"] == 6
        for key in ea:
            assert eb[key] == pytest.approx(ea[key], rel=RTOL, abs=ATOL), key


def test_the_global_selections_actually_selected(one_and_two_processes):
    one, two = one_and_two_processes
    for runs in (one, two):
        metrics = runs["clip_cov"]["steps"][0]["metrics"]
        assert metrics["intervention/clip_cov/selected_count"] > 0
        assert runs["kl_cov"]["steps"][1]["metrics"]["intervention/kl_cov/selected_count"] > 0
        assert runs["steer"]["steps"][0]["metrics"]["intervention/steer/weight_mean"] < 1.0


# ---------------------------------------------------------------------- the data order


def test_the_ranks_shares_are_the_one_process_batch_and_whole_mini_batches_line_up():
    single = StepBatchSampler(1000, 8, 4, seed=3, shuffle=True)
    for world in (2, 4):
        ranks = [StepBatchSampler(1000, 8, 4, seed=3, shuffle=True, rank=r, world_size=world) for r in range(world)]
        for step in (0, 1, 7, 200):
            whole = single.step_indices(step)
            shares = [sampler.step_indices(step) for sampler in ranks]
            # Mini-batch j of the one process = the ranks' parts of mini-batch j, in rank order.
            per_rank = 4 // world
            for minibatch in range(2):
                joined = [i for share in shares for i in share[minibatch * per_rank : (minibatch + 1) * per_rank]]
                assert joined == whole[minibatch * 4 : (minibatch + 1) * 4]


def test_the_data_order_is_a_function_of_seed_and_step_and_resumes_at_start_step():
    sampler = StepBatchSampler(10, 4, 2, seed=1, shuffle=True)
    stream = iter(sampler)
    first = [next(stream) for _ in range(6)]
    resumed = iter(StepBatchSampler(10, 4, 2, seed=1, shuffle=True, start_step=3))
    assert [next(resumed) for _ in range(3)] == first[3:]
    # Each pass over the 10 records is a permutation; passes differ; another seed differs.
    positions = [sampler.global_position_index(p) for p in range(20)]
    assert sorted(positions[:10]) == list(range(10)) and sorted(positions[10:]) == list(range(10))
    assert positions[:10] != positions[10:]
    assert StepBatchSampler(10, 4, 2, seed=2, shuffle=True).step_indices(0) != first[0]
    assert StepBatchSampler(10, 4, 2, seed=1, shuffle=False).step_indices(2) == [8, 9, 0, 1]


# ---------------------------------------------------------------------- metric reduction, evaluation shards


def test_metric_mean_kinds():
    metrics = MetricAccumulator()
    metrics.add({"a": 1.0, "x_count": 2.0, "probe/tokens": 3.0}, weight=1.0)
    metrics.add({"a": 4.0, "x_count": 5.0, "probe/tokens": 1.0}, weight=3.0)
    metrics.add({"t": 2.0}, how="max")
    metrics.add({"t": 1.0}, how="max")
    metrics.add({"n": 2.0}, how="sum")
    metrics.add({"n": 3.0}, how="sum")
    assert metrics.reduce_over_ranks().result() == {"a": 13.0 / 4.0, "x_count": 7.0, "probe/tokens": 4.0, "t": 2.0, "n": 5.0}


def test_evaluation_shards_partition_the_prompts_and_merge_back_in_order():
    records = list(range(7))
    for world in (1, 2, 3, 8):
        assert [r for rank in range(world) for r in rank_share(records, rank, world)] == records
    parts = [BenchmarkSamples(np.array([[True], [False]]), [["1"], ["2"]], 1.0, 2.0, 1.0, 0),
             BenchmarkSamples(np.zeros((0, 1), dtype=bool), [], 0.0, 0.0, 0.0, 1),
             BenchmarkSamples(np.array([[True]]), [["3"]], 0.5, 1.0, 0.0, 0)]
    merged = merge_samples(parts)
    assert merged.correct.tolist() == [[True], [False], [True]]
    assert merged.answers == [["1"], ["2"], ["3"]]
    assert (merged.entropy_sum, merged.token_count, merged.truncated, merged.dropped_prompts) == (1.5, 3.0, 1.0, 1)


# ---------------------------------------------------------------------- start-up errors


def test_ranks_that_do_not_divide_the_mini_batch_fail_at_start_up():
    cfg = compose([*TINY_RUN, "trainer=ddp", "trainer.devices=4", "trainer.accelerator=cpu"])
    with pytest.raises(ConfigError, match=r"algorithm.minibatch_prompts=2 \(global: all ranks together\) must be divisible by the 4 data-parallel ranks"):
        check_config(cfg)
    cfg = compose([*TINY_RUN, "trainer=ddp", "trainer.devices=2", "trainer.num_nodes=2", "trainer.accelerator=cpu"])
    with pytest.raises(ConfigError, match="divisible by the 4 data-parallel ranks"):
        check_config(cfg)
    check_config(compose([*TINY_RUN, "trainer=ddp", "trainer.devices=2", "trainer.accelerator=cpu"]))
    algorithm, _ = check_config(compose([*TINY_RUN, "algorithm.micro_batch_size=8"]))
    with pytest.raises(ConfigError, match="algorithm.micro_batch_size=8 must divide each rank's share"):
        check_world_size(algorithm, 2)  # devices=auto: checked again once the trainer knows the ranks


def test_processes_without_a_process_group_fail_at_start_up(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")  # what torchrun sets
    cfg = compose([*TINY_RUN, "intervention=steer", "intervention.components.steer.scope=global"])
    with pytest.raises(ConfigError, match=r"WORLD_SIZE=2 processes but trainer.devices x trainer.num_nodes = 1.*"
                                          r"intervention.components.steer has scope: global, which needs a process group"):
        check_config(cfg)
    check_config(compose([*TINY_RUN, "intervention=steer", "intervention.components.steer.scope=global",
                          "trainer=ddp", "trainer.devices=2", "trainer.accelerator=cpu"]))
    monkeypatch.delenv("WORLD_SIZE")
    check_config(cfg)  # one process with scope: global is fine: "global" is then the whole mini-batch


def test_fsdp_on_the_tiny_model_fails_at_start_up():
    with pytest.raises(ConfigError, match="too small to shard; use trainer=ddp"):
        check_config(compose([*TINY_RUN, "trainer=fsdp", "trainer.devices=2"]))
    check_config(compose([*TINY_RUN, "trainer=fsdp", "trainer.devices=2", "model.path=some/model"]))


def test_the_fsdp_config_builds_the_strategy_with_its_knobs():
    from hydra.utils import instantiate
    from lightning.pytorch.strategies import ModelParallelStrategy
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    cfg = compose([*TINY_RUN, "trainer=fsdp", "trainer.strategy.cpu_offload=true", "trainer.strategy.mixed_precision=null",
                   "trainer.strategy.layer_class=transformers.models.llama.modeling_llama.LlamaDecoderLayer"])
    strategy = instantiate(cfg.trainer.strategy)
    assert isinstance(strategy, ModelParallelStrategy)
    assert (strategy.layer_class, strategy.cpu_offload, strategy.mixed_precision, strategy.activation_checkpointing) == (
        LlamaDecoderLayer, True, None, True)
    with pytest.raises(ConfigError, match=r"trainer.strategy.mixed_precision='fp8' is not valid"):
        check_config(compose([*TINY_RUN, "trainer=fsdp", "model.path=some/model", "trainer.strategy.mixed_precision=fp8"]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (the CPU runs above use gloo)")
def test_gpu_ddp_and_fsdp_check():
    result = subprocess.run([sys.executable, str(REPO / "experiments/benchmarks/gpu_ddp_check.py")], cwd=REPO,
                            capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
