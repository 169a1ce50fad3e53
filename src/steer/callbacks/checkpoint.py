"""Periodic, atomic checkpoints every N RL steps (Lightning's ``ModelCheckpoint`` counts optimiser
steps, several per RL step, and by default writes nothing before the run ends).

The checkpoint is taken after everything else has finished with the step (Lightning runs
:class:`~lightning.pytorch.callbacks.Checkpoint` callbacks last): the step's metrics are logged and
its evaluation done, so a resumed run starts exactly where an uninterrupted one would go on.
"""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import Checkpoint

from steer.checkpointing import LAST, save_atomically

log = logging.getLogger(__name__)

KILL_AT_STEP = "STEER_TEST_SIGKILL_AT_STEP"
"""Test hook: the process SIGKILLs itself once this many RL steps are done and handled (a real kill,
for the resume test); unset in normal runs."""


class PeriodicCheckpoint(Checkpoint):
    """Writes ``dirpath/last.ckpt`` every ``every_n_steps`` RL steps and after the last one.

    Args:
        dirpath: folder of the checkpoint (the run folder's ``checkpoints/``).
        every_n_steps: RL steps between checkpoints (0: only at the end).
        keep_every_n_steps: also keep the weights of every this many RL steps as
            ``dirpath/step_<rl_step>.ckpt`` (weights only, never overwritten), e.g. to pick the
            best-evaluated step afterwards; 0 keeps none.
    """

    def __init__(self, dirpath: str, every_n_steps: int = 50, keep_every_n_steps: int = 0) -> None:
        if every_n_steps < 0:
            raise ValueError(f"callbacks.checkpoint.every_n_steps must be >= 0, got {every_n_steps}")
        if keep_every_n_steps < 0:
            raise ValueError(f"callbacks.checkpoint.keep_every_n_steps must be >= 0, got {keep_every_n_steps}")
        self.dirpath = Path(dirpath)
        self.every_n_steps = every_n_steps
        self.keep_every_n_steps = keep_every_n_steps
        self._saved_at_step = -1

    @property
    def path(self) -> Path:
        return self.dirpath / LAST

    def save(self, trainer: L.Trainer, module) -> None:
        self._saved_at_step = module.rl_step  # before saving: the checkpoint records its own step
        save_atomically(trainer, self.path)
        log.info("checkpoint after RL step %d: %s", module.rl_step, self.path)

    def state_dict(self) -> dict:
        return {"saved_at_step": self._saved_at_step}

    def load_state_dict(self, state: dict) -> None:
        # A resumed run that trains no further step does not rewrite the checkpoint it started from.
        self._saved_at_step = state["saved_at_step"]

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx: int) -> None:
        if self.keep_every_n_steps and module.rl_step % self.keep_every_n_steps == 0:
            save_atomically(trainer, self.dirpath / f"step_{module.rl_step}.ckpt", weights_only=True)
        if self.every_n_steps and module.rl_step % self.every_n_steps == 0 and module.rl_step != self._saved_at_step:
            self.save(trainer, module)
        if os.environ.get(KILL_AT_STEP) == str(module.rl_step):
            os.kill(os.getpid(), signal.SIGKILL)

    def on_train_end(self, trainer, module) -> None:
        if module.rl_step != self._saved_at_step:
            self.save(trainer, module)
