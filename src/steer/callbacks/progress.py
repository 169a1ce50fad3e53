"""Rich progress bar counted in RL steps (one rollout batch each).

Reads like ``RL step 120/250 ━━━━━━━ 120/250 0:01:10 • 0:01:20 reward: 0.52 • entropy: 0.143 •
eval acc: 0.61 @100 • s/step: 0.58``: the last step's mean reward and token entropy (from
``module.last_metrics``), the held-out accuracy of the last evaluation (first ``mean_at_k`` of the
first benchmark, and the step it was measured at) and the wall time per RL step (a moving average
that leaves evaluation time out). Lightning's epoch counter means nothing here (``max_epochs=-1``:
training length is ``algorithm.steps``), so the bar does not show it.

When output is not a terminal (a log file, CI, a pipe) there is no live bar (its one final frame
would wrap at 80 columns): one plain line at every tenth of the run and one at the end, e.g.
``RL step 120/250  reward 0.520  entropy 0.143  eval acc 0.610 @100  s/step 0.58``.

The bar runs its hooks after every other callback but the summary, which runs last: its last frame
(or line) shows the final evaluation, and the summary ends the output.
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
    def __init__(self, *args, plain_lines: int = 10, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._step_started: float | None = None
        self.seconds_per_step: float | None = None
        self.plain_lines = plain_lines
        """Plain progress lines over a run when output is not a terminal (plus the last one)."""
        self._plain: bool | None = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        from steer.callbacks.summary import SummaryCallback

        # Last but the summary, which ends the output (a new list: Lightning is iterating the
        # current one to call this very hook).
        summaries = [c for c in trainer.callbacks if isinstance(c, SummaryCallback)]
        others = [c for c in trainer.callbacks if c is not self and not isinstance(c, SummaryCallback)]
        trainer.callbacks = [*others, self, *summaries]

    def on_train_start(self, trainer, pl_module) -> None:
        from rich import get_console

        self._plain = trainer.is_global_zero and not get_console().is_terminal
        if self._plain:
            self.disable()
        super().on_train_start(trainer, pl_module)

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
        step, total = getattr(pl_module, "rl_step", batch_idx + 1), self.total_train_batches
        every = max(1, int(total) // self.plain_lines) if total and total != float("inf") else 1
        if self._plain and step % every == 0 and step != total:  # the last line comes after the final evaluation
            self.print_plain_line(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        # Stop the live bar before the summary callback prints: its last frame comes first and the
        # summary (ending with the `mlflow ui` line) is the last thing on screen.
        if self._plain:
            self.print_plain_line(trainer, pl_module)
        elif self.progress is not None and not self._progress_stopped:
            self._update_metrics(trainer, pl_module)  # the final evaluation ran after the last step's frame
            self.refresh(hard=True)
        self._stop_progress()
        super().on_train_end(trainer, pl_module)

    def plain_line(self, trainer, pl_module) -> str:
        """The bar as one line of text: step counter and :meth:`get_metrics`."""
        step = getattr(pl_module, "rl_step", None)
        total = self.total_train_batches
        counter = f"RL step {step}/{total}" if step is not None else "RL steps"
        return "  ".join([counter, *(f"{name} {value}" for name, value in self.get_metrics(trainer, pl_module).items())])

    def print_plain_line(self, trainer, pl_module) -> None:
        print(self.plain_line(trainer, pl_module), flush=True)

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
