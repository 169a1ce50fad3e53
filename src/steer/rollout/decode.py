"""Our own sampling loop for a causal LM: one prefill, then one single-token forward per step.

Why not ``model.generate``: on the tiny policies most of ``generate``'s time is per-token framework
work (mask construction, cache objects, output dataclasses, logits processors), not arithmetic.
This loop keeps the per-token work to the model's own operators:

- **Qwen2 / Llama-family decoders** (the embedded tiny policy, SmolLM2) run through
  :class:`FunctionalDecoder`: the layers' own weights applied by hand (norms as one fused
  ``F.rms_norm`` in float32, the model's rotary embedding) on a preallocated key/value buffer
  ``[B, KV heads, P + R, head dim]`` per layer (``scaled_dot_product_attention`` for the prefill,
  a plain matmul pair for each single-query step), so a step allocates no cache and builds no
  mask object. Each layer's query, key and value projections are joined into one matrix product,
  its MLP's gate and up projections into another, once per call and in the decoding dtype
  (``rollout.engine.dtype``; on an AVX-512 BF16 CPU the bf16 products at a 2.38M policy's shapes
  are 1.8x faster than float32 ones and the whole decoding ~20%). The key/value buffers are held
  in the decoding dtype too (half the bytes in bf16: the single-query attention reads every
  buffer at every step, and that read is what bounds it on a CPU) and widened to the
  parameters' dtype for attention; the residual stream and the norms stay in it. On a CPU the
  larger weights are handed to oneDNN prepacked (:data:`PREPACK_MIN_WEIGHTS`). Tests check
  it against the model's own teacher-forced forward. When the rows are
  runs of n copies of one prompt (n samples per prompt, as every engine call makes them), the
  prefill runs once per prompt and its keys and values are copied to the n rows.
- **Any other causal LM** (and sharded FSDP2 policies, whose parameters only the layers' own
  forward gathers) goes through :func:`hf_forward_steps`: the model's ``forward`` with its own
  ``DynamicCache`` and a 2-D attention mask (slower, but architecture-agnostic).

Sampling is plain: temperature, then an optional nucleus (top-p) filter, then one draw from the
softmax by the Gumbel-max trick (:func:`gumbel_max`; the global torch RNG, seeded by the
trainer, drives it), and the log-prob of the drawn token is read from the same log-softmax, i.e. under the exact
distribution that was sampled. Positions follow the teacher-forced convention of
:func:`steer.algo.logprobs.response_logprobs_and_entropy`: ``cumsum(mask) - 1`` over left-padded
prompts, then one more per generated token.
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Iterator, NamedTuple

import torch
import torch.nn.functional as F

from steer.models.functional import rotate, supports_functional
from steer.models.precision import cpu_has_native

COMPACT_FRACTION = 8
"""The decoding loop drops finished rows once they are at least 1/8 of the rows it runs (each drop
copies the key/value buffers of the rows that go on; finished rows in between cost at most 1/8 of a
step); 0 never drops them (``bench_finished_rows.py`` compares)."""


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus filter (Holtzman et al., 2020): keep the smallest set of most likely tokens whose
    probability reaches ``top_p`` (always at least one); the rest get ``-inf``.

    ``logits``: ``[B, V]`` (already divided by the temperature). Returns a new ``[B, V]`` tensor.
    """
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = sorted_logits.softmax(-1)
    mass_before = probs.cumsum(-1) - probs  # probability of the strictly more likely tokens
    drop_sorted = mass_before >= top_p
    drop_sorted[:, 0] = False
    drop = torch.zeros_like(drop_sorted).scatter_(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def sampling_logprobs(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """``[B, V]`` log-probs of the distribution the sampler draws from (after temperature, top-p)."""
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    if top_p < 1.0:
        logits = top_p_filter(logits, top_p)
    return torch.log_softmax(logits, dim=-1)


def gumbel_max(logprobs: torch.Tensor) -> torch.Tensor:
    """One draw per row from ``softmax(logprobs)`` (``[B, V]`` -> ``[B]``) by the Gumbel-max trick:
    ``argmax(logprobs + G)`` with ``G = -log(-log U)``, ``U ~ Uniform[0, 1)`` from the global torch
    RNG. Exact, and about 4x cheaper here than ``torch.multinomial`` (whose exponential draws are
    slow on CPU). ``-inf`` entries (filtered by top-p) are never drawn."""
    gumbel = torch.rand_like(logprobs).log_().neg_().log_().neg_()
    return (logprobs + gumbel).argmax(-1)


def _rms_norm(norm: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    # One fused operator instead of the module's five; identical in float32 (the module computes in
    # float32 and casts back before the weight, so other dtypes keep the module).
    if x.dtype == torch.float32 and norm.weight.dtype == torch.float32:
        return F.rms_norm(x, norm.weight.shape, norm.weight, norm.variance_epsilon)
    return norm(x)


PREPACK_MIN_WEIGHTS = 100_000
"""On a CPU the decoder hands each projection weight of at least this many elements to oneDNN once
per rollout call, reordered into oneDNN's blocked layout (``torch.ops.mkldnn``'s prepacked linear,
the kernel Inductor uses on CPUs), so that no step's matrix product repacks it. A prepacked product
costs ~10 us more to call, which small weights do not earn back: decoding the TRL benchmark's fixed
shape on 2 cores (``bench_sampling_modes.py`` and interleaved A/B runs), a 2.38M policy (weights
of 110K-295K elements) in float32 15-17% faster, in bf16 0-12%; a 0.31M one (at most 74K) 3-12%
slower with its largest weight packed."""


def _joined(linears: list[torch.nn.Linear], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One weight (and bias, zeros where a projection has none) in ``dtype`` for projections of the
    same input. A single projection already in ``dtype`` is used as it is (no copy)."""

    def join(tensors: list[torch.Tensor]) -> torch.Tensor:
        return tensors[0].to(dtype) if len(tensors) == 1 else torch.cat([t.to(dtype) for t in tensors])

    weight = join([linear.weight.detach() for linear in linears])
    if all(linear.bias is None for linear in linears):
        return weight, None
    return weight, join([linear.bias.detach() if linear.bias is not None else linear.weight.new_zeros(linear.out_features)
                         for linear in linears])


def prepacks_dtype(dtype: torch.dtype) -> bool:
    """Whether this CPU's decoder prepacks weights of ``dtype`` (the size rule aside): float32 where
    torch has oneDNN's prepacked linear, bfloat16 only where the CPU also has native bf16
    arithmetic (:func:`steer.models.precision.cpu_has_native`), other dtypes never."""
    if not torch.backends.mkldnn.is_available():
        return False
    if not all(hasattr(torch.ops.mkldnn, op) for op in ("_reorder_linear_weight", "_linear_pointwise")):
        return False  # private operators: a torch build without them decodes with F.linear
    if dtype == torch.bfloat16:
        return cpu_has_native("bfloat16")
    return dtype == torch.float32


def prepacks(weight: torch.Tensor) -> bool:
    """Whether :class:`_Projection` hands ``weight`` to oneDNN prepacked (see :data:`PREPACK_MIN_WEIGHTS`)."""
    return weight.device.type == "cpu" and weight.numel() >= PREPACK_MIN_WEIGHTS and prepacks_dtype(weight.dtype)


class _Projection:
    """One matrix product of the decoder: ``linears`` of the same input joined (:func:`_joined`) in
    ``dtype``; prepacked for oneDNN where :func:`prepacks` says so (then it holds only that copy).
    ``rows``: the batch the products will mostly see (oneDNN picks its layout for it)."""

    def __init__(self, linears: list[torch.nn.Linear], dtype: torch.dtype, rows: int) -> None:
        weight, self.bias = _joined(linears, dtype)
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, rows) if prepacks(weight) else None
        self.weight = None if self.packed is not None else weight

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)

    def tensors(self) -> list[torch.Tensor]:
        """What it holds: the weight (or its packed copy) and the bias."""
        return [t for t in (self.packed, self.weight, self.bias) if t is not None]


class _JoinedLayer(NamedTuple):
    """A decoder layer's projections for decoding: queries, keys and values in one product, the MLP's
    gate and up projections in another."""

    qkv: _Projection
    o: _Projection
    gate_up: _Projection
    down: _Projection
    act: torch.nn.Module

    @classmethod
    def of(cls, layer: torch.nn.Module, dtype: torch.dtype, rows: int) -> "_JoinedLayer":
        attention, mlp = layer.self_attn, layer.mlp
        return cls(_Projection([attention.q_proj, attention.k_proj, attention.v_proj], dtype, rows),
                   _Projection([attention.o_proj], dtype, rows), _Projection([mlp.gate_proj, mlp.up_proj], dtype, rows),
                   _Projection([mlp.down_proj], dtype, rows), mlp.act_fn)


class FunctionalDecoder:
    """A Qwen2/Llama decoder applied by hand over preallocated key/value buffers.

    ``batch`` rows, room for ``max_len`` columns: one ``[B, KV heads, max_len, head dim]`` key and
    value buffer per layer. :meth:`prefill` writes the prompt (columns ``[0, P)``), :meth:`step`
    one token per call after it; both return the last position's logits ``[B, V]``.

    ``dtype`` (None: the parameters'): the matrix products' arithmetic and the key/value buffers'
    storage. The decoder holds the layers' projections joined (:class:`_JoinedLayer`) in it, plus
    the output head when that is another dtype than the parameters', and on a CPU a prepacked copy
    of each larger weight (:class:`_Projection`): at most one copy of each weight, for the life of
    the decoder (one rollout call). The norms, the residual stream and attention (over the buffers
    widened to it) stay in the parameters' dtype; the logits come out in ``dtype``.
    """

    def __init__(self, model: torch.nn.Module, prompt_mask: torch.Tensor, max_len: int,
                 dtype: torch.dtype | None = None) -> None:
        config = model.config
        backbone = model.model
        self.layers = list(backbone.layers)
        self.embed = backbone.embed_tokens
        self.norm = backbone.norm
        self.head = model.get_output_embeddings()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        self.scale = self.head_dim**-0.5
        batch, self.prompt_len = prompt_mask.shape
        weight = self.embed.weight
        shape = (batch, self.num_kv_heads, max_len, self.head_dim)
        self.dtype = dtype or weight.dtype
        self.keys = [torch.zeros(shape, dtype=self.dtype, device=weight.device) for _ in self.layers]
        self.values = [torch.zeros(shape, dtype=self.dtype, device=weight.device) for _ in self.layers]
        # Additive mask over key columns: -inf on left padding, 0 elsewhere ([B, 1, 1, max_len]).
        self.column_bias = torch.zeros(batch, 1, 1, max_len, dtype=weight.dtype, device=weight.device)
        self.column_bias[:, 0, 0, : self.prompt_len].masked_fill_(~prompt_mask, float("-inf"))
        # The rotary tables for every position this call can reach, from the model's own module.
        positions = torch.arange(max_len, device=weight.device)[None]
        cos, sin = backbone.rotary_emb(weight[None, :1], positions)
        self.cos, self.sin = cos[0], sin[0]  # [max_len, head dim]
        self.blocks = [_JoinedLayer.of(layer, self.dtype, batch) for layer in self.layers]
        self.head_projection = _Projection([self.head], self.dtype, batch)

    def keep(self, rows: torch.Tensor) -> None:
        """Keep only the buffer rows ``rows`` (the responses still running): finished rows stop
        costing work in every later step."""
        self.keys = [keys.index_select(0, rows) for keys in self.keys]
        self.values = [values.index_select(0, rows) for values in self.values]
        self.column_bias = self.column_bias.index_select(0, rows)

    def _rotary(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # [B, q] positions -> [B, 1, q, head dim] tables that broadcast over heads.
        return self.cos[positions][:, None], self.sin[positions][:, None]

    def prefill(self, tokens: torch.Tensor, positions: torch.Tensor, group: int = 1) -> torch.Tensor:
        """``[B, P]`` left-padded prompt tokens at ``[B, P]`` positions.

        ``group``: the rows come in runs of ``group`` copies of one prompt (n samples per prompt);
        each prompt is then computed once and its keys, values and logits are copied to its run.
        """
        if group > 1:
            tokens, positions = tokens[::group], positions[::group]
        length = tokens.shape[1]
        rows = torch.arange(length, device=tokens.device)[:, None]
        columns = torch.arange(length, device=tokens.device)[None, :]
        # Causal and not padding; each query also sees itself, so that a padding query attends to
        # something (an all-masked row would put NaN into the buffers, and NaN * 0 is NaN).
        visible = (self.column_bias[::group, :, :, :length] == 0) | (columns == rows)
        visible = visible & (columns <= rows)

        def attend(q, k, v):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=visible, scale=self.scale,
                                                  enable_gqa=self.num_heads != self.num_kv_heads)

        return self._layers(tokens, positions, 0, attend, group).repeat_interleave(group, dim=0)

    def step(self, tokens: torch.Tensor, positions: torch.Tensor, column: int) -> torch.Tensor:
        """``[B]`` tokens at ``[B, 1]`` positions, written at ``column``; attends to ``[0, column]``."""
        bias = self.column_bias[..., : column + 1]
        group = self.num_heads // self.num_kv_heads

        def attend(q, k, v):
            # Plain matmul attention: for one query it beats the fused CPU kernel here. Grouped
            # query heads share their KV head: [B, KV, group, D] against [B, KV, T, D].
            batch = q.shape[0]
            q = q.reshape(batch, self.num_kv_heads, group, self.head_dim)
            scores = torch.matmul(q, k.transpose(-1, -2)).mul_(self.scale).add_(bias)
            out = torch.matmul(scores.softmax(-1), v)
            return out.reshape(batch, self.num_heads, 1, self.head_dim)

        return self._layers(tokens[:, None], positions, column, attend)

    def _layers(self, tokens, positions, start, attend, group: int = 1) -> torch.Tensor:
        """The decoder over ``tokens`` at columns ``[start, start + length)``; with ``group > 1``
        (prefill only) the rows are every ``group``-th buffer row and the keys and values written go
        to all ``group`` rows of each."""
        batch, length = tokens.shape
        end = start + length
        heads, kv_heads, dtype = self.num_heads, self.num_kv_heads, self.dtype
        hidden = self.embed(tokens)
        cos, sin = self._rotary(positions)
        for index, (layer, block) in enumerate(zip(self.layers, self.blocks)):
            x = _rms_norm(layer.input_layernorm, hidden).to(dtype)
            qkv = block.qkv(x).view(batch, length, heads + 2 * kv_heads, self.head_dim)
            qkv = qkv.transpose(1, 2)
            qk = rotate(qkv[:, : heads + kv_heads], cos, sin)  # queries and keys rotated at once
            q, k, v = qk[:, :heads], qk[:, heads:], qkv[:, heads + kv_heads :]
            # Buffer rows as [tokens' rows, group]: one broadcast write fills each run (no repeated copy).
            self.keys[index].unflatten(0, (batch, group))[:, :, :, start:end] = k[:, None]
            self.values[index].unflatten(0, (batch, group))[:, :, :, start:end] = v[:, None]
            # Attention in the residual stream's dtype over the buffers widened to it: reading bf16
            # buffers and widening them costs less than reading float32 ones (-15% of a 2.38M
            # policy's bf16 decoding on 2 CPU cores, bench_sampling_modes.py).
            wide = hidden.dtype
            out = attend(q.to(wide), self.keys[index][::group, :, :end].to(wide), self.values[index][::group, :, :end].to(wide))
            out = out.transpose(1, 2).reshape(batch, length, -1).to(dtype)
            hidden = hidden + block.o(out)
            x = _rms_norm(layer.post_attention_layernorm, hidden).to(dtype)
            gate, up = block.gate_up(x).chunk(2, dim=-1)
            hidden = hidden + block.down(block.act(gate) * up)
        x = _rms_norm(self.norm, hidden[:, -1]).to(dtype)
        return self.head_projection(x)


def functional_steps(
    model: torch.nn.Module, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, max_new_tokens: int, group: int = 1,
    dtype: torch.dtype | None = None,
) -> Iterator[torch.Tensor]:
    """Yields next-token logits ``[B, V]``; after each yield, ``send`` ``(tokens, rows)``: the sampled
    tokens of the rows that go on, and those rows' indices among the current ones (None: all of them).
    ``group``: see :meth:`FunctionalDecoder.prefill`."""
    prompt_len = prompt_ids.shape[1]
    decoder = FunctionalDecoder(model, prompt_mask, prompt_len + max_new_tokens, dtype)
    positions = (prompt_mask.long().cumsum(-1) - 1).clamp(min=0)
    tokens, rows = yield decoder.prefill(prompt_ids, positions, group)
    position = positions[:, -1:]
    for step in range(max_new_tokens - 1):
        if rows is not None:
            decoder.keep(rows)
            position = position[rows]
        position = position + 1
        tokens, rows = yield decoder.step(tokens, position, prompt_len + step)


def _cache_keyword(model: torch.nn.Module) -> str:
    # transformers >= 5.2x names the argument ``cache``; earlier releases ``past_key_values``.
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def hf_forward_steps(
    model: torch.nn.Module, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, max_new_tokens: int
) -> Iterator[torch.Tensor]:
    """Like :func:`functional_steps`, through the model's own ``forward`` and ``DynamicCache``."""
    from transformers import DynamicCache

    batch, prompt_len = prompt_ids.shape
    cache = DynamicCache(config=model.config)
    keyword = _cache_keyword(model)
    mask = torch.ones(batch, prompt_len + max_new_tokens, dtype=torch.long, device=prompt_ids.device)
    mask[:, :prompt_len] = prompt_mask.long()
    positions = (prompt_mask.long().cumsum(-1) - 1).clamp(min=0)
    output = model(input_ids=prompt_ids, attention_mask=mask[:, :prompt_len], position_ids=positions,
                   use_cache=True, logits_to_keep=1, **{keyword: cache})
    tokens, rows = yield output.logits[:, -1]
    position = positions[:, -1:]
    for step in range(max_new_tokens - 1):
        if rows is not None:
            cache.batch_select_indices(rows)
            mask, position = mask[rows], position[rows]
        position = position + 1
        output = model(input_ids=tokens[:, None], attention_mask=mask[:, : prompt_len + step + 1], position_ids=position,
                       use_cache=True, **{keyword: cache})
        tokens, rows = yield output.logits[:, -1]


@torch.no_grad()
def sample(
    model: torch.nn.Module,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    max_new_tokens: int,
    eos_token_id: int,
    pad_token_id: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    functional: bool | None = None,
    group: int = 1,
    dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample continuations of left-padded prompts until every row has emitted EOS (or the budget ends);
    rows that have emitted EOS leave the decoder (see :data:`COMPACT_FRACTION`): with response lengths
    that spread like RLVR's the later steps run a fraction of the batch.

    ``prompt_ids``/``prompt_mask``: ``[B, P]``. Returns ``response_ids`` ``[B, R]`` (``R <=
    max_new_tokens``; after a row's EOS its tokens are ``pad_token_id``) and the log-prob of each
    sampled token under the sampled distribution, ``[B, R]`` float32 (meaningless after EOS: the
    caller masks it). ``functional=None`` picks :class:`FunctionalDecoder` where it applies.
    ``group``: the rows are runs of ``group`` copies of one prompt (``B`` divisible by it); the
    functional decoder then computes each prompt's prefill once (the other loop ignores it).
    ``dtype``: the arithmetic of the decoding (None: the parameters' dtype), see :class:`FunctionalDecoder`.
    """
    if functional is None:
        functional = supports_functional(model)
    if group < 1 or prompt_ids.shape[0] % group:
        raise ValueError(f"group={group} must be >= 1 and divide the {prompt_ids.shape[0]} rows")
    batch, device = prompt_ids.shape[0], prompt_ids.device
    weights_dtype = next(model.parameters()).dtype
    dtype = dtype or weights_dtype
    # The decoding runs in ``dtype`` whatever autocast the caller has on (Lightning's, under
    # model.compute_dtype): the functional decoder casts its joined weights once per call; the other
    # loop runs under autocast only when ``dtype`` is not the weights' own. (Per-step autocast casts
    # every weight anew at every step on CPU, where Lightning turns the cast cache off: 1.6x slower
    # at 0.31M parameters, bench_sampling_modes.py.)
    cast = not functional and dtype != weights_dtype
    # The functional decoder runs in inference mode: no version counters or autograd bookkeeping on
    # its few-microsecond operators (-14% of a 0.31M policy's decoding, bench_sampling_modes.py).
    # Not the other loop, which also serves FSDP-sharded policies. Its results are copied out:
    # inference tensors cannot enter the update's autograd graph.
    with (torch.autocast(device.type, **({"dtype": dtype} if cast else {}), enabled=cast),
          torch.inference_mode() if functional else contextlib.nullcontext()):
        if functional:
            steps = functional_steps(model, prompt_ids, prompt_mask, max_new_tokens, group, dtype)
        else:
            steps = hf_forward_steps(model, prompt_ids, prompt_mask, max_new_tokens)
        response_ids, response_logprobs = _draw(steps, batch, device, max_new_tokens, eos_token_id, pad_token_id,
                                                temperature, top_p)
    return (response_ids.clone(), response_logprobs.clone()) if functional else (response_ids, response_logprobs)


def _draw(steps: Iterator[torch.Tensor], batch: int, device: torch.device, max_new_tokens: int, eos_token_id: int,
          pad_token_id: int, temperature: float, top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The sampling loop of :func:`sample`: draws from the logits ``steps`` yields, sends back the
    tokens and the rows that go on."""
    response_ids = torch.full((batch, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
    response_logprobs = torch.zeros(batch, max_new_tokens, dtype=torch.float32, device=device)
    running = torch.arange(batch, device=device)  # the batch row of each row the decoder still runs
    finished = torch.zeros(batch, dtype=torch.bool, device=device)  # per decoder row: EOS already sampled
    logits = next(steps)
    for step in range(max_new_tokens):
        logprobs = sampling_logprobs(logits, temperature, top_p)
        tokens = gumbel_max(logprobs)
        response_logprobs[running, step] = logprobs.gather(-1, tokens[:, None]).squeeze(-1)
        tokens = tokens.masked_fill(finished, pad_token_id)
        response_ids[running, step] = tokens
        finished = finished | (tokens == eos_token_id)
        done = int(finished.sum())
        if step == max_new_tokens - 1 or done == len(finished):
            break
        rows = None
        if COMPACT_FRACTION and done >= max(1, len(finished) // COMPACT_FRACTION):  # drop the finished rows
            rows = (~finished).nonzero().squeeze(-1)
            running, finished, tokens = running[rows], finished[rows], tokens[rows]
        logits = steps.send((tokens, rows))
    steps.close()
    return response_ids[:, : step + 1], response_logprobs[:, : step + 1]
