"""The rollout interface: prompts in, sampled token ids and the sampler's log-probs out.

Every engine (Hugging Face ``generate`` here; vLLM on GPUs) returns a :class:`RolloutBatch` with
left-padded prompts and right-padded responses, and accepts the policy's new weights through
:meth:`RolloutEngine.sync_weights` after each optimiser phase.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

import torch
from omegaconf import DictConfig

from steer.knobs import ConfigError

ENGINE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
"""``rollout.engine.dtype``'s values besides ``auto``."""


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 32
    n: int = 1
    """Samples per prompt (they are adjacent in the output: prompt i owns rows [i*n, (i+1)*n))."""

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1 or self.n < 1:
            raise ValueError(f"max_new_tokens and n must be >= 1, got {self.max_new_tokens}, {self.n}")


@dataclass
class RolloutBatch:
    """``B = num_prompts * n`` sequences; ``P`` prompt and ``R`` response positions."""

    prompt_ids: torch.Tensor
    """``[B, P]`` left-padded."""
    prompt_mask: torch.Tensor
    """``[B, P]`` bool."""
    response_ids: torch.Tensor
    """``[B, R]`` right-padded with the pad id; includes the EOS token when one was sampled."""
    response_mask: torch.Tensor
    """``[B, R]`` bool, True up to and including EOS."""
    sampling_logprobs: torch.Tensor
    """``[B, R]`` log-prob of each sampled token under the sampler's distribution (after temperature and top-p)."""
    truncated: torch.Tensor
    """``[B]`` bool: the response hit ``max_new_tokens`` without EOS."""

    @classmethod
    def from_padded(cls, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, response_ids: torch.Tensor,
                    sampling_logprobs: torch.Tensor, eos_token_id: int, pad_token_id: int) -> "RolloutBatch":
        """A batch from left-padded prompts and right-padded sampled responses, as every engine returns it.

        The response mask runs up to and including the first EOS; a row without EOS is truncated
        (both engines stop only at EOS or at ``max_new_tokens``). Past the mask the ids become
        ``pad_token_id`` and the log-probs 0.
        """
        response_mask, truncated = response_mask_from_ids(response_ids, eos_token_id)
        return cls(
            prompt_ids=prompt_ids,
            prompt_mask=prompt_mask,
            response_ids=response_ids.masked_fill(~response_mask, pad_token_id),
            response_mask=response_mask,
            sampling_logprobs=sampling_logprobs.masked_fill(~response_mask, 0.0),
            truncated=truncated,
        )

    @property
    def input_ids(self) -> torch.Tensor:
        return torch.cat([self.prompt_ids, self.response_ids], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:
        return torch.cat([self.prompt_mask, self.response_mask], dim=1)

    @property
    def response_lengths(self) -> torch.Tensor:
        return self.response_mask.sum(-1)


class RolloutEngine(Protocol):
    def generate(self, prompt_token_ids: Sequence[Sequence[int]], params: SamplingParams) -> RolloutBatch: ...

    def sync_weights(self, policy: torch.nn.Module) -> None: ...


def response_mask_from_ids(response_ids: torch.Tensor, eos_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask that is True up to and including the first EOS; and whether each row lacks an EOS."""
    is_eos = response_ids == eos_token_id
    eos_seen_before = (is_eos.cumsum(-1) - is_eos.long()) > 0
    return ~eos_seen_before, ~is_eos.any(-1)


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``[N, max_len]`` ids and bool mask with the padding on the left."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.bool)
    for row, seq in enumerate(sequences):
        if len(seq):
            ids[row, width - len(seq) :] = torch.tensor(seq, dtype=torch.long)
            mask[row, width - len(seq) :] = True
    return ids, mask


def check_engine_dtype(setting: str) -> None:
    """``rollout.engine.dtype`` is ``auto`` or one of :data:`ENGINE_DTYPES` (else ValueError)."""
    if setting != "auto" and setting not in ENGINE_DTYPES:
        raise ValueError(f"rollout.engine.dtype={setting!r}: choose auto, {', '.join(ENGINE_DTYPES)}")


def resolve_engine_dtype(setting: str, policy: torch.nn.Module, gpu: bool) -> str:
    """``rollout.engine.dtype``: ``auto`` is bfloat16 on a GPU that supports it (as
    ``model.compute_dtype=auto``), else the policy's parameters' dtype; other values are kept."""
    check_engine_dtype(setting)
    if setting == "auto":
        gpu_bf16 = gpu and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return "bfloat16" if gpu_bf16 else str(next(policy.parameters()).dtype).removeprefix("torch.")
    return setting


def check_rollout_engine(cfg: DictConfig) -> None:
    """``rollout.engine``: its ``dtype``; and an engine class may say why it cannot run here (e.g. vLLM
    not installed)."""
    engine = cfg.rollout.get("engine") or {}
    try:
        check_engine_dtype(engine.get("dtype", "auto"))
    except ValueError as error:
        raise ConfigError(str(error)) from None
    target = engine.get("_target_")
    if not target:
        return
    from hydra.utils import get_class

    try:
        engine_class = get_class(target)
    except Exception as error:
        raise ConfigError(f"rollout.engine._target_={target!r} cannot be imported: {error}") from None
    reason = getattr(engine_class, "unavailable_reason", None)
    problem = reason() if callable(reason) else None
    if problem:
        raise ConfigError(f"rollout.engine={target}: {problem}")
