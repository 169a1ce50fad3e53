"""Peak memory (RSS) of ONE forward + backward of the policy-loss path for a SmolLM2-135M-shaped model.

The model is a random-init Qwen2 with SmolLM2-135M's shape (vocabulary 49,152, hidden 576, 30 layers,
9 heads, 3 KV heads, intermediate 1536, tied embeddings); the batch is 64 sequences x 87 tokens
(23 prompt + 64 response). The pass is the trainer's own: ``response_logprobs_and_entropy`` (chunked
output head) then ``policy_loss`` (GRPO, token-mean) and ``backward``, micro-batch by micro-batch as
``RLVRModule._accumulate_gradients`` does. Each configuration runs in a fresh subprocess; its peak is the
child's ``ru_maxrss`` (includes the interpreter, torch and the weights + gradients: the "model" column
is the RSS after building the model and one tiny forward, before the measured pass).

    python experiments/benchmarks/bench_memory.py [--threads 1] [--only 0 3 5]   # all configurations
    python experiments/benchmarks/bench_memory.py --child '{"chunk": 1024, ...}'    # one (internal)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"
SHAPE = dict(vocab_size=49152, hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
             intermediate_size=1536, tie_word_embeddings=True, max_position_embeddings=256)
SEQUENCES, PROMPT, RESPONSE = 64, 23, 64

# (chunk = algorithm.logprob_chunk_tokens, checkpointing = model.gradient_checkpointing,
#  micro = algorithm.micro_batch_size (None: the whole mini-batch), dtype = model.dtype)
CONFIGS = [
    dict(chunk=4096, checkpointing=False, micro=None, dtype="float32"),
    dict(chunk=512, checkpointing=False, micro=None, dtype="float32"),
    dict(chunk=4096, checkpointing=True, micro=None, dtype="float32"),
    dict(chunk=1024, checkpointing=True, micro=None, dtype="float32"),
    dict(chunk=512, checkpointing=True, micro=None, dtype="float32"),
    dict(chunk=1024, checkpointing=False, micro=16, dtype="float32"),
    dict(chunk=1024, checkpointing=True, micro=16, dtype="float32"),
    dict(chunk=1024, checkpointing=True, micro=8, dtype="float32"),
    dict(chunk=1024, checkpointing=True, micro=None, dtype="bfloat16"),
    dict(chunk=1024, checkpointing=True, micro=16, dtype="bfloat16"),
]


def rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def child(config: dict) -> dict:
    """One forward + backward of ``config``; returns peak RSS figures and seconds."""
    sys.path.insert(0, str(SRC))
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from steer.algo.interventions.base import PolicyTokens
    from steer.algo.logprobs import response_logprobs_and_entropy
    from steer.algo.interventions.base import ClipConfig
    from steer.algo.policy_loss import LossTotals, policy_loss
    from steer.models.loader import DTYPES, enable_activation_checkpointing

    torch.manual_seed(0)
    policy = Qwen2ForCausalLM(Qwen2Config(**SHAPE)).to(DTYPES[config["dtype"]]).train()
    if config["checkpointing"]:
        enable_activation_checkpointing(policy)
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, SHAPE["vocab_size"], (SEQUENCES, PROMPT + RESPONSE), generator=generator)
    attention = torch.ones_like(input_ids)
    attention[: SEQUENCES // 2, : PROMPT // 2] = 0  # some left padding
    lengths = torch.randint(RESPONSE // 2, RESPONSE + 1, (SEQUENCES,), generator=generator)
    mask = (torch.arange(RESPONSE)[None] < lengths[:, None]).float()
    attention[:, PROMPT:] = mask.long()
    advantages = torch.randn(SEQUENCES, 1, generator=generator)
    with torch.no_grad():  # the old log-probs (phase 4) in the same pass shape, then freed
        old_logprobs = torch.cat([
            response_logprobs_and_entropy(policy, input_ids[s : s + 16], attention[s : s + 16], RESPONSE, chunk_tokens=config["chunk"])[0]
            for s in range(0, SEQUENCES, 16)
        ])
    model_gb = rss_gb()
    totals = LossTotals(tokens=float(mask.sum()), sequences=float(SEQUENCES), max_response_length=RESPONSE)
    micro = config["micro"] or SEQUENCES
    start = time.perf_counter()
    for s in range(0, SEQUENCES, micro):
        rows = slice(s, s + micro)
        logprobs, entropy = response_logprobs_and_entropy(policy, input_ids[rows], attention[rows], RESPONSE, chunk_tokens=config["chunk"])
        tokens = PolicyTokens(logprobs=logprobs, entropy=entropy, old_logprobs=old_logprobs[rows], old_entropy=entropy.detach(),
                              advantages=advantages[rows].expand(-1, RESPONSE), mask=mask[rows])
        loss, _ = policy_loss(tokens, ClipConfig(0.2, 0.2, 3.0), [], "token-mean", totals)
        loss.backward()
    seconds = time.perf_counter() - start
    grad_norm = torch.sqrt(sum((p.grad.float() ** 2).sum() for p in policy.parameters())).item()
    return {**config, "model_gb": model_gb, "peak_gb": rss_gb(), "seconds": seconds, "grad_norm": grad_norm}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--only", type=int, nargs="*", help="indices into CONFIGS")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args()
    if args.child:
        import torch

        torch.set_num_threads(args.threads)
        print(json.dumps(child(json.loads(args.child))))
        return
    print(f"load average {os.getloadavg()}, threads {args.threads}; target: peak <= 4 GB", flush=True)
    print(f"{'#':>2} {'chunk':>5} {'ckpt':>5} {'micro':>5} {'dtype':>8} {'model GB':>8} {'peak GB':>8} {'seconds':>8} {'grad norm':>10}", flush=True)
    rows = []
    for index in args.only if args.only is not None else range(len(CONFIGS)):
        command = [sys.executable, __file__, "--threads", str(args.threads), "--child", json.dumps(CONFIGS[index])]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            print(f"{index:>2} failed (exit {done.returncode}): {done.stderr.strip().splitlines()[-1:]}", flush=True)
            continue
        row = json.loads(done.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(f"{index:>2} {row['chunk']:>5} {str(row['checkpointing']):>5} {str(row['micro'] or 64):>5} {row['dtype']:>8} "
              f"{row['model_gb']:8.2f} {row['peak_gb']:8.2f} {row['seconds']:8.1f} {row['grad_norm']:10.4g}  load {os.getloadavg()[0]:.1f}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
