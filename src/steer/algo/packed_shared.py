"""Log-probs and entropies with each prompt run once *and* no padding: ``algorithm.share_prompt_prefix``
together with ``algorithm.pack_sequences``.

The two knobs skip different work. Sharing runs each prompt once for its ``n`` samples; packing
leaves out the padding. Through a Hugging Face model's own forward they exclude each other: sharing
needs one key/value cache row per sample, packing several samples per row. This module applies the
decoder layers by hand (Qwen2/Llama-family models, the architectures of
:func:`steer.models.functional.supports_functional`) so that it can do both:

- every **projection and MLP** (nearly all of the arithmetic) runs on one flat ``[tokens, hidden]``
  tensor that holds each prompt once and each response without padding;
- only **attention** sees a padded layout: the prompts attend causally among themselves
  (``[prompts, P]``), and each response attends to its own prompt's keys and values (indexed out to
  its row; autograd adds the ``n`` rows' gradients back into the prompt's one forward) followed by
  its own earlier tokens (``[rows, P + W]``). The responses, longest first, are cut into buckets of
  similar length (:func:`attention_buckets`), each padded only to its own longest: where lengths
  spread (1 to 128 tokens) one bucket would spend several times the attention work of the tokens;
- the last response token of each row is never an input (it predicts nothing), so it is left out.

Positions, masks and every operator follow the model's forward (rotary tables from its own
``rotary_emb``, its own projection and MLP modules, ``eager`` attention when the model is set to it,
else ``scaled_dot_product_attention``), so the values equal the unshared padded forward up to
float round-off; ``tests/algo/test_packed_shared.py`` compares log-probs, entropies and every
gradient. With gradient checkpointing on, each layer is recomputed in the backward, as the model's
own layers would be.

``compiled=True`` (``model.compile``) runs each layer's arithmetic around attention (the norms,
projections, rotary embedding, MLP and residual adds: :func:`before_attention` and
:func:`after_attention`) through ``torch.compile`` with dynamic shapes, which fuses the
elementwise work into the products' neighbours; attention stays eager (its padded blocks change
from step to step).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from steer.models.functional import rotate


BUCKET_MIN_SAVING = 50_000
"""A new attention bucket starts only where it saves at least this many padded (query, key) pairs
per head. An estimate for a 2-core CPU: a bucket adds about a dozen operators per layer, forward and
backward (~0.5 ms at tens of microseconds each), and eager attention spends ~10 ns per pair and
head there. The variable workload of ``bench_update_layouts.py`` measures the result."""


def attention_buckets(widths: list[int], prompt_width: int, min_saving: int | None = None) -> list[tuple[int, int]]:
    """``[start, end)`` ranges of ``widths`` (response input lengths, longest first, all > 0), each
    padded to its first width in attention. A range ends where the next width is at most half its
    first and the rows from there on would save at least ``min_saving`` (query, key) pairs by
    starting their own (their keys: ``prompt_width`` prompt columns plus their own); default
    :data:`BUCKET_MIN_SAVING`."""
    min_saving = BUCKET_MIN_SAVING if min_saving is None else min_saving
    buckets, start = [], 0
    while start < len(widths):
        width, end = widths[start], start + 1
        while end < len(widths) and (
            2 * widths[end] > width
            or (len(widths) - end) * (width - widths[end]) * (prompt_width + width) < min_saving
        ):
            end += 1
        buckets.append((start, end))
        start = end
    return buckets


def packed_shared_hidden(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    response_length: int,
    first: torch.Tensor,
    group: torch.Tensor,
    compiled: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The final hidden states that predict the real response tokens, ``[tokens, D]`` in row-major
    order of ``attention_mask[:, -response_length:]``, and that mask.

    ``input_ids``/``attention_mask``: ``[B, P + R]`` left-padded prompts then right-padded responses;
    ``first``: the first row of each run of rows that share a prompt; ``group``: each row's run
    (see :func:`steer.algo.logprobs.prompt_groups`). ``compiled``: the layers' arithmetic around
    attention through ``torch.compile`` (see the module's docstring).
    """
    device = input_ids.device
    backbone = model.model
    prompt_length = input_ids.shape[1] - response_length
    prompt_mask = attention_mask[first, :prompt_length].bool()
    response_mask = attention_mask[:, prompt_length:].bool()
    prompt_lengths = prompt_mask.sum(-1)  # [G]
    # Each response's input tokens: all its real tokens but the last.
    inputs = (response_mask.sum(-1) - 1).clamp(min=0)  # [B]
    # The flat tokens: the prompts' real tokens (prompt by prompt), then the responses' inputs, rows
    # sorted longest first so that every attention bucket is one contiguous range.
    order = torch.sort(inputs, descending=True, stable=True).indices
    sorted_inputs = inputs[order]
    width = int(sorted_inputs[0]) if len(order) else 0
    columns = torch.arange(width, device=device)
    sorted_slots = columns < sorted_inputs[:, None]  # [B, W]
    responses = input_ids[order, prompt_length : prompt_length + width][sorted_slots]
    tokens = torch.cat([input_ids[first, :prompt_length][prompt_mask], responses])
    prompt_columns = torch.arange(int(prompt_lengths.max()), device=device)
    prompt_slots = prompt_columns < prompt_lengths[:, None]  # [G, Pw]: each prompt's tokens in columns [0, length)
    positions = torch.cat([
        prompt_columns.expand_as(prompt_slots)[prompt_slots],
        (prompt_lengths.index_select(0, group.index_select(0, order))[:, None] + columns)[sorted_slots],
    ])
    prompt_count = len(tokens) - len(responses)

    blocks = [_Block(prompt_slots, 0, None, None)]
    starts = sorted_inputs.cumsum(0) - sorted_inputs + prompt_count  # each sorted row's first flat token
    first_of_row = starts.tolist()
    widths = [w for w in sorted_inputs.tolist() if w > 0]  # longest first: the rows with inputs lead
    for start, end in attention_buckets(widths, prompt_slots.shape[1]):
        blocks.append(_Block(sorted_slots[start:end, : widths[start]], first_of_row[start],
                             group.index_select(0, order[start:end]), prompt_slots))

    hidden = backbone.embed_tokens(tokens)[None]  # [1, N, D], as the model's forward sees its embeddings
    cos, sin = backbone.rotary_emb(hidden, positions[None])
    layout = _Layout(model.config, blocks, cos[0], sin[0], compiled)
    # Hugging Face's checkpointed layers mark themselves (``gradient_checkpointing``) and recompute
    # only while training: so do these.
    recompute = model.training and torch.is_grad_enabled() and any(
        getattr(layer, "gradient_checkpointing", False) for layer in backbone.layers)
    hidden = hidden[0]
    for layer in backbone.layers:
        if recompute:
            hidden = checkpoint(layout.layer, layer, hidden, use_reentrant=False)
        else:
            hidden = layout.layer(layer, hidden)

    # Response token 0 is predicted at its prompt's last token, token t > 0 at the row's input t - 1.
    last_prompt = (prompt_lengths.cumsum(0) - 1).index_select(0, group)  # flat index, per row
    first_input = torch.empty_like(inputs)
    first_input[order] = starts
    predictors = torch.cat([last_prompt[:, None], first_input[:, None] + columns], dim=1)  # [B, longest response]
    chosen = predictors[response_mask[:, : predictors.shape[1]]]  # the mask is False beyond every response's end
    return backbone.norm(hidden.index_select(0, chosen)), response_mask


