"""Rich progress bar counted in RL steps (one rollout batch each), showing reward and entropy."""

from __future__ import annotations

from lightning.pytorch.callbacks import RichProgressBar


class RLProgressBar(RichProgressBar):
    @property
    def total_train_batches(self) -> int | float:
        module = self.trainer.lightning_module
        steps = getattr(getattr(module, "algorithm", None), "steps", None)
        return steps if steps is not None else super().total_train_batches

    def get_metrics(self, trainer, pl_module):
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        return metrics
