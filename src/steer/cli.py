"""What ``src/run.py`` does around Hydra so that bad input fails with one line and leaves nothing.

- :func:`fail_early` runs before Hydra creates the run folder: it composes the config once with the
  compose API (about a second; no torch import) and reports, as one line, what Hydra would report
  with a traceback or a misleading hint: an override of a key that does not exist (with the knob
  that was probably meant: ``rollout.n`` -> ``algorithm.n``, where Hydra suggests ``+rollout.n``),
  an unknown preset name, and a ``hydra.run.dir`` that cannot be created.
- :func:`resume_or_exit` turns ``resume=<run folder or .ckpt>`` into the saved run's own overrides,
  its run folder and the checkpoint (exact resume; docs/configuration.md).
- :func:`run_task` is the Hydra task: it runs the job and turns a :class:`~steer.knobs.ConfigError`
  (raised by the start-up checks before any model, MLflow run or output file exists) into one
  line on stderr and exit code 2, after removing the run folder Hydra had just created when it
  holds nothing but Hydra's own files.

Multirun (``-m``) and Hydra's own flags (``--help``, ``--cfg``) skip :func:`fail_early`: Hydra
reports composition errors itself there; start-up errors are still one line and leave no folder.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import sys
from pathlib import Path

import yaml

from steer.knobs import ConfigError, config_knobs, suggest_knobs
from steer.paths import CHECKPOINT_DIR, LAST, unwritable_folder

log = logging.getLogger(__name__)

EXIT_CONFIG_ERROR = 2
"""Exit status of a run refused at start-up (argparse's status for a usage error)."""


def fail_early(argv: list[str], config_dir: str, config_name: str = "config") -> None:
    """Exit with one line on stderr (status 2) if the overrides ``argv`` cannot compose or the run
    folder cannot be created; otherwise return and let Hydra run. Creates nothing."""
    message = early_problem(argv, config_dir, config_name)
    if message:
        sys.stderr.write(f"error: {message}\n")
        sys.exit(EXIT_CONFIG_ERROR)


def resume_or_exit(argv: list[str]) -> list[str]:
    """``argv`` with ``resume=<run folder or .ckpt>`` rewritten by :func:`resume_arguments`; a bad
    ``resume=`` exits with one line on stderr (status 2)."""
    if not any(_override_key(arg) == "resume" for arg in argv):
        return argv
    try:
        return resume_arguments(argv)
    except ConfigError as error:
        sys.stderr.write(f"error: {error}\n")
        sys.exit(EXIT_CONFIG_ERROR)


def resolve_resume(target: str | Path) -> tuple[Path, Path]:
    """``(run folder, checkpoint)`` of ``resume=<run folder or .ckpt file>``.

    A folder means its ``checkpoints/last.ckpt``; a file's run folder is the nearest folder above it
    holding Hydra's ``.hydra/`` record.
    """
    target = Path(target).expanduser().resolve()
    if target.is_dir():
        folder, checkpoint = target, target / CHECKPOINT_DIR / LAST
    elif target.is_file():
        checkpoint = target
        folder = next((parent for parent in target.parents if (parent / ".hydra").is_dir()), target.parent)
    else:
        raise ConfigError(f"resume={target}: no such run folder or checkpoint file")
    if not checkpoint.is_file():
        raise ConfigError(f"resume={target}: no checkpoint at {checkpoint} (the run saved none yet? "
                          "see callbacks.checkpoint.every_n_steps)")
    return folder, checkpoint


def resume_arguments(arguments: list[str]) -> list[str]:
    """Rewrite the command line ``[..., resume=X, ...]`` into the saved run's own overrides, its run
    folder, and the checkpoint; overrides given next to ``resume=`` replace the saved ones of the
    same key (they are logged, since they can make the resumed run differ from an uninterrupted one).
    A command line without ``resume=`` (or with ``resume=null``) is returned unchanged."""
    resume = [a for a in arguments if _override_key(a) == "resume"]
    if not resume or resume[-1].split("=", 1)[1] in ("", "null", "None"):
        return arguments
    folder, checkpoint = resolve_resume(resume[-1].split("=", 1)[1])
    # Lightning starts the other ranks of a multi-process run with this command line plus
    # hydra.run.dir=<the run folder> (and hydra.job.name): that folder is the one resumed.
    run_dirs = [Path(a.split("=", 1)[1].strip("\"'")).resolve() for a in arguments if a.startswith("hydra.run.dir=")]
    if any(a in ("-m", "--multirun") for a in arguments) or any(d != folder for d in run_dirs):
        raise ConfigError("resume= continues one run in its own folder: drop -m/--multirun and hydra.run.dir")
    arguments = [a for a in arguments if not a.startswith("hydra.run.dir=")]
    saved_file = folder / ".hydra" / "overrides.yaml"
    if not saved_file.is_file():
        raise ConfigError(f"resume: {saved_file} not found; a run started by src/run.py has it "
                          "(for a checkpoint alone, pass ckpt_path to Trainer.fit yourself)")
    saved = [o for o in yaml.safe_load(saved_file.read_text()) or [] if _override_key(o) != "resume"]
    flags = [a for a in arguments if a.startswith("-")]
    extra = [a for a in arguments if not a.startswith("-") and _override_key(a) != "resume"]
    replaced = {_override_key(o) for o in extra}
    kept = [o for o in saved if _override_key(o) not in replaced]
    changed = [o for o in extra if o not in saved and not o.startswith("hydra.")]
    if changed:
        log.warning("resume: overrides %s change the saved run's config; the continuation is exact only "
                    "for knobs that do not affect training (e.g. a larger algorithm.steps)", changed)
    return [*flags, *kept, *extra, f"hydra.run.dir={folder}", f"resume={checkpoint}"]


def early_problem(argv: list[str], config_dir: str, config_name: str = "config") -> str | None:
    """The message :func:`fail_early` would print, or None."""
    if any(arg.startswith("-") for arg in argv):
        return None  # multirun or Hydra's own flags: Hydra handles them
    from hydra.errors import ConfigCompositionException

    try:
        cfg = _compose(config_dir, config_name, argv, with_hydra=True)
    except ConfigCompositionException as error:
        return explain_composition_error(str(error), argv, config_dir, config_name)
    except Exception:  # anything else is Hydra's to report, as it would without this check
        return None
    try:
        run_dir = str(cfg.hydra.run.dir)
    except Exception:
        return None
    return unwritable_folder("hydra.run.dir", run_dir)


def _compose(config_dir: str, config_name: str, overrides: list[str], with_hydra: bool = False):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=config_dir, version_base="1.3"):
        return compose(config_name=config_name, overrides=overrides, return_hydra_config=with_hydra)


def explain_composition_error(message: str, argv: list[str], config_dir: str, config_name: str = "config") -> str | None:
    """One line for Hydra's composition error ``message``, or None to let Hydra print its own."""
    missing_key = re.search(r"Could not override '([^']+)'", message)
    if missing_key and "To append to your config" in message:
        key = missing_key.group(1)
        others = [arg for arg in argv if not _override_key(arg) == key]
        try:
            knobs = list(config_knobs(_compose(config_dir, config_name, others)))
        except Exception:
            knobs = []
        guesses = suggest_knobs(key, knobs)
        if guesses:
            hint = f"did you mean {' or '.join(guesses)}?"
        elif section_knobs(key, knobs):
            hint = f"allowed in {key.rsplit('.', 1)[0] if '.' in key else 'the root'}: {', '.join(section_knobs(key, knobs))}"
        else:
            hint = "see docs/configuration.md for the knobs"
        return (f"'{key}' is not a knob of this config; {hint} "
                f"(Hydra's '+{key}=...' would add a new key that nothing reads)")
    missing_preset = re.search(r"Could not find '([\w-]+)/([^']+)'", message)
    if missing_preset:
        group, name = missing_preset.groups()
        presets = sorted(path.stem for path in (Path(config_dir) / group).glob("*.yaml"))
        if presets:
            return f"{group}={name} is not a preset of {group}; allowed: {', '.join(presets)}"
    return None


