"""Turning prompt records into token ids: chat template, length filter with one warning."""

from __future__ import annotations

import logging
from typing import Sequence

from steer.data.records import PromptRecord

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
