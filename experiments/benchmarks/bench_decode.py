"""Decode paths for the Hugging Face rollout engine, side by side on the issue-13 workload.

Random-init Qwen2 with the character tokenizer (``steer.models.tiny``), 8 prompts x 8 samples =
64 rows, at most 48 new tokens, temperature 1, top-p 1. Candidates, run interleaved (A B C ... A B
C ...) so that load from other processes hits all of them alike, each call from the same torch seed:

- ``legacy``: the engine before issue 13: ``model.generate`` with a temperature processor and a
  per-step log-softmax recorder (kept here, verbatim in behaviour, as the baseline);
- ``generate``: plain ``model.generate`` (no processors, records nothing: a lower bound for it);
- ``hf_loop``: our decode loop (``steer.rollout.decode.sample``) through the model's own
  ``forward`` and ``DynamicCache``;
- ``functional``: the same loop through ``FunctionalDecoder``, each prompt's prefill computed once
  for its 8 samples (the engine's default);
- ``functional_unshared``: the same without sharing the prefill (every row's prompt computed);
- ``static_compiled``: transformers' ``StaticCache`` with the model's forward under
  ``torch.compile`` for the decode steps; its first call (compile + run) is reported separately
  (``first call s``) as the compile time.

``--gqa K`` adds ``functional`` on the same size built with K key/value heads (a different,
smaller model: a random-init GQA policy samples other tokens, so compare tokens/s too).

Printed per size: median seconds per generate call, generated tokens/s (response tokens up to
and including EOS), the ratio to ``legacy``, and the load average before and after.

Usage::

    PYTHONPATH=src python experiments/benchmarks/bench_decode.py [--sizes 0.3M 0.5M 2.4M] [--repeats 5] \\
        [--threads 2] [--candidates legacy generate hf_loop functional functional_unshared static_compiled] [--gqa 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

SIZES = {  # name: (hidden, layers, heads)
    "0.3M": (96, 2, 4),
    "0.5M": (128, 2, 4),  # the embedded default's shape (random init here)
    "2.4M": (192, 4, 4),
}


def legacy_generate(policy, prompt_ids, prompt_mask, max_new_tokens, eos, pad):
    """The pre-issue-13 engine: ``generate`` + temperature processor + log-prob recorder."""
    from transformers import LogitsProcessor, LogitsProcessorList

    class Temperature(LogitsProcessor):
        def __call__(self, input_ids, scores):
            return scores / 1.0

    class Recorder(LogitsProcessor):
        def __init__(self):
            self.previous, self.recorded = None, []

        def __call__(self, input_ids, scores):
            if self.previous is not None:
                self.recorded.append(self.previous.gather(-1, input_ids[:, -1:]).squeeze(-1))
            self.previous = torch.log_softmax(scores.float(), dim=-1)
            return scores

    recorder = Recorder()
    output = policy.generate(
        input_ids=prompt_ids, attention_mask=prompt_mask.long(), do_sample=True, temperature=1.0, top_k=0,
        top_p=1.0, max_new_tokens=max_new_tokens, logits_processor=LogitsProcessorList([Temperature(), recorder]),
        pad_token_id=pad, eos_token_id=eos,
    )
    return output[:, prompt_ids.shape[1]:]


def plain_generate(policy, prompt_ids, prompt_mask, max_new_tokens, eos, pad):
    output = policy.generate(
        input_ids=prompt_ids, attention_mask=prompt_mask.long(), do_sample=True, temperature=1.0, top_k=0,
        top_p=1.0, max_new_tokens=max_new_tokens, pad_token_id=pad, eos_token_id=eos,
    )
    return output[:, prompt_ids.shape[1]:]


def loop(functional: bool, group: int = 1):
    def run(policy, prompt_ids, prompt_mask, max_new_tokens, eos, pad):
        from steer.rollout.decode import sample

        return sample(policy, prompt_ids, prompt_mask, max_new_tokens, eos, pad, functional=functional, group=group)[0]

    return run


_STATIC: dict = {}


def static_compiled(policy, prompt_ids, prompt_mask, max_new_tokens, eos, pad):
    """transformers' ``StaticCache`` + ``torch.compile`` of the model's forward for the decode steps
    (the prefill runs eager). Cache and compiled forward are kept per (model, batch, length) and
    reused, as ``generate`` does, so later calls skip the compile."""
    from transformers import StaticCache

    from steer.rollout.decode import gumbel_max, sampling_logprobs

    batch, prompt_len = prompt_ids.shape
    total = prompt_len + max_new_tokens
    key = (id(policy), batch, total)
    if key not in _STATIC:
        _STATIC[key] = (StaticCache(config=policy.config, max_cache_len=total), torch.compile(policy.forward))
    cache, forward = _STATIC[key]
    cache.reset()
    mask = torch.zeros(batch, total, dtype=torch.long)
    mask[:, :prompt_len] = prompt_mask.long()
    positions = (prompt_mask.long().cumsum(-1) - 1).clamp(min=0)
    logits = policy(input_ids=prompt_ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True,
                    logits_to_keep=1).logits[:, -1]
    position, finished, out = positions[:, -1:], torch.zeros(batch, dtype=torch.bool), []
    for step in range(max_new_tokens):
        tokens = gumbel_max(sampling_logprobs(logits, 1.0, 1.0)).masked_fill(finished, pad)
        out.append(tokens)
        finished = finished | (tokens == eos)
        if step == max_new_tokens - 1 or bool(finished.all()):
            break
        position = position + 1
        mask[:, prompt_len + step] = 1
        logits = forward(input_ids=tokens[:, None], attention_mask=mask, position_ids=position, cache=cache,
                         use_cache=True).logits[:, -1]
    return torch.stack(out, dim=1)


CANDIDATES = {
    "legacy": legacy_generate,
    "generate": plain_generate,
    "hf_loop": loop(functional=False),
    "functional": loop(functional=True, group=8),  # the rows are 8 prompts x 8 adjacent samples
    "functional_unshared": loop(functional=True),
    "static_compiled": static_compiled,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["0.3M", "2.4M"], choices=list(SIZES))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--candidates", nargs="+", default=list(CANDIDATES), choices=list(CANDIDATES))
    parser.add_argument("--gqa", type=int, default=None, metavar="K",
                        help="also run `functional` on the same size with K key/value heads (model.tiny.num_kv_heads)")
    args = parser.parse_args()

    from steer.models.tiny import build_char_tokenizer, build_tiny_policy
    from steer.rollout.base import left_pad, response_mask_from_ids

    torch.set_num_threads(args.threads)
    tokenizer = build_char_tokenizer()
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    prompts = [tokenizer(f"Q: Compute {a}+{b}+{a + b}.\nA: ").input_ids for a, b in zip(range(10, 90, 10), range(7, 99, 12))]
    prompt_ids, prompt_mask = left_pad([p for p in prompts for _ in range(8)], pad)
    print(f"load average before: {os.getloadavg()}; torch {torch.__version__}, threads {torch.get_num_threads()}; "
          f"64 rows (8 prompts x 8), max_new_tokens={args.new_tokens}, repeats={args.repeats}")
    for size in args.sizes:
        hidden, layers, heads = SIZES[size]
        policy = build_tiny_policy(tokenizer, hidden_size=hidden, num_layers=layers, num_heads=heads).eval()
        parameters = sum(p.numel() for p in policy.parameters())
        runs = [(name, CANDIDATES[name], policy) for name in args.candidates]
        if args.gqa:
            grouped = build_tiny_policy(tokenizer, hidden_size=hidden, num_layers=layers, num_heads=heads,
                                        num_kv_heads=args.gqa).eval()
            runs.append((f"functional_kv{args.gqa}", CANDIDATES["functional"], grouped))
        names = [name for name, _, _ in runs]
        first: dict[str, float] = {}
        seconds: dict[str, list[float]] = {name: [] for name in names}
        tokens: dict[str, list[int]] = {name: [] for name in names}
        with torch.no_grad():
            for repeat in range(args.repeats + 1):  # repeat 0 is the warm-up (and compile) call
                for name, candidate, model in runs:
                    torch.manual_seed(repeat)
                    start = time.perf_counter()
                    response = candidate(model, prompt_ids, prompt_mask, args.new_tokens, eos, pad)
                    elapsed = time.perf_counter() - start
                    if repeat == 0:
                        first[name] = elapsed
                        continue
                    seconds[name].append(elapsed)
                    tokens[name].append(int(response_mask_from_ids(response, eos)[0].sum()))
        base = statistics.median(seconds["legacy"]) if "legacy" in seconds else None
        print(f"\n{size}: hidden {hidden}, {layers} layers, {heads} heads, {parameters / 1e6:.2f}M parameters")
        print(f"{'candidate':<20}{'s/call':>9}{'tokens/s':>10}{'vs legacy':>11}{'first call s':>14}")
        for name in names:
            median = statistics.median(seconds[name])
            rate = statistics.median(t / s for t, s in zip(tokens[name], seconds[name]))
            ratio = f"{median / base:.2f}" if base else "-"
            print(f"{name:<20}{median:>9.3f}{rate:>10.0f}{ratio:>11}{first[name]:>14.2f}")
    print(f"\nload average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
