"""The printed end-of-run summary: accuracy and entropy at the start and end, and where the runs are."""

from __future__ import annotations

import lightning as L
from rich.console import Console
from rich.table import Table

from steer.tracking import ui_command, ui_url


class SummaryCallback(L.Callback):
    def __init__(self, tracking_uri: str | None = None, warmup_info: dict | None = None) -> None:
        self.tracking_uri = tracking_uri
        self.warmup_info = warmup_info
        self.first_metrics: dict[str, float] | None = None

    def state_dict(self) -> dict:
        return {"first_metrics": self.first_metrics}

    def load_state_dict(self, state: dict) -> None:
        self.first_metrics = state["first_metrics"]

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if self.first_metrics is None and getattr(module, "last_metrics", None):
            self.first_metrics = dict(module.last_metrics)

    def on_train_end(self, trainer, module) -> None:
        if not trainer.is_global_zero:  # one summary per run (metrics are already reduced over ranks)
            return
        console = Console()
        table = Table(title=f"Run summary after {module.rl_step} RL steps")
        table.add_column("quantity")
        table.add_column("start", justify="right")
        table.add_column("end", justify="right")
        evaluation = next((c for c in trainer.callbacks if hasattr(c, "history") and c.history), None)
        if evaluation is not None:
            for name in dict.fromkeys(r.benchmark for r in evaluation.history):
                results = [r for r in evaluation.history if r.benchmark == name]
                for key in results[0].metrics:
                    if (key.startswith("mean_at") and "_ci_" not in key) or key == "entropy":
                        table.add_row(f"held-out {name} {key}", f"{results[0].metrics[key]:.3f}", f"{results[-1].metrics[key]:.3f}")
        last = getattr(module, "last_metrics", None)
        if self.first_metrics and last:
            for key in ("reward/accuracy", "actor/entropy", "response/length_mean"):
                if key in self.first_metrics and key in last:
                    table.add_row(f"train {key}", f"{self.first_metrics[key]:.3f}", f"{last[key]:.3f}")
        console.print(table)
        if self.warmup_info:
            console.print(f"warm-up: {self.warmup_info['steps']} supervised steps, sampled held-out accuracy "
                          f"{self.warmup_info['accuracy']:.3f}")
        if self.tracking_uri:
            # Plain print, not rich: rich wraps at 80 columns when stdout is not a terminal, and the
            # command must survive copy-paste from a log file as one line.
            console.file.flush()
            print(f"MLflow store: {self.tracking_uri}", flush=True)
            print("open it with:", flush=True)
            print(ui_command(self.tracking_uri), flush=True)
            print(f"then the runs, in the model-training view: {ui_url(self.tracking_uri)}", flush=True)
