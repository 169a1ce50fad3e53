"""Precision: the dtype the optimiser steps (``model.dtype``), the dtype the arithmetic runs in
(``model.compute_dtype``), and the start-up check that no configuration trains parameters that
cannot hold their own updates.

Why two knobs. AdamW moves every weight by about ``lr`` per step (its update is ``lr * m / sqrt(v)``,
of order ``lr`` whatever the gradient's scale). A bfloat16 number keeps 8 significant bits: the
spacing between neighbours of ``w`` is about ``|w| * 2^-7``, so a step below about ``|w| * 2^-8``
(1/256 of the weight) rounds back to ``w``. At the STEER paper's lr 1e-6, a weight of typical size
0.02 needs a step of 6.1e-5 to move, and the RMSNorm gains, which start at 1.0, need 3.9e-3:
measured, 10 AdamW steps on bfloat16 weights of size ~0.02 moved 2% of them. So training keeps float32 *master* weights
(``model.dtype: float32``) and runs the forward and backward in bfloat16 (``model.compute_dtype``):

- one process or DDP: Lightning's ``bf16-mixed`` precision (torch autocast);
- FSDP (``trainer=fsdp``): FSDP2's ``MixedPrecisionPolicy`` gathers bfloat16 copies of the float32
  shards for compute and reduces gradients in float32 (:mod:`steer.models.sharding`).

Low-precision weights stay possible where nothing is stepped: ``mode=eval`` and the rollout engine
(``rollout.engine.dtype`` of vLLM).
"""

from __future__ import annotations

import logging
import math

from steer.knobs import ConfigError, may_use_gpu, one_of, select

log = logging.getLogger(__name__)

COMPUTE_DTYPES = ("auto", "float32", "bfloat16", "float16")
"""``model.compute_dtype`` values; ``auto`` is bfloat16 on a GPU that supports it, else float32."""

SIGNIFICANT_BITS = {"float32": 24, "bfloat16": 8, "float16": 11, "float64": 53}
"""Significand precision of each dtype (the implicit leading bit included)."""

LARGEST_TYPICAL_WEIGHT = 1.0
"""The largest weights a fine-tuned decoder holds in bulk: RMSNorm/LayerNorm gains start at 1.0."""

LIGHTNING_PRECISION = {"float32": "32-true", "bfloat16": "bf16-mixed", "float16": "16-mixed"}
"""``model.compute_dtype`` -> Lightning's ``trainer.precision`` (float32 parameters in every case)."""

TRUE_PRECISION_DTYPES = {"bf16-true": "bfloat16", "16-true": "float16", "64-true": "float64"}
"""Lightning precisions that convert the parameters themselves to a dtype (the optimiser then steps it)."""


def resolve_compute_dtype(setting: str, accelerator: str | None = "auto") -> str:
    """``model.compute_dtype`` as a dtype name: ``auto`` is bfloat16 when the run will use a CUDA GPU
    that supports it (``trainer.accelerator`` gpu/cuda/auto), float32 otherwise (CPUs without native
    bfloat16 arithmetic run it slower than float32)."""
    if setting != "auto":
        return setting
    if not may_use_gpu(accelerator):
        return "float32"
    import torch

    return "bfloat16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "float32"


def lightning_precision(compute_dtype: str, accelerator: str | None = "auto") -> str:
    """What ``trainer.precision`` resolves to in ``conf/trainer/default.yaml`` (the ``lightning_precision``
    resolver): ``32-true``, ``bf16-mixed`` or ``16-mixed``. An unknown name passes through, so that
    :func:`check_precision` reports it with the knob's name."""
    return LIGHTNING_PRECISION.get(resolve_compute_dtype(compute_dtype, accelerator), str(compute_dtype))


def smallest_kept_step(dtype: str, weight: float = LARGEST_TYPICAL_WEIGHT) -> float:
    """The smallest update of ``weight`` that a ``dtype`` parameter does not round away: half the
    spacing of its neighbours, ``2^(exponent of w) * 2^-(significant bits)``, between 1/512 and 1/256
    of ``|w|`` for bfloat16."""
    return 2.0 ** (math.floor(math.log2(abs(weight))) - SIGNIFICANT_BITS[dtype])


def stepped_dtype(model_dtype: str, trainer_precision: str) -> str:
    """The dtype of the parameters the optimiser steps: ``model.dtype``, unless Lightning's
    ``trainer.precision`` converts the module itself (``bf16-true``, ``16-true``, ...)."""
    return TRUE_PRECISION_DTYPES.get(str(trainer_precision), model_dtype)


