"""What the RL step has computed (:class:`StepContext`), read by the update and by step observers,
and the observer hooks (:class:`StepObserver`) for instruments that must see the update itself
(the entropy-dynamics probe, :mod:`steer.probe`)."""

from __future__ import annotations

from dataclasses import dataclass

import lightning as L
import torch

from steer.algo.interventions.base import PolicyTokens
from steer.data.records import PromptBatch
from steer.rollout.base import RolloutBatch


@dataclass
class StepContext:
    """One RL step's batch, rollout and per-row values, all on the module's device."""

    step: int
    batch: PromptBatch
    rollout: RolloutBatch
    rewards: torch.Tensor
    """``[num_prompts, n]``."""
    advantages: torch.Tensor
    """``[B, 1]``, one per response."""
    old_logprobs: torch.Tensor
    """``[B, R]`` log pi_old of the sampled tokens (0 on padding)."""
    old_entropy: torch.Tensor
    """``[B, R]`` entropy of pi_old (0 on padding)."""
    metrics: dict[str, float]
    """Observers add their metrics here; they are published with the step's metrics."""
    ref_logprobs: torch.Tensor | None = None
    """``[B, R]`` log pi_ref of the reference model (0 on padding); None without one."""

    def policy_tokens(self, rows: torch.Tensor, logprobs: torch.Tensor, entropy: torch.Tensor,
                      minibatch_rows: torch.Tensor | None = None) -> PolicyTokens:
        """The loss's view of the rollout rows ``rows``: ``logprobs`` and ``entropy`` ``[len(rows), width]``
        from the current forward pass, every other tensor cut to the same rows and width
        (``minibatch_rows``: see :attr:`PolicyTokens.minibatch_rows`)."""
        width = logprobs.shape[1]
        sampler_logprobs = self.rollout.sampling_logprobs
        return PolicyTokens(
            logprobs=logprobs,
            entropy=entropy,
            old_logprobs=self.old_logprobs[rows, :width],
            old_entropy=self.old_entropy[rows, :width],
            advantages=self.advantages[rows].expand(-1, width),
            mask=self.rollout.response_mask[rows, :width],
            ref_logprobs=None if self.ref_logprobs is None else self.ref_logprobs[rows, :width],
            sampler_logprobs=None if sampler_logprobs is None else sampler_logprobs[rows, :width],
            minibatch_rows=minibatch_rows,
        )


class StepObserver:
    """Hooks into the RL step for instruments that must see the update itself (register with
    ``module.observers.append``). Both hooks run without gradient; ``module`` is the
    :class:`steer.module.RLVRModule`.

    ``before_update`` runs once per RL step, when the old log-probs and entropies of every row are
    complete and the weights are still pi_old's: after the first mini-batch's forward and backward
    (its gradients may be accumulated, see :attr:`steer.module.RLVRModule.reuse_update_logprobs`) and
    before its optimiser step. ``after_optimizer_step`` runs after each optimiser step."""

    def before_update(self, module: L.LightningModule, context: StepContext) -> None: ...

    def after_optimizer_step(self, module: L.LightningModule, context: StepContext, rows: torch.Tensor, index: int) -> None: ...
