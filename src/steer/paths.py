"""Path checks shared by the start-up validation (:mod:`steer.knobs`) and the command line
(:mod:`steer.cli`, which runs before torch is imported): standard library only."""

from __future__ import annotations

import os
from pathlib import Path

CHECKPOINT_DIR = "checkpoints"
"""A run folder's checkpoint folder (``<run folder>/checkpoints``)."""
LAST = "last.ckpt"
"""The periodic checkpoint a resumed run continues from."""


def unwritable_folder(knob: str, folder: str | Path) -> str | None:
    """Why ``folder`` cannot be created or written, or None. The nearest existing ancestor
    decides: it must be a writable directory. Creates nothing."""
    path = Path(folder).expanduser().absolute()
    ancestor = path
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        return (f"{knob}={str(folder)!r}: cannot create a folder there, {ancestor} is a file, not a folder; "
                "allowed: a folder path you can write to")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        return f"{knob}={str(folder)!r}: {ancestor} is not writable; allowed: a folder path you can write to"
    return None
