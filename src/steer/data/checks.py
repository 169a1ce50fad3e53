"""Start-up checks of the datasets a config names (``data.train``, each benchmark's ``records``):
files exist, hold rows and the columns their loader reads. Each loader's check lives beside the
loader; :data:`RECORD_CHECKS` maps a ``_target_`` to it."""

from __future__ import annotations

from typing import Any, Callable

from omegaconf import DictConfig

from steer.data.arithmetic import check_needs_task
from steer.data.code import check_evalplus_spec, check_file_argument
from steer.data.verl_parquet import check_verl_parquet_spec
from steer.knobs import ConfigError, select


def check_data(cfg: DictConfig) -> None:
    """``data.train`` (training only): its files exist, hold rows and the columns the loader reads."""
    if select(cfg, "mode", "train") != "train":
        return
    spec = select(cfg, "data.train")
    if spec is None:
        raise ConfigError("data.train is null; allowed: a dataset spec (pick a preset: data=arithmetic, gsm8k, dapo_math)")
    check_records_spec("data.train", spec)


def check_records_spec(knob: str, spec: Any) -> None:
    """The dataset spec at ``knob`` (a ``_target_`` loader with its arguments) points at usable data.

    Each known loader has its check in :data:`RECORD_CHECKS`; other targets are not checked here.
    """
    if not isinstance(spec, DictConfig) or "_target_" not in spec:
        return
    check = RECORD_CHECKS.get(str(spec._target_))
    if check is not None:
        check(knob, spec)


RECORD_CHECKS: dict[str, Callable[[str, DictConfig], None]] = {
    "steer.data.verl_parquet.load_verl_parquet": check_verl_parquet_spec,
    "steer.data.arithmetic.ArithmeticPrompts": check_needs_task,
    "steer.data.arithmetic.heldout_records": check_needs_task,
    "steer.data.code.load_livecodebench": check_file_argument("path"),
    "steer.data.code.load_evalplus": check_evalplus_spec,
}
"""Loader ``_target_`` -> the start-up check of its arguments (files, columns, rows)."""
