"""The bottom layer of every start-up check: :class:`ConfigError` and the helpers that read a knob
and refuse a bad value with one line naming it (``algorithm.lr=-1 is not valid; allowed: ...``).

Imports nothing from this package but :mod:`steer.paths`, so any module may use it: each check
lives next to the code that knows the thing it checks (data files in :mod:`steer.data.checks`,
model paths in :mod:`steer.models.loader`, ...), and :mod:`steer.startup` runs them in order.
"""

from __future__ import annotations

import difflib
import math
from pathlib import Path
from typing import Any, Iterable

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from steer.paths import unwritable_folder


class ConfigError(ValueError):
    """A bad configuration value, raised at start-up with the knob's full name."""


def one_of(name: str, value: Any, allowed) -> None:
    if value not in allowed:
        raise ConfigError(f"{name}={value!r} is not valid; choose one of {sorted(allowed)}")


def number(name: str, value: Any, low: float | None = None, high: float | None = None, *,
           low_open: bool = False, integer: bool = False, allowed: str | None = None) -> None:
    """``value`` must be a finite (integer) number in ``[low, high]`` (``(low, high]`` if ``low_open``)."""
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if integer:
        is_number = isinstance(value, int) and not isinstance(value, bool)
    too_low = is_number and low is not None and (value <= low if low_open else value < low)
    too_high = is_number and high is not None and value > high
    if not is_number or not math.isfinite(value) or too_low or too_high:
        if allowed is None:
            kind = "an integer" if integer else "a finite number"
            bounds = []
            if low is not None:
                bounds.append(f"{'>' if low_open else '>='} {low if isinstance(low, int) else f'{low:g}'}")
            if high is not None:
                bounds.append(f"<= {high if isinstance(high, int) else f'{high:g}'}")
            allowed = kind + (" " + " and ".join(bounds) if bounds else "")
        raise ConfigError(f"{name}={value!r} is not valid; allowed: {allowed}")


def select(cfg: DictConfig, key: str, default: Any = None) -> Any:
    """``cfg[key]`` resolved (dotted key), or ``default`` when absent; an unresolvable or missing
    mandatory value becomes a ConfigError naming the key."""
    try:
        return OmegaConf.select(cfg, key, default=default, throw_on_missing=True)
    except OmegaConfBaseException as error:
        if "Missing mandatory value" in str(error):
            raise ConfigError(f"{key} is required and has no value (it is '???' in the preset); set {key}=...") from None
        raise ConfigError(f"{key}: {error.msg if hasattr(error, 'msg') else error}") from None


def writable_folder(name: str, folder: str | Path) -> None:
    message = unwritable_folder(name, folder)
    if message:
        raise ConfigError(message)


def preset_choice(group: str) -> str | None:
    """The preset chosen for a config group (``data=gsm8k`` -> "gsm8k"), when run through Hydra."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return HydraConfig.get().runtime.choices.get(group)
    except Exception:  # composed without Hydra's runtime (tests)
        return None


GPU_ACCELERATORS = ("auto", "gpu", "cuda")
"""``trainer.accelerator`` values under which a run uses a CUDA GPU when one is present."""


def may_use_gpu(accelerator: Any) -> bool:
    """Whether ``trainer.accelerator=<accelerator>`` lets the run use a CUDA GPU (when one is present)."""
    return str(accelerator) in GPU_ACCELERATORS


def divisors(count: int, shown: int = 12) -> str:
    """The divisors of ``count`` as an "allowed:" list (the first ``shown``)."""
    small = [d for d in range(1, math.isqrt(count) + 1) if count % d == 0]
    found = sorted({*small, *(count // d for d in small)})
    return ", ".join(map(str, found[:shown])) + (", ..." if len(found) > shown else "")


def config_knobs(cfg: Any, prefix: str = "") -> Iterable[str]:
    """Every dotted key of ``cfg`` (nodes and leaves), without resolving interpolations."""
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
