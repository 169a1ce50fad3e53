"""Turning prompt records into token ids: chat template, length filter with one warning."""

from __future__ import annotations

import logging
from typing import Sequence

from steer.data.records import PromptRecord
from steer.knobs import ConfigError

log = logging.getLogger(__name__)


def render_prompt(record: PromptRecord, tokenizer, use_chat_template: bool = True) -> str:
    """The text the policy sees: the chat template applied to the messages (with the generation
    prompt), or the raw string when the record holds text or the template is switched off."""
    if isinstance(record.prompt, str):
        messages = [{"role": "user", "content": record.prompt}]
        if not use_chat_template or tokenizer.chat_template is None:
            return record.prompt
    else:
        messages = record.prompt
        if not use_chat_template or tokenizer.chat_template is None:
            return "\n".join(m["content"] for m in messages)
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def encode_prompts(
    records: Sequence[PromptRecord],
    tokenizer,
    max_prompt_length: int,
    use_chat_template: bool = True,
    what: str = "prompts",
    warn: bool = True,
) -> tuple[list[PromptRecord], list[list[int]], int]:
    """Tokenise prompts and drop those longer than ``max_prompt_length`` tokens.

    Returns ``(kept_records, kept_token_ids, num_dropped)``; when any prompt is dropped and
    ``warn`` is set, one warning says how many.
    """
    kept, ids, dropped = [], [], 0
    for record in records:
        text = render_prompt(record, tokenizer, use_chat_template)
        token_ids = tokenizer(text, add_special_tokens=False).input_ids
        if len(token_ids) > max_prompt_length:
            dropped += 1
            continue
        kept.append(record)
        ids.append(token_ids)
    if dropped and warn:
        log.warning(
            "dropped %d of %d %s longer than max_prompt_length=%d tokens",
            dropped, len(records), what, max_prompt_length,
        )
    return kept, ids, dropped


PROMPT_FIT_SAMPLE = 256
"""Training prompts encoded at start-up to check that some fit ``rollout.max_prompt_length``."""


def check_prompts_fit(records: Sequence, tokenizer, max_prompt_length: int, use_chat_template: bool = True,
                      prompts_per_step: int = 1, knob: str = "rollout.max_prompt_length") -> None:
    """The training prompts can fill a batch, and some of the first :data:`PROMPT_FIT_SAMPLE` fit
    in ``max_prompt_length`` tokens.

    Prompts over the limit are dropped (and counted) during training; when none fits, a run would
    train nothing, so it is refused at start-up with the shortest prompt's length. Fewer prompts
    than one batch would give an empty epoch, again and again.
    """
    if len(records) < prompts_per_step:
        raise ConfigError(f"data.train holds {len(records)} prompt(s) (after de-duplication), fewer than "
                          f"algorithm.prompts_per_step={prompts_per_step}; allowed: a dataset (or data.train.limit) of at "
                          f"least {prompts_per_step} prompts, or a smaller algorithm.prompts_per_step")
    sample = [records[index] for index in range(min(len(records), PROMPT_FIT_SAMPLE))]
    if not sample:
        raise ConfigError("data.train holds no prompts; allowed: a dataset with at least one prompt")
    lengths = [len(tokenizer(render_prompt(r, tokenizer, use_chat_template), add_special_tokens=False).input_ids)
               for r in sample]
    if min(lengths) > max_prompt_length:
        raise ConfigError(f"{knob}={max_prompt_length} is shorter than every one of the first {len(sample)} training "
                          f"prompts (shortest {min(lengths)} tokens, longest {max(lengths)}): the run would train "
                          f"nothing; allowed: an integer >= {min(lengths)}")
