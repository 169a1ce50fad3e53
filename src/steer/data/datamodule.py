"""The DataModule: batches of prompt records, tokenised with the policy's tokenizer."""

from __future__ import annotations

import logging

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from steer.data.prompts import encode_prompts
from steer.module import PromptBatch

log = logging.getLogger(__name__)


class StepBatchSampler(Sampler[list[int]]):
    """Endless batches of dataset indices, the batch of RL step ``s`` a pure function of ``(seed, s)``.

    Step ``s`` takes batch ``p`` of epoch ``e`` (``e, p = divmod(s, len(dataset) // batch_size)``; an
    incomplete last batch is dropped); epoch ``e`` visits the dataset in the order
    ``torch.randperm(len, generator=manual_seed(seed + 1_000_003 * e))`` when shuffling, in index
    order otherwise. Starting at ``start_step`` therefore yields exactly the batches an
    uninterrupted run sees from that step on: the data position of a resumed run.
    """

    def __init__(self, size: int, batch_size: int, seed: int, shuffle: bool, start_step: int = 0) -> None:
        if size < batch_size:
            raise ValueError(f"the training set has {size} prompts, fewer than one batch of {batch_size}")
        self.size, self.batch_size, self.seed, self.shuffle = size, batch_size, seed, shuffle
        self.start_step = start_step
        self.steps_per_epoch = size // batch_size

    def _order(self, epoch: int) -> torch.Tensor | None:
        if not self.shuffle:
            return None
        return torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + 1_000_003 * epoch))

    def __iter__(self):
        step, epoch, order = self.start_step, -1, None
        while True:
            step_epoch, position = divmod(step, self.steps_per_epoch)
            if step_epoch != epoch:
                epoch, order = step_epoch, self._order(step_epoch)
            first = position * self.batch_size
            indices = range(first, first + self.batch_size)
            yield list(indices) if order is None else order[first : first + self.batch_size].tolist()
            step += 1


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
        self.start_step = 0
        """RL step whose batch the loader yields first (a resumed run sets it before ``train_dataloader``)."""

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
        sampler = StepBatchSampler(len(self.train), self.prompts_per_step, self.seed, self.shuffle, self.start_step)
        # Own generator: the loader's base seed must not draw from torch's global one, which the
        # rollouts sample from (a resumed run builds its iterator at a different point of that stream).
        return DataLoader(self.train, batch_sampler=sampler, collate_fn=self._collate, generator=torch.Generator())
