"""Precision: bfloat16 weights cannot hold fine-tuning updates (measured here with torch itself), the
start-up check refuses such configs, and every experiment (and ``model=hf``) trains float32 master
weights that move as far as a float32 reference."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from steer.knobs import ConfigError
from steer.startup import check_config
from steer.models.precision import lightning_precision, resolve_compute_dtype, smallest_kept_step
from tests.conftest import CONF, REPO, SHARED_DATA, compose

EXPERIMENTS = sorted(path.stem for path in (CONF / "experiment").glob("*.yaml"))
TRAINED = [name for name in EXPERIMENTS if compose([f"+experiment={name}"]).mode == "train"]
RUNS = {**{name: f"+experiment={name}" for name in TRAINED}, "model=hf": "model=hf data=gsm8k"}
"""Every training experiment, plus the README's ``model=hf`` line, as a user types them."""
UNCHECKED = "model=hf data=gsm8k model.dtype=bfloat16 algorithm.lr=1e-6"
"""bfloat16 parameters at lr 1e-6, trained with the precision check switched off: the negative control."""


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("weight", [1.0, 0.02, -0.3])
def test_the_smallest_kept_step_is_where_torch_stops_rounding_updates_away(dtype, weight):
    step = smallest_kept_step(str(dtype).removeprefix("torch."), weight)
    w = torch.tensor(weight, dtype=dtype)
    assert w + torch.tensor(step * 1.05, dtype=torch.float32).to(dtype) != w
    assert (w.float() + step * 0.95).to(dtype) == w  # rounded in float32 first, as an optimiser's update is


def test_adamw_on_bfloat16_weights_keeps_almost_none_of_a_fine_tuning_update():
    """The measured fact behind the check: 10 AdamW steps at lr 1e-6 on weights of size ~0.02."""
    generator = torch.Generator().manual_seed(0)
    start = torch.randn(20_000, generator=generator) * 0.02
    gradients = [torch.randn(20_000, generator=generator) for _ in range(10)]
    drift = {}
    for dtype in (torch.float32, torch.bfloat16):
        weight = torch.nn.Parameter(start.to(dtype).clone())
        optimizer = torch.optim.AdamW([weight], lr=1e-6, weight_decay=0.01)
        for gradient in gradients:
            weight.grad = gradient.to(dtype)
            optimizer.step()
        delta = (weight.detach().float() - start.to(dtype).float()).abs()
        drift[dtype] = ((delta > 0).float().mean().item(), delta.mean().item())
    assert drift[torch.float32][0] > 0.999  # a few random-sign sequences cancel exactly
    assert drift[torch.bfloat16][0] < 0.05, drift  # measured 2%
    assert drift[torch.bfloat16][1] < 0.05 * drift[torch.float32][1], drift


BASE = ["model=hf", "model.path=some/model", "data=gsm8k", "rollout.max_prompt_length=2048"]


@pytest.mark.parametrize("overrides, culprit", [
    (["model.dtype=bfloat16"], "model.dtype=bfloat16"),
    (["model.dtype=float16"], "model.dtype=float16"),
    (["trainer.precision=bf16-true"], "trainer.precision=bf16-true"),
    (["+experiment=steer_math", "rollout=hf", "model.dtype=bfloat16"], "model.dtype=bfloat16"),  # rollout=hf: no vLLM here
])
def test_start_up_refuses_parameters_that_cannot_hold_the_updates(overrides, culprit):
    with pytest.raises(ConfigError) as error:
        check_config(compose([*BASE, *overrides]))
    message = str(error.value)
    assert message.startswith(culprit) and "model.dtype=float32 model.compute_dtype=" in message
    assert "\n" not in message


def test_low_precision_weights_stay_possible_where_nothing_is_stepped_or_the_step_is_large():
    check_config(compose([*BASE, "model.dtype=bfloat16", "mode=eval"]))
    check_config(compose([*BASE, "model.dtype=bfloat16", "algorithm.lr=0.01"]))  # 0.01 >= 2^-8: every bf16 weight moves
    with pytest.raises(ConfigError, match=r"model.compute_dtype='fp8' is not valid; choose one of"):
        check_config(compose([*BASE, "model.compute_dtype=fp8"]))


def test_bfloat16_compute_is_refused_on_a_gpu_without_it(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: False)
    from steer.models.precision import check_precision

    with pytest.raises(ConfigError, match=r"^model.compute_dtype=bfloat16 is not supported by this GPU"):
        check_precision(compose([*BASE, "model.compute_dtype=bfloat16"]))
    assert resolve_compute_dtype("auto", "gpu") == "float32"
    check_precision(compose([*BASE, "model.compute_dtype=auto"]))


