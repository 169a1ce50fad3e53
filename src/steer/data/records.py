"""The records of the data layer: :class:`PromptRecord`, the unit every dataset yields (one prompt, its
reference answer and where it came from), and :class:`PromptBatch`, what the DataModule yields per RL step."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class PromptRecord:
    prompt: str | list[dict[str, str]]
    """Raw text, or chat messages ``[{"role": ..., "content": ...}]`` (the chat template is applied
    when the prompt is tokenised, see :func:`steer.data.prompts.encode_prompts`)."""
    reference: Any
    """What the reward compares against: a ground-truth string for math, a test spec for code."""
    data_source: str = "unknown"
    """Benchmark or dataset name; metrics are split by it."""
    num_copies: int = 1
    """How many identical rows the source file held (AIME/AMC are replicated x32); kept as one prompt."""


@dataclass
class PromptBatch:
    """What the DataModule yields: records and their prompt token ids."""

    records: list[PromptRecord]
    prompt_ids: list[list[int]]
    dropped: int = 0
    """Prompts of this batch dropped for being longer than ``rollout.max_prompt_length``."""
