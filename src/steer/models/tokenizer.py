"""Loading a saved tokenizer the way every part of the trainer expects it (padding on the left)."""

from __future__ import annotations

import json
from pathlib import Path


def load_tokenizer(path: str, **kwargs):
    """The tokenizer saved in ``path``, padding on the left.

    A tokenizer saved from a plain ``tokenizer.json`` (class ``TokenizersBackend`` or
    ``PreTrainedTokenizerFast``, e.g. the tiny model's character tokenizer) is loaded as exactly
    that: ``AutoTokenizer`` in transformers 5 would substitute the model type's own tokenizer class
    (``Qwen2Tokenizer`` for a Qwen2 config), which re-tokenises differently (it drops spaces and
    newlines of the character tokenizer).
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    config_file = Path(path) / "tokenizer_config.json"
    if config_file.exists() and (Path(path) / "tokenizer.json").exists():
        saved_class = json.loads(config_file.read_text()).get("tokenizer_class")
        if saved_class in ("TokenizersBackend", "PreTrainedTokenizerFast"):
            return PreTrainedTokenizerFast.from_pretrained(path, padding_side="left", **kwargs)
    return AutoTokenizer.from_pretrained(path, padding_side="left", **kwargs)