def before_attention(layer: torch.nn.Module, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                     heads: int, kv_heads: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A decoder layer up to attention over flat ``[N, D]`` tokens: its input norm, then the
    queries ``[N, heads, head dim]`` and keys (rotated by ``cos``/``sin``) and values ``[N, KV heads, head dim]``."""
    attention = layer.self_attn
    x = layer.input_layernorm(hidden)
    q = attention.q_proj(x).view(len(x), heads, head_dim)
    k = attention.k_proj(x).view(len(x), kv_heads, head_dim)
    v = attention.v_proj(x).view(len(x), kv_heads, head_dim)
    return rotate(q, cos, sin), rotate(k, cos, sin), v


def after_attention(layer: torch.nn.Module, hidden: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
    """The rest of the layer: the output projection of ``attended`` ``[N, heads, head dim]`` added to
    ``hidden``, then the MLP's residual branch."""
    hidden = hidden + layer.self_attn.o_proj(attended.reshape(len(hidden), -1))
    return hidden + layer.mlp(layer.post_attention_layernorm(hidden))


@functools.cache
def compiled_layer_pieces():
    """:func:`before_attention` and :func:`after_attention` through ``torch.compile`` (dynamic
    shapes: the token count changes every step), once per process; every layer of the same
    structure shares their graphs."""
    return torch.compile(before_attention, dynamic=True), torch.compile(after_attention, dynamic=True)


class _Block:
    """One padded attention layout: ``rows x width`` query slots over the contiguous flat tokens from
    ``start``, attending causally among themselves and, for responses, first to the real tokens of
    their prompt (row ``prefix[i]`` of the prompt block)."""

    def __init__(self, slots: torch.Tensor, start: int, prefix: torch.Tensor | None, prompt_slots: torch.Tensor | None):
        self.shape = slots.shape
        self.index = slots.flatten().nonzero().squeeze(-1)
        self.start, self.end = start, start + len(self.index)
        self.prefix = prefix
        width = slots.shape[1]
        own = torch.ones(width, width, dtype=torch.bool, device=slots.device).tril()
        if prefix is None:  # the prompts: causal among real tokens (a padding query still sees token 0)
            self.visible = (own & slots[:, None, :])[:, None]  # [rows, 1, W, W]
        else:
            seen = prompt_slots.index_select(0, prefix)[:, None, :].expand(-1, width, -1)
            self.visible = torch.cat([seen, own.expand(len(prefix), -1, -1)], dim=-1)[:, None]  # [rows, 1, W, Pw + W]

    def pad(self, flat: torch.Tensor) -> torch.Tensor:
        """This block's ``[n, h, D]`` tokens of the flat ``[N, h, D]`` -> ``[rows, h, width, D]``, zeros elsewhere."""
        mine = flat[self.start : self.end]
        padded = mine.new_zeros(self.shape[0] * self.shape[1], *mine.shape[1:]).index_copy(0, self.index, mine)
        return padded.unflatten(0, self.shape).transpose(1, 2)

    def unpad(self, padded: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`pad`: ``[rows, h, width, D]`` -> ``[n, h, D]``."""
        return padded.transpose(1, 2).flatten(0, 1).index_select(0, self.index)


class _Layout:
    """A decoder layer over the flat tokens: projections and MLP on all of them at once, attention
    block by block; holds the blocks and the rotary tables."""

    def __init__(self, config, blocks: list[_Block], cos: torch.Tensor, sin: torch.Tensor, compiled: bool = False) -> None:
        self.before, self.after = compiled_layer_pieces() if compiled else (before_attention, after_attention)
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.eager = getattr(config, "_attn_implementation", None) == "eager"
        self.blocks = blocks
        self.cos, self.sin = cos[:, None], sin[:, None]  # [N, 1, head dim]: broadcast over heads

    def layer(self, layer: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        attention = layer.self_attn
        q, k, v = self.before(layer, hidden, self.cos, self.sin, self.heads, self.kv_heads, self.head_dim)
        out = self.attend(q, k, v, attention.scaling, attention.attention_dropout if attention.training else 0.0)
        return self.after(layer, hidden, out)

    def attend(self, q, k, v, scale, dropout) -> torch.Tensor:
        """``[N, heads, D]`` queries, ``[N, KV heads, D]`` keys and values -> ``[N, heads, D]``."""
        prompts, *buckets = self.blocks
        prompt_k, prompt_v = prompts.pad(k), prompts.pad(v)  # [G, KV, Pw, D]
        outs = [prompts.unpad(self._attention(prompts.pad(q), prompt_k, prompt_v, prompts.visible, scale, dropout))]
        for bucket in buckets:
            keys = torch.cat([prompt_k.index_select(0, bucket.prefix), bucket.pad(k)], dim=2)
            values = torch.cat([prompt_v.index_select(0, bucket.prefix), bucket.pad(v)], dim=2)
            outs.append(bucket.unpad(self._attention(bucket.pad(q), keys, values, bucket.visible, scale, dropout)))
        return torch.cat(outs)

    def _attention(self, q, k, v, visible, scale, dropout) -> torch.Tensor:
        if not self.eager:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=visible, dropout_p=dropout, scale=scale,
                                                  enable_gqa=self.heads != self.kv_heads)
        # The model's eager kernel: products in the compute dtype, softmax in float32.
        repeat = self.heads // self.kv_heads
        if repeat > 1:
            k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
        scores = torch.matmul(q, k.transpose(-1, -2)) * scale
        scores = scores.masked_fill(~visible, torch.finfo(scores.dtype).min)
        weights = F.dropout(scores.softmax(-1, dtype=torch.float32).to(q.dtype), p=dropout, training=dropout > 0)
        return torch.matmul(weights, v)