CPU_NATIVE_PROBES = {"bfloat16": "_is_mkldnn_bf16_supported", "float16": "_is_mkldnn_fp16_supported"}
"""oneDNN's own test of whether this CPU has native arithmetic for a low-precision dtype (AVX-512
BF16 / AMX for bfloat16, AVX-512 FP16 / AMX-FP16 for float16)."""


def cpu_has_native(dtype: str) -> bool:
    """Whether this CPU multiplies ``dtype`` matrices natively (float32 and float64: always). Without
    it torch falls back to generic loops: on a 2-core AVX2 CPU a bf16 ``[2750, 192] x [192, 576]``
    product took 76 ms against 10 ms in float32, and the TRL benchmark's 2.38M-parameter RL step
    (``model.compute_dtype=bfloat16``, ``rollout.engine.dtype=bfloat16``) 43 s against 1.2 s."""
    import torch

    probe = CPU_NATIVE_PROBES.get(dtype)
    if probe is None:
        return True
    if not torch.backends.mkldnn.is_available():
        return False
    test = getattr(torch.ops.mkldnn, probe, None)
    return bool(test()) if test is not None else False


def warn_slow_cpu_arithmetic(cfg) -> None:
    """Warn (once, at start-up) where a run that stays on the CPU computes in a low-precision dtype
    this CPU lacks native arithmetic for (:func:`cpu_has_native`): ``model.compute_dtype`` and the
    ``hf`` rollout engine's ``rollout.engine.dtype``. A warning, not a refusal: the numbers are the
    same, only slower, and a small bf16 run on a laptop is a legitimate numerics check."""
    import torch

    if may_use_gpu(select(cfg, "trainer.accelerator", "auto")) and torch.cuda.is_available():
        return
    knobs = {"model.compute_dtype": select(cfg, "model.compute_dtype", "float32")}
    if str(select(cfg, "rollout.engine._target_", "")).endswith("HFRolloutEngine"):
        knobs["rollout.engine.dtype"] = select(cfg, "rollout.engine.dtype", "auto")
    for knob, value in knobs.items():
        if value not in CPU_NATIVE_PROBES or cpu_has_native(value):
            continue
        log.warning("%s=%s on a CPU without native %s arithmetic: its matrix products run in torch's generic "
                    "fallback, several times slower than float32 (a 2-core AVX2 CPU: 7x per product, 36x per RL "
                    "step); float32 gives the same results to round-off, faster", knob, value, value)


def check_precision(cfg) -> None:
    """Start-up check (training only): refuse parameters whose dtype cannot represent updates of
    ``algorithm.lr``, i.e. an AdamW step below :func:`smallest_kept_step` of the largest weights
    (the norm gains at 1.0). For bfloat16 that is any lr below 3.9e-3 and for float16 below 4.9e-4:
    every fine-tuning learning rate. Also validates ``model.compute_dtype``, and warns where a CPU
    run computes in a dtype the CPU is slow at (:func:`warn_slow_cpu_arithmetic`)."""
    compute = select(cfg, "model.compute_dtype", "float32")
    one_of("model.compute_dtype", compute, COMPUTE_DTYPES)
    warn_slow_cpu_arithmetic(cfg)
    if compute == "bfloat16" and may_use_gpu(select(cfg, "trainer.accelerator", "auto")):
        import torch

        if torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
            raise ConfigError("model.compute_dtype=bfloat16 is not supported by this GPU; allowed here: float16, "
                              "float32, auto (float32 on this GPU)")
    if select(cfg, "mode", "train") != "train":
        return
    model_dtype = select(cfg, "model.dtype", "float32")
    precision = select(cfg, "trainer.precision", "32-true")
    dtype = stepped_dtype(model_dtype, precision)
    lr = select(cfg, "algorithm.lr")
    if dtype not in SIGNIFICANT_BITS or not isinstance(lr, (int, float)) or not math.isfinite(lr):
        return  # an unknown dtype or a bad lr: check_model / check_algorithm name it
    needed = smallest_kept_step(dtype)
    if lr >= needed:
        return
    cause = (f"model.dtype={model_dtype}" if dtype == model_dtype
             else f"trainer.precision={precision} (it converts the parameters to {dtype})")
    typical = smallest_kept_step(dtype, 0.02)
    raise ConfigError(
        f"{cause}: the optimiser would step {dtype} parameters, which cannot hold updates of algorithm.lr={lr:g} "
        f"({dtype} keeps {SIGNIFICANT_BITS[dtype]} significant bits, so an update below about 2^-{SIGNIFICANT_BITS[dtype]} "
        f"of a weight rounds away: {typical:.1e} for a weight of 0.02, {needed:.1e} for the norm gains at 1.0); "
        f"fix: model.dtype=float32 model.compute_dtype={dtype} "
        "(float32 master weights, low-precision compute)"
        + (" and drop the trainer.precision override" if dtype != model_dtype else "")
    )
