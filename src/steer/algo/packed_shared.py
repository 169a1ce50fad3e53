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
  its own earlier tokens (``[rows, P + R]``);
- the last response token of each row is never an input (it predicts nothing), so it is left out.

Positions, masks and every operator follow the model's forward (rotary tables from its own
``rotary_emb``, its own projection and MLP modules, ``eager`` attention when the model is set to it,
else ``scaled_dot_product_attention``), so the values equal the unshared padded forward up to
float round-off; ``tests/algo/test_packed_shared.py`` compares log-probs, entropies and every
gradient. With gradient checkpointing on, each layer is recomputed in the backward, as the model's
own layers would be.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def packed_shared_hidden(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    response_length: int,
    first: torch.Tensor,
    group: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The final hidden states that predict the real response tokens, ``[tokens, D]`` in row-major
    order of ``attention_mask[:, -response_length:]``, and that mask.

    ``input_ids``/``attention_mask``: ``[B, P + R]`` left-padded prompts then right-padded responses;
    ``first``: the first row of each run of rows that share a prompt; ``group``: each row's run
    (see :func:`steer.algo.logprobs.prompt_groups`).
    """
    device = input_ids.device
    backbone = model.model
    config = model.config
    prompt_length = input_ids.shape[1] - response_length
    prompt_mask = attention_mask[first, :prompt_length].bool()
    response_mask = attention_mask[:, prompt_length:].bool()
    prompt_lengths = prompt_mask.sum(-1)  # [G]
    response_lengths = response_mask.sum(-1)  # [B]
    # Inputs: each prompt's real tokens, and each response's real tokens but its last.
    prompt_width = int(prompt_lengths.max())
    input_width = max(int(response_lengths.max()) - 1, 0)
    prompt_slots = torch.arange(prompt_width, device=device) < prompt_lengths[:, None]  # [G, Pw], real first
    response_slots = torch.arange(input_width, device=device) < (response_lengths - 1)[:, None]  # [B, Rw]
    # The flat tokens: the prompts' real tokens (row by row), then the responses' inputs. In the
    # padded attention layouts each takes columns [0, length) of its row.
    response_tokens = input_ids[:, prompt_length : prompt_length + input_width]
    tokens = torch.cat([input_ids[first, :prompt_length][prompt_mask], response_tokens[response_slots]])
    positions = torch.cat([
        torch.arange(prompt_width, device=device).expand_as(prompt_slots)[prompt_slots],
        (prompt_lengths.index_select(0, group)[:, None] + torch.arange(input_width, device=device))[response_slots],
    ])
    prompt_count = int(prompt_slots.sum())

    # Attention masks (True: may attend). Prompts: causal among their real tokens. Responses: their
    # prompt's real tokens, then causal among their own.
    causal_prompt = torch.ones(prompt_width, prompt_width, dtype=torch.bool, device=device).tril()
    prompt_visible = (causal_prompt & prompt_slots[:, None, :])[:, None]  # [G, 1, Pw, Pw]
    own = torch.ones(input_width, input_width, dtype=torch.bool, device=device).tril().expand(len(group), -1, -1)
    response_visible = torch.cat([prompt_slots.index_select(0, group)[:, None, :].expand(-1, input_width, -1), own],
                                 dim=-1)[:, None]  # [B, 1, Rw, Pw + Rw]

    hidden = backbone.embed_tokens(tokens)[None]  # [1, N, D], as the model's forward sees its embeddings
    cos, sin = backbone.rotary_emb(hidden, positions[None])
    layout = _Layout(config, prompt_slots, response_slots, group, prompt_count, prompt_visible, response_visible,
                     cos[0], sin[0])
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

    # Response token 0 is predicted at its prompt's last token, token t > 0 at response input t - 1.
    last_prompt = (prompt_slots.sum(-1).cumsum(0) - 1).index_select(0, group)  # flat index, per row
    response_index = torch.zeros(response_slots.shape, dtype=torch.long, device=device)
    response_index[response_slots] = torch.arange(prompt_count, len(tokens), device=device)
    predictors = torch.cat([last_prompt[:, None], response_index], dim=1)  # [B, longest response]
    chosen = predictors[response_mask[:, : predictors.shape[1]]]  # the mask is False beyond every response's end
    return backbone.norm(hidden.index_select(0, chosen)), response_mask


class _Layout:
    """What every layer's attention needs: the flat tokens' places in the padded prompt and response
    layouts, the masks and the rotary tables."""

    def __init__(self, config, prompt_slots, response_slots, group, prompt_count, prompt_visible, response_visible,
                 cos, sin) -> None:
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.eager = getattr(config, "_attn_implementation", None) == "eager"
        self.prompt_slots, self.response_slots, self.group = _Slots(prompt_slots), _Slots(response_slots), group
        self.prompt_count = prompt_count
        self.prompt_visible, self.response_visible = prompt_visible, response_visible
        self.cos, self.sin = cos[:, None], sin[:, None]  # [N, 1, head dim]: broadcast over heads

    def layer(self, layer: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        attention = layer.self_attn
        x = layer.input_layernorm(hidden)
        q = attention.q_proj(x).view(len(x), self.heads, self.head_dim)
        k = attention.k_proj(x).view(len(x), self.kv_heads, self.head_dim)
        v = attention.v_proj(x).view(len(x), self.kv_heads, self.head_dim)
        q, k = _rotate(q, self.cos, self.sin), _rotate(k, self.cos, self.sin)
        out = self.attend(q, k, v, attention.scaling, attention.attention_dropout if attention.training else 0.0)
        hidden = hidden + attention.o_proj(out.reshape(len(x), -1))
        return hidden + layer.mlp(layer.post_attention_layernorm(hidden))

    def attend(self, q, k, v, scale, dropout) -> torch.Tensor:
        """``[N, heads, D]`` queries, ``[N, KV heads, D]`` keys and values -> ``[N, heads, D]``."""
        split = self.prompt_count
        prompt_q, prompt_k, prompt_v = (self.prompt_slots.pad(t[:split]) for t in (q, k, v))  # [G, h, Pw, D]
        prompt_out = self.prompt_slots.unpad(self._attention(prompt_q, prompt_k, prompt_v, self.prompt_visible, scale,
                                                             dropout))
        if split == len(q):  # no response has an input token (every response is at most one token long)
            return prompt_out
        response_q, response_k, response_v = (self.response_slots.pad(t[split:]) for t in (q, k, v))
        keys = torch.cat([prompt_k.index_select(0, self.group), response_k], dim=2)
        values = torch.cat([prompt_v.index_select(0, self.group), response_v], dim=2)
        response_out = self._attention(response_q, keys, values, self.response_visible, scale, dropout)
        return torch.cat([prompt_out, self.response_slots.unpad(response_out)])

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


class _Slots:
    """The True places of a ``[rows, width]`` mask, as flat indices (computed once per forward, not
    once per layer and tensor)."""

    def __init__(self, mask: torch.Tensor) -> None:
        self.shape = mask.shape
        self.index = mask.flatten().nonzero().squeeze(-1)

    def pad(self, flat: torch.Tensor) -> torch.Tensor:
        """``[n, h, D]`` tokens -> ``[rows, h, width, D]``, zeros elsewhere."""
        padded = flat.new_zeros(self.shape[0] * self.shape[1], *flat.shape[1:]).index_copy(0, self.index, flat)
        return padded.unflatten(0, self.shape).transpose(1, 2)

    def unpad(self, padded: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`pad`: ``[rows, h, width, D]`` -> ``[n, h, D]``."""
        return padded.transpose(1, 2).flatten(0, 1).index_select(0, self.index)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin
