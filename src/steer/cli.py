"""What ``src/run.py`` does around Hydra so that bad input fails with one line and leaves nothing.

- :func:`fail_early` runs before Hydra creates the run folder: it composes the config once with the
  compose API (about a second; no torch import) and reports, as one line, what Hydra would report
  with a traceback or a misleading hint: an override of a key that does not exist (with the knob
  that was probably meant: ``rollout.n`` -> ``algorithm.n``, where Hydra suggests ``+rollout.n``),
  an unknown preset name, and a ``hydra.run.dir`` that cannot be created.
- :func:`run_task` is the Hydra task: it runs the job and turns a :class:`~steer.config.ConfigError`
  (raised by the start-up checks before any model, MLflow run or output file exists) into one
  line on stderr and exit code 2, after removing the run folder Hydra had just created when it
  holds nothing but Hydra's own files.

Multirun (``-m``) and Hydra's own flags (``--help``, ``--cfg``) skip :func:`fail_early`: Hydra
reports composition errors itself there; start-up errors are still one line and leave no folder.
"""

from __future__ import annotations

import difflib
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any, Iterable

from steer.paths import unwritable_folder

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
    """``argv`` with ``resume=<run folder or .ckpt>`` rewritten into the saved run's own overrides,
    folder and checkpoint (:func:`steer.checkpointing.resume_arguments`); a bad ``resume=`` exits
    with one line on stderr (status 2). A command line without ``resume=`` is returned unchanged."""
    if not any(_override_key(arg) == "resume" for arg in argv):
        return argv
    from steer.checkpointing import resume_arguments  # imports torch: only when resuming
    from steer.config import ConfigError

    try:
        return resume_arguments(argv)
    except ConfigError as error:
        sys.stderr.write(f"error: {error}\n")
        sys.exit(EXIT_CONFIG_ERROR)


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


def config_knobs(cfg: Any, prefix: str = "") -> Iterable[str]:
    """Every dotted key of ``cfg`` (nodes and leaves), without resolving interpolations."""
    from omegaconf import DictConfig

    if not isinstance(cfg, DictConfig):
        return
    for key in cfg.keys():
        name = f"{prefix}{key}"
        yield name
        node = cfg._get_node(key)
        if isinstance(node, DictConfig):
            yield from config_knobs(node, f"{name}.")


def suggest_knobs(key: str, knobs: list[str], limit: int = 3) -> list[str]:
    """Knobs the user probably meant by ``key``: the same last name elsewhere (``rollout.n`` ->
    ``algorithm.n``), else close spellings of the whole key (``rollout.temprature``)."""
    leaf = key.rsplit(".", 1)[-1]
    same_leaf = [knob for knob in knobs if knob.rsplit(".", 1)[-1] == leaf and knob != key]
    same_leaf.sort(key=lambda knob: (knob.count("."), knob))  # the shallowest first: algorithm.n before eval.x.y.n
    if same_leaf:
        return same_leaf[:limit]
    candidates = [knob for knob in knobs if not key.startswith(knob + ".")]  # not the key's own sections
    return difflib.get_close_matches(key, candidates, n=limit, cutoff=0.8)


def section_knobs(key: str, knobs: list[str]) -> list[str]:
    """The knobs directly under ``key``'s section (``algorithm.learning_rate`` -> algorithm's)."""
    section = key.rsplit(".", 1)[0] + "." if "." in key else ""
    return [knob[len(section):] for knob in knobs if knob.startswith(section) and "." not in knob[len(section):]]


def run_task(cfg) -> dict[str, float]:
    """The Hydra task of ``src/run.py``: :func:`steer.app.run`, with start-up errors as one line."""
    from steer.app import run
    from steer.config import ConfigError

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
