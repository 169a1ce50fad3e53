"""Every intervention preset trains a few steps on the embedded default (about 1-2 s each)."""

from __future__ import annotations

import math

import pytest

from steer.app import train
from tests.conftest import CONF, TINY_RUN, compose

PRESETS = sorted(path.stem for path in (CONF / "intervention").glob("*.yaml"))


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_runs_on_the_embedded_default(preset, tmp_path):
    cfg = compose([*TINY_RUN, f"intervention={preset}", "logger=none", "callbacks.checkpoint=null"], tmp_path)
    metrics = train(cfg)
    assert metrics["batch/optimizer_steps"] == 2
    assert all(math.isfinite(value) for value in metrics.values()), preset
    if preset != "grpo":
        assert any(key.startswith("intervention/") and key != "intervention/ratio_inert" for key in metrics) or preset.startswith(
            ("clip_higher", "grpo_extreme")
        ), f"{preset} logged no intervention metric"
