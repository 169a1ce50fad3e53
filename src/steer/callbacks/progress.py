"""Rich progress bar counted in RL steps (one rollout batch each).

Reads like ``RL step 120/250 ━━━━━━━ 120/250 0:01:10 • 0:01:20 reward: 0.52 • entropy: 0.143 •
eval acc: 0.61 @100 • s/step: 0.58``: the last step's mean reward and token entropy (from
``module.last_metrics``), the held-out accuracy of the last evaluation (first ``mean_at_k`` of the
first benchmark, and the step it was measured at) and the wall time per RL step (a moving average
that leaves evaluation time out). Lightning's epoch counter means nothing here (``max_epochs=-1``:
training length is ``algorithm.steps``), so the bar does not show it.
"""

from __future__ import annotations

import time

from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.callbacks.progress.rich_progress import (
    BatchesProcessedColumn,
    CustomBarColumn,
    CustomTimeColumn,
)
from rich.progress import TextColumn

# How much one new step counts in the s/step moving average (about the last 10 steps).
_SMOOTHING = 0.2


class RLProgressBar(RichProgressBar):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._step_started: float | None = None
        self.seconds_per_step: float | None = None

    @property
    def total_train_batches(self) -> int | float:
        module = self.trainer.lightning_module
        steps = getattr(getattr(module, "algorithm", None), "steps", None)
        return steps if steps is not None else super().total_train_batches

    def _get_train_description(self, current_epoch: int) -> str:
        return "RL steps"

    def configure_columns(self, trainer) -> list:
        # Lightning's columns without its it/s speed column (s/step is among the metrics).
        return [
            TextColumn("[progress.description]{task.description}"),
            CustomBarColumn(complete_style=self.theme.progress_bar, finished_style=self.theme.progress_bar_finished,
                            pulse_style=self.theme.progress_bar_pulse),
            BatchesProcessedColumn(style=self.theme.batch_progress),
            CustomTimeColumn(style=self.theme.time),
        ]

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._step_started = time.perf_counter()
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._step_started is not None:
            seconds = time.perf_counter() - self._step_started
            previous = self.seconds_per_step
            self.seconds_per_step = seconds if previous is None else (1 - _SMOOTHING) * previous + _SMOOTHING * seconds
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def on_train_end(self, trainer, pl_module) -> None:
        # Stop the live bar before the summary callback prints: its last frame comes first and the
        # summary (ending with the `mlflow ui` line) is the last thing on screen.
        self._stop_progress()
        super().on_train_end(trainer, pl_module)

    def _stop_progress(self) -> None:
        # Once only: rich prints an empty line on every stop when output is not a terminal, and
        # Lightning stops again at teardown (after the summary's last line).
        if not self._progress_stopped:
            super()._stop_progress()

    def get_metrics(self, trainer, pl_module) -> dict[str, str]:
        """What the bar shows after the step counter (replaces Lightning's logged prog_bar values)."""
        shown: dict[str, str] = {}
        last = getattr(pl_module, "last_metrics", None) or {}
        if "reward/mean" in last:
            shown["reward"] = f"{last['reward/mean']:.3f}"
        if "actor/entropy" in last:
            shown["entropy"] = f"{last['actor/entropy']:.3f}"
        accuracy = last_evaluated_accuracy(trainer)
        if accuracy is not None:
            shown["eval acc"] = f"{accuracy[0]:.3f} @{accuracy[1]}"
        if self.seconds_per_step is not None:
            shown["s/step"] = f"{self.seconds_per_step:.2f}"
        return shown


def last_evaluated_accuracy(trainer) -> tuple[float, int] | None:
    """(first ``mean_at_k`` of the first benchmark, RL step) of the latest evaluation, or None."""
    for callback in trainer.callbacks:
        history = getattr(callback, "history", None)
        if not isinstance(history, list) or not history:
            continue
        latest = history[-1].step
        for result in history:
            if result.step != latest:
                continue
            key = next((k for k in result.metrics if k.startswith("mean_at_") and "_ci_" not in k), None)
            if key is not None:
                return float(result.metrics[key]), int(latest)
    return None