def test_the_trainer_precision_and_fsdp_cast_follow_model_compute_dtype():
    assert compose([]).trainer.precision == "32-true"  # the embedded default: float32 on a CPU
    assert compose(["model=hf", "model.compute_dtype=bfloat16"]).trainer.precision == "bf16-mixed"
    assert compose(["model=hf", "model.compute_dtype=float16"]).trainer.precision == "16-mixed"
    steer_math = compose(["+experiment=steer_math"])
    assert (steer_math.model.dtype, steer_math.trainer.strategy.mixed_precision, steer_math.trainer.precision) == (
        "float32", "bfloat16", "32-true")
    assert resolve_compute_dtype("auto", "cpu") == "float32"
    assert lightning_precision("auto", "gpu") == ("bf16-mixed" if torch.cuda.is_available() and torch.cuda.is_bf16_supported()
                                                  else "32-true")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Every run of :data:`RUNS` and the negative control, trained by tests/models/precision_driver.py
    in one subprocess (FSDP's process group stays out of this one)."""
    out = tmp_path_factory.mktemp("precision")
    from steer.models.tiny import build_char_tokenizer, build_tiny_policy

    tokenizer = build_char_tokenizer()  # tied embeddings: every vocabulary row gets a gradient
    build_tiny_policy(tokenizer, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, max_positions=2048).save_pretrained(out / "model")
    tokenizer.save_pretrained(out / "model")
    env = {**os.environ, "STEER_DATA_DIR": str(SHARED_DATA), "STEER_CACHE": str(out / "cache"), "WORLD_SIZE": "1"}
    result = subprocess.run([sys.executable, str(REPO / "tests/models/precision_driver.py"), str(out / "results.json"),
                             str(out / "model"), *RUNS.values(), "--unchecked", UNCHECKED],
                            env=env, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return json.loads((out / "results.json").read_text())


@pytest.mark.parametrize("name", list(RUNS))
def test_every_config_trains_float32_master_weights_that_move(trained, name):
    """At the config's own lr, precision and strategy, with only the model shrunk: >= 99% of the
    weights move, and the mean drift is within 10% of the float32 reference's."""
    configured, reference = trained[RUNS[name]]["configured"], trained[RUNS[name]]["float32"]
    assert configured["parameter_dtypes"] == ["float32"] and configured["optimizer_state_dtypes"] == ["float32"]
    assert configured["optimizer_steps"] >= 2
    assert configured["moved"] >= 0.99, configured
    assert 0.9 <= configured["mean_abs_drift"] / reference["mean_abs_drift"] <= 1.1, (configured, reference)
    if "steer_" in name:
        assert configured["compute_dtype"] == "bfloat16"  # the paper's runs compute in bf16 ...
        assert configured["mean_abs_drift"] != reference["mean_abs_drift"]  # ... and it did (the reference is float32)


def test_the_measurement_sees_bfloat16_parameters_lose_their_updates(trained):
    """The negative control: the same measurement on bfloat16 parameters (check switched off)."""
    unchecked, reference = trained[UNCHECKED]["configured"], trained[UNCHECKED]["float32"]
    assert unchecked["parameter_dtypes"] == ["bfloat16"]
    assert unchecked["moved"] < 0.1, unchecked
    assert unchecked["mean_abs_drift"] < 0.1 * reference["mean_abs_drift"], (unchecked, reference)


def test_cpu_native_arithmetic_follows_onednn_own_probe():
    from steer.models.precision import cpu_has_native

    assert cpu_has_native("float32") and cpu_has_native("float64")
    assert cpu_has_native("bfloat16") == bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    assert cpu_has_native("float16") == bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())


@pytest.mark.parametrize("native", [False, True])
def test_low_precision_on_a_cpu_without_native_arithmetic_is_warned_about(monkeypatch, caplog, native):
    import steer.models.precision as precision

    monkeypatch.setattr(precision, "cpu_has_native", lambda dtype: native)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    overrides = ["model.compute_dtype=bfloat16", "rollout.engine.dtype=float16"]
    with caplog.at_level("WARNING", logger="steer.models.precision"):
        precision.check_precision(compose(overrides))
        precision.check_precision(compose(["model.compute_dtype=float32", "rollout.engine.dtype=auto"]))
    warned = [record.getMessage() for record in caplog.records]
    if native:
        assert warned == []
    else:
        assert len(warned) == 2
        assert warned[0].startswith("model.compute_dtype=bfloat16 on a CPU without native bfloat16 arithmetic")
        assert warned[1].startswith("rollout.engine.dtype=float16 on a CPU without native float16 arithmetic")
    caplog.clear()
    # A run that will use a GPU is not warned about (its arithmetic is the GPU's).
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    with caplog.at_level("WARNING", logger="steer.models.precision"):
        precision.check_precision(compose(overrides))
    assert caplog.records == []