def _override_key(arg: str) -> str:
    return arg.split("=", 1)[0].lstrip("+~")


def section_knobs(key: str, knobs: list[str]) -> list[str]:
    """The knobs directly under ``key``'s section (``algorithm.learning_rate`` -> algorithm's)."""
    section = key.rsplit(".", 1)[0] + "." if "." in key else ""
    return [knob[len(section):] for knob in knobs if knob.startswith(section) and "." not in knob[len(section):]]


# What dependencies print in every run that says nothing about this run: kept out of the console
# (Lightning's lines go to run.log instead). Real warnings still show.
LIGHTNING_ROUTINE = ("GPU available:", "TPU available:", "HPU available:", "💡 Tip:", "LOCAL_RANK:",
                     "`Trainer.fit` stopped:")
"""Prefixes of Lightning's INFO lines written to run.log only (device inventory, advertising, stop reason)."""
DEPENDENCY_WARNINGS = (r"`isinstance\(treespec, LeafSpec\)` is deprecated",)
"""Messages of FutureWarnings raised inside dependencies (Lightning calling torch's deprecated
pytree API) that this project cannot act on."""


class _ToRunLogOnly(logging.Filter):
    """Passes a routine INFO record of Lightning to the file handlers of the root logger (Hydra's
    run.log) and keeps it off the console; anything else (warnings included) passes unchanged."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno > logging.INFO or not str(record.getMessage()).startswith(LIGHTNING_ROUTINE):
            return True
        for handler in logging.getLogger().handlers:
            if isinstance(handler, logging.FileHandler) and record.levelno >= handler.level:
                handler.handle(record)
        return False


def quiet_dependencies() -> None:
    """Keep the console to this run's progress and summary (idempotent): Lightning's routine lines
    to run.log, transformers' "Writing model shards" bars off (local saves and loads; Hub download
    bars stay), MLflow's store-creation INFO lines and one dependency deprecation off."""
    import warnings

    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, _ToRunLogOnly) for f in rank_zero.filters):
        rank_zero.addFilter(_ToRunLogOnly())
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
    for message in DEPENDENCY_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=FutureWarning)
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()


def run_task(cfg) -> dict[str, float]:
    """The Hydra task of ``src/run.py``: :func:`steer.app.run`, with start-up errors as one line."""
    from steer.app import run
    quiet_dependencies()
    try:
        return run(cfg)
    except ConfigError as error:
        remove_unused_run_folder()
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise  # a developer asking for the whole traceback, as Hydra's own errors allow
        sys.stderr.write(f"error: {error}\n")
        sys.exit(EXIT_CONFIG_ERROR)


def remove_unused_run_folder() -> None:
    """Remove the run folder Hydra created for this job if it holds nothing but Hydra's own files
    (``.hydra/`` and the job's log), then the folders above it that Hydra created and that are now
    empty (``outputs/<date>/``; a sweep folder holding only ``multirun.yaml``), never the
    working directory or anything outside it."""
    from hydra.core.hydra_config import HydraConfig

    try:
        hydra = HydraConfig.get()
    except ValueError:
        return
    run_dir = Path(hydra.runtime.output_dir).absolute()
    own = {name for name in (hydra.output_subdir, f"{hydra.job.name}.log") if name}
    if not run_dir.is_dir() or any(child.name not in own for child in run_dir.iterdir()):
        return
    shutil.rmtree(run_dir, ignore_errors=True)
    cwd = Path.cwd().absolute()
    top = run_dir
    sweep_dir = Path(hydra.sweep.dir).absolute() if hydra.mode is not None and hydra.mode.name == "MULTIRUN" else None
    if sweep_dir is not None and sweep_dir != cwd and sweep_dir.is_dir():
        if [child.name for child in sweep_dir.iterdir()] == ["multirun.yaml"]:
            shutil.rmtree(sweep_dir, ignore_errors=True)
            top = sweep_dir
    parent = top.parent
    while parent != cwd and cwd in parent.parents and parent.is_dir() and not any(parent.iterdir()):
        parent.rmdir()
        parent = parent.parent
