"""The update's forward + backward in six settings on CPU: float32 (the default), bfloat16 autocast
(``model.compute_dtype=bfloat16``: float32 master weights, bf16 matrix products, float32 log-softmax
in the output head), each with the attention of ``model.attn_implementation=eager`` (matrix products
and a float32 softmax) instead of the model's own SDPA kernel (``+eager``), and each with
``torch.compile`` on the decoder layers (``+compile``; ``dynamic=True``: the response width changes
every step).

One process runs every setting on the same random batch (the tiny Qwen2 of ``bench_vs_trl.py``'s
sizes, 64 rows of a 40-token prompt and up to 48 response tokens, widths cycling 48/44/40 so that
a compiled graph must serve several shapes). Printed per setting: the first two calls (where
compilation happens), the median of the next ``--repeats`` calls, and the largest log-prob
difference from float32 eager (what the cheaper arithmetic costs in accuracy).

    python experiments/benchmarks/bench_update_kernels.py [--size small|large|default] [--repeats 8]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))

from steer.algo.logprobs import response_logprobs_and_entropy  # noqa: E402
from steer.models.tiny import build_char_tokenizer, build_tiny_policy  # noqa: E402

SIZES = {"default": (128, 2, 4), "small": (96, 2, 4), "large": (192, 4, 4)}
ROWS, PROMPT, RESPONSE = 64, 40, 48
SETTINGS = ("float32", "bfloat16", "float32+eager", "bfloat16+eager", "float32+compile", "bfloat16+compile")


def run(setting: str, size: str, repeats: int) -> dict:
    hidden, layers, heads = SIZES[size]
    tokenizer = build_char_tokenizer()
    model = build_tiny_policy(tokenizer, hidden_size=hidden, num_layers=layers, num_heads=heads).train()
    if setting.endswith("+eager"):
        model.set_attn_implementation("eager")
    if setting.endswith("+compile"):
        for layer in model.model.layers:  # the layers, not the decoder: get_decoder() unwraps a compiled module
            layer.compile(dynamic=True)
    autocast = setting.startswith("bfloat16")
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 90, (ROWS, PROMPT + RESPONSE), generator=generator)
    mask = torch.ones_like(ids)

    def step(width: int) -> torch.Tensor:
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            logprobs, entropy = response_logprobs_and_entropy(model, ids[:, : PROMPT + width], mask[:, : PROMPT + width], width)
        (logprobs.mean() + 0.1 * entropy.mean()).backward()
        return logprobs.detach()

    start = time.perf_counter()
    logprobs = step(RESPONSE)
    step(RESPONSE - 4)
    first = time.perf_counter() - start
    seconds = []
    for index in range(repeats):
        tick = time.perf_counter()
        step(RESPONSE - 4 * (index % 3))
        seconds.append(time.perf_counter() - tick)
    return {"first_two_s": first, "median_s": statistics.median(seconds), "logprobs": logprobs}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="large")
    parser.add_argument("--repeats", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--settings", nargs="+", choices=SETTINGS, default=list(SETTINGS))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = {setting: run(setting, args.size, args.repeats) for setting in args.settings}
    reference = results.get("float32", next(iter(results.values())))["logprobs"]
    print(f"size {args.size} {SIZES[args.size]}, {ROWS} rows x ({PROMPT} + <= {RESPONSE}) tokens, {args.threads} threads")
    print(f"{'setting':>17} {'first 2 calls s':>15} {'median s':>9} {'max |d logprob|':>15}")
    for setting, result in results.items():
        gap = float((result["logprobs"] - reference).abs().max())
        print(f"{setting:>17} {result['first_two_s']:15.2f} {result['median_s']:9.4f} {gap:15.2e}")


if __name__ == "__main__":
    main()
