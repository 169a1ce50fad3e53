"""The DataModule: batches of prompt records, tokenised with the policy's tokenizer.

The data order is a pure function of ``(seed, global RL-step index)``: RL step ``t`` draws the
``prompts_per_step`` global positions ``t * prompts_per_step ...`` of an endless stream (the dataset
in order, or a seeded permutation per pass), whatever the number of ranks. A resumed run
(``start_step``) or a run on another number of devices therefore sees the same prompts.

Under data parallelism each rank takes, from every mini-batch of ``minibatch_prompts`` consecutive
prompts of the step, its own contiguous share of whole prompts (all ``n`` samples of a prompt stay
on the rank that generates them). Concatenating the ranks' shares of a mini-batch in rank order
gives that mini-batch exactly as one process sees it, so selections over all ranks
(``scope: global``) and the gradient match a single-process run over the same global batch.
"""

from __future__ import annotations

import logging
from typing import Iterator

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from steer.data.prompts import encode_prompts
from steer.data.records import PromptBatch

log = logging.getLogger(__name__)


class StepBatchSampler:
    """Yields, for RL steps ``start_step, start_step + 1, ...`` (endlessly), the dataset indices of
    this rank's share of each step's global batch.

    Args:
        dataset_size: number of records ``N``.
        prompts_per_step: the global batch (all ranks together).
        minibatch_prompts: prompts per optimiser step, all ranks together; each rank takes
            ``minibatch_prompts // world_size`` consecutive prompts of every mini-batch.
        seed: seeds the permutation of each pass over the data (``shuffle``).
        shuffle: a seeded random order per pass; otherwise the dataset order.
        rank, world_size: this process's data-parallel rank and the number of ranks.
        start_step: the first RL step to yield.
    """

    def __init__(
        self,
        dataset_size: int,
        prompts_per_step: int,
        minibatch_prompts: int,
        seed: int,
        shuffle: bool,
        rank: int = 0,
        world_size: int = 1,
        start_step: int = 0,
    ) -> None:
        if dataset_size < 1:
            raise ValueError("the training dataset is empty")
        if prompts_per_step % minibatch_prompts or minibatch_prompts % world_size:
            raise ValueError(
                f"minibatch_prompts={minibatch_prompts} must divide prompts_per_step={prompts_per_step} "
                f"and be divisible by the {world_size} data-parallel ranks"
            )
        self.dataset_size, self.prompts_per_step, self.minibatch_prompts = dataset_size, prompts_per_step, minibatch_prompts
        self.seed, self.shuffle = seed, shuffle
        self.rank, self.world_size, self.start_step = rank, world_size, start_step
        self._pass: tuple[int, torch.Tensor] | None = None

    def global_position_index(self, position: int) -> int:
        """The dataset index at global stream position ``position`` (``pass = position // N``)."""
        data_pass, offset = divmod(position, self.dataset_size)
        if not self.shuffle:
            return offset
        if self._pass is None or self._pass[0] != data_pass:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + data_pass)
            self._pass = (data_pass, torch.randperm(self.dataset_size, generator=generator))
        return int(self._pass[1][offset])

    def step_indices(self, step: int) -> list[int]:
        """This rank's dataset indices for RL step ``step``, mini-batch by mini-batch."""
        share = self.minibatch_prompts // self.world_size
        first = step * self.prompts_per_step
        positions = [
            first + minibatch + self.rank * share + i
            for minibatch in range(0, self.prompts_per_step, self.minibatch_prompts)
            for i in range(share)
        ]
        return [self.global_position_index(position) for position in positions]

    def __iter__(self) -> Iterator[list[int]]:
        step = self.start_step
        while True:
            yield self.step_indices(step)
            step += 1


class PromptDataModule(L.LightningDataModule):
    """Yields each RL step's :class:`PromptBatch`: this rank's share of ``prompts_per_step`` records.

    Args:
        train: a map-style dataset of :class:`PromptRecord`.
        prompts_per_step: the global batch of one RL step (all ranks together).
        minibatch_prompts: prompts per optimiser step, all ranks together (null: ``prompts_per_step``).
        shuffle: draw in a seeded random order (real datasets); the synthetic stream is already random.

    ``start_step`` (default 0) may be set before :meth:`train_dataloader` is called: the loader then
    starts at that RL step's batch (exact resume).
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
        minibatch_prompts: int | None = None,
    ) -> None:
        super().__init__()
        self.train, self.tokenizer = train, tokenizer
        self.prompts_per_step, self.max_prompt_length = prompts_per_step, max_prompt_length
        self.minibatch_prompts = minibatch_prompts or prompts_per_step
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

    def batch_sampler(self) -> StepBatchSampler:
        """This process's sampler (rank and world size from the attached trainer, else 0 and 1)."""
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        return StepBatchSampler(
            len(self.train), self.prompts_per_step, self.minibatch_prompts, self.seed, self.shuffle,
            rank=rank, world_size=world, start_step=self.start_step,
        )

    def train_dataloader(self) -> DataLoader:
        # Endless: the module stops the trainer after algorithm.steps. The trainer must not swap in a
        # DistributedSampler (app.train passes use_distributed_sampler=False): sharding is ours.
        # Own generator: the loader's base seed must not draw from torch's global one, which the
        # rollouts sample from (a resumed run builds its iterator at a different point of that stream).
        return DataLoader(self.train, batch_sampler=self.batch_sampler(), collate_fn=self._collate,
                          generator=torch.Generator())
