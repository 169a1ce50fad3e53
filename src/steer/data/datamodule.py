"""The DataModule: batches of prompt records, tokenised with the policy's tokenizer."""

from __future__ import annotations

import logging

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler, SequentialSampler

from steer.data.prompts import encode_prompts
from steer.module import PromptBatch

log = logging.getLogger(__name__)


class PromptDataModule(L.LightningDataModule):
    """Yields :class:`PromptBatch` es of ``prompts_per_step`` records.

    Args:
        train: a map-style dataset of :class:`PromptRecord`.
        shuffle: draw in a seeded random order (real datasets); the synthetic stream is already random.
    """

    def __init__(
        self,
        train: Dataset,
        tokenizer,
        prompts_per_step: int,
        max_prompt_length: int,
        seed: int,
        shuffle: bool = True,
        use_chat_template: bool = True,
    ) -> None:
        super().__init__()
        self.train, self.tokenizer = train, tokenizer
        self.prompts_per_step, self.max_prompt_length = prompts_per_step, max_prompt_length
        self.seed, self.shuffle, self.use_chat_template = seed, shuffle, use_chat_template
        self.dropped_prompts = 0

    def _collate(self, records) -> PromptBatch:
        kept, prompt_ids, dropped = encode_prompts(
            records, self.tokenizer, self.max_prompt_length, self.use_chat_template, warn=False
        )
        if dropped and not self.dropped_prompts:  # one warning per run; the metric counts the rest
            log.warning(
                "dropping training prompts longer than rollout.max_prompt_length=%d tokens (%d in the first "
                "such batch); every drop is counted in the metric batch/dropped_prompts",
                self.max_prompt_length, dropped,
            )
        self.dropped_prompts += dropped
        return PromptBatch(records=kept, prompt_ids=prompt_ids, dropped=dropped)

    def transfer_batch_to_device(self, batch: PromptBatch, device, dataloader_idx: int) -> PromptBatch:
        return batch  # token ids are padded and moved to the device by the rollout engine

    def train_dataloader(self) -> DataLoader:
        if self.shuffle:
            sampler = RandomSampler(self.train, generator=torch.Generator().manual_seed(self.seed))
        else:
            sampler = SequentialSampler(self.train)
        return DataLoader(
            self.train, batch_size=self.prompts_per_step, sampler=sampler, collate_fn=self._collate, drop_last=True
        )
