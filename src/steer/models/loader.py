"""Loading the policy and its tokenizer: a Hugging Face id or local folder, a GGUF file, or the
embedded tiny model (built locally and warmed up on the arithmetic task, cached on disk)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_pretrained(path: str, dtype: str = "float32", gguf_file: str | None = None):
    """``(tokenizer, policy)`` from a Hub id or a local folder (optionally a GGUF file inside it).

    The tokenizer pads on the left (prompts are left-padded for generation); a tokenizer without a
    pad token reuses its EOS token.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype not in DTYPES:
        raise ValueError(f"model.dtype={dtype!r} is not valid; choose one of {sorted(DTYPES)}")
    kwargs: dict[str, Any] = {"gguf_file": gguf_file} if gguf_file else {}
    tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left", **kwargs)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    policy = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype], **kwargs)
    return tokenizer, policy


def load_policy(
    path: str | None,
    dtype: str,
    gguf_file: str | None,
    tiny: dict,
    warmup: dict | None,
    task,
    is_correct: Callable[[Sequence[str], Sequence[str]], Sequence[bool]],
    cache_dir: str,
):
    """The policy named by ``model.*``; returns ``(tokenizer, policy, warmup_info or None)``."""
    if path:
        if not gguf_file and not Path(path).exists() and path.startswith((".", "/")):
            raise FileNotFoundError(f"model.path={path!r} does not exist")
        tokenizer, policy = load_pretrained(path, dtype, gguf_file)
        return tokenizer, policy, None

    from steer.models.tiny import build_char_tokenizer, build_tiny_policy
    from steer.models.warmup import WarmupConfig, cached_warmup

    def build():
        tokenizer = build_char_tokenizer()
        return tokenizer, build_tiny_policy(tokenizer, **tiny)

    if not warmup:
        tokenizer, policy = build()
        return tokenizer, policy, None
    tokenizer, policy, info = cached_warmup(
        build, task, WarmupConfig(**warmup), is_correct, cache_dir, key_parts=[dict(tiny), "char-tokenizer-v1"]
    )
    return tokenizer, policy.to(DTYPES[dtype]), info
