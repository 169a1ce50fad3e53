"""One rank of the FSDP -> vLLM checks in tests/rollout/test_vllm_fsdp.py (started by torchrun, gloo on CPU).

    python -m torch.distributed.run --nproc_per_node 2 tests/rollout/vllm_fsdp_driver.py OUT_DIR TP

A tiny Qwen2 (tied embeddings) is sharded with FSDP2 over the ranks exactly as
``FullyShardedStrategy.shard`` does (each decoder layer, then the root), with float32 compute; the
engines (one per ``TP`` consecutive ranks) are loaded from the shards. Each rank writes what it saw
to ``OUT_DIR/rank<r>.json``; the test asserts on it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "src"))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from steer.algo.logprobs import response_logprobs_and_entropy  # noqa: E402
from steer.models.tiny import build_char_tokenizer, build_tiny_policy  # noqa: E402
from steer.rollout.base import SamplingParams  # noqa: E402
from steer.rollout.vllm import VLLMRolloutEngine, WeightSyncError  # noqa: E402


def perturb(policy, seed: int, scale: float = 0.05, only=None) -> None:
    """Add noise to every rank's local shard (the same generator on every rank: one consistent model)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in policy.named_parameters():
            local = parameter.to_local() if hasattr(parameter, "to_local") else parameter
            noise = scale * torch.randn(local.shape, generator=generator)
            if only is None or name == only:
                local.add_(noise)


def main(out_dir: str, tensor_parallel: int) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    tokenizer = build_char_tokenizer()
    torch.manual_seed(0)
    # head_dim 32: vLLM's CPU attention needs head sizes that are multiples of 16 from 32.
    policy = build_tiny_policy(tokenizer, hidden_size=64, num_layers=3, num_heads=2).eval()
    full_bytes = sum(t.numel() * t.element_size() for t in policy.state_dict().values())
    layer_bytes = sum(p.numel() * p.element_size() for p in policy.model.layers[0].parameters())
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for layer in policy.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(policy, mesh=mesh)
    result: dict = {"rank": rank, "full_bytes": full_bytes, "layer_bytes": layer_bytes,
                    "sharded": all(type(p).__name__ == "DTensor" for p in policy.parameters())}

    engine = VLLMRolloutEngine(policy, tokenizer.pad_token_id, tokenizer.eos_token_id, dtype="float32",
                               tensor_parallel_size=tensor_parallel, sync_bucket_bytes=layer_bytes)
    engine.sync_weights(policy)
    result["engine_index"], result["group_ranks"] = engine.engine_index, engine.group_ranks
    result["first_gap"] = engine.last_sync_check
    result["sync"] = vars(engine.last_sync)

    # An optimiser phase, in effect; then the engine must sample from the new weights.
    perturb(policy, seed=1)
    engine.sync_weights(policy)
    result["gap_after_update"] = engine.last_sync_check
    # Each rank its own prompts, a different number on each rank.
    texts = ["Q: Compute 1+2.\nA: ", "Q: hi\nA: ", "Q: 7+8\nA: "]
    own = [tokenizer(text).input_ids for text in texts[: 2 if rank == 0 else 1]]
    n = 3
    batch = engine.generate(own, SamplingParams(temperature=1.0, max_new_tokens=12, n=n))
    result["rows"] = int(batch.response_ids.shape[0])
    prompts_back = []
    for row in range(batch.prompt_ids.shape[0]):
        ids = batch.prompt_ids[row][batch.prompt_mask[row].bool()].tolist()
        prompts_back.append(ids)
    result["prompts_match"] = prompts_back == [ids for ids in own for _ in range(n)]
    with torch.no_grad():
        teacher, _ = response_logprobs_and_entropy(policy, batch.input_ids, batch.attention_mask,
                                                   batch.response_ids.shape[1], temperature=1.0)
    mask = batch.response_mask
    result["tokens"] = int(mask.sum())
    result["sample_gap_max"] = float((teacher[mask] - batch.sampling_logprobs[mask]).abs().max())
    result["responses"] = batch.response_ids.tolist()

    # A stale shard: one rank's piece of one parameter changes and is not pushed.
    perturb(policy, seed=2, scale=0.5, only="model.layers.1.mlp.down_proj.weight" if rank == 1 else "none")
    try:
        engine.verify_sync(policy)
        result["stale_detected"] = False
    except WeightSyncError as error:
        result["stale_detected"] = "differ from the policy" in str(error)
    engine.sync_weights(policy)
    result["gap_after_repair"] = engine.last_sync_check

    # A push that leaves a tensor out is refused before anything moves.
    state = policy.state_dict()
    state.pop("lm_head.weight")
    try:
        engine.push_weights(state)
        result["missing_refused"] = False
    except WeightSyncError as error:
        result["missing_refused"] = "lm_head.weight" in str(error)

    engine.close()
    dist.barrier()  # the trainer's process group outlives the engine
    result["group_alive_after_close"] = dist.is_initialized()
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
