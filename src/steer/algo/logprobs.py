"""Per-token log-probabilities and entropies of sampled responses, without materialising all logits.

A 50k-vocabulary model on a batch of 64 x 3072 response tokens would need 40 GB of float32 logits.
We run the transformer backbone once, keep only the hidden states of the positions that predict
response tokens, and push them through the output head a chunk of tokens at a time. Under autograd
each chunk is wrapped in activation checkpointing, so the backward pass recomputes a chunk's logits
instead of storing them: peak memory is one chunk of logits, not the batch. Within a chunk, a
hand-written backward (:class:`_LogprobEntropy`) keeps one ``[chunk, V]`` tensor instead of the three
autograd would keep through the softmax and entropy.
"""

from __future__ import annotations

import functools
import inspect

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from steer.algo.packed_shared import packed_shared_hidden
from steer.models.functional import supports_functional


def logprobs_and_entropy_from_logits(
    logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of ``targets`` and the entropy of the (tempered) softmax.

    Args:
        logits: ``[..., V]`` raw scores (any float dtype; computed in float32).
        targets: ``[...]`` token ids.
        temperature: logits are divided by it, matching the sampler.

    Returns:
        ``(logprob, entropy)``, both ``[...]`` float32. Entropy is
        ``H = logsumexp(z) - sum_v softmax(z)_v z_v`` in nats.
    """
    z = logits.float() / temperature
    log_norm = torch.logsumexp(z, dim=-1)
    logprob = z.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - log_norm
    entropy = log_norm - (F.softmax(z, dim=-1) * z).sum(-1)
    return logprob, entropy


class _LogprobEntropy(torch.autograd.Function):
    """:func:`logprobs_and_entropy_from_logits` with a hand-written backward that keeps only the
    tempered logits ``z`` (autograd would keep ``z``, the softmax and their product: three
    ``[tokens, V]`` tensors per chunk, the largest item of the update's memory at 49k vocabularies).

    With ``p = softmax(z)``, ``log p = z - logsumexp(z)`` and ``H = -sum p log p``:
    ``d logprob / dz = onehot(target) - p`` and ``d H / dz = -p (log p + H)``.
    """

    @staticmethod
    def forward(ctx, z: torch.Tensor, targets: torch.Tensor):
        log_norm = torch.logsumexp(z, dim=-1)
        logprob = z.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - log_norm
        entropy = log_norm - (F.softmax(z, dim=-1) * z).sum(-1)
        ctx.save_for_backward(z, targets, log_norm, entropy)
        return logprob, entropy

    @staticmethod
    def backward(ctx, grad_logprob: torch.Tensor, grad_entropy: torch.Tensor):
        z, targets, log_norm, entropy = ctx.saved_tensors
        log_p = z - log_norm.unsqueeze(-1)  # one [tokens, V] buffer, reused in place below
        p = log_p.exp()
        # grad = g_lp (onehot - p) - g_H p (log p + H) = -p (g_lp + g_H (log p + H)) + g_lp onehot
        grad = log_p.add_(entropy.unsqueeze(-1)).mul_(grad_entropy.unsqueeze(-1)).add_(grad_logprob.unsqueeze(-1)).mul_(p).neg_()
        grad.scatter_add_(-1, targets.unsqueeze(-1), grad_logprob.unsqueeze(-1))
        return grad, None


def _head_chunk(hidden, weight, bias, targets, temperature):
    logits = F.linear(hidden, weight, bias).float()
    z = logits / temperature if temperature != 1.0 else logits  # no copy at T = 1 (division by 1 is exact)
    return _LogprobEntropy.apply(z, targets)


def chunked_logprobs_and_entropy(
    hidden: torch.Tensor,
    head_weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    head_bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    chunk_tokens: int = 4096,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same as applying the output head then :func:`logprobs_and_entropy_from_logits`, chunked.

    Args:
        hidden: ``[B, T, D]`` final hidden states at the positions that predict ``targets``.
        head_weight: ``[V, D]`` output projection (``lm_head.weight``).
        targets: ``[B, T]`` token ids.
        chunk_tokens: tokens per chunk; at most ``chunk_tokens x V`` logits exist at once.

    Returns:
        ``(logprob, entropy)``, each ``[B, T]`` float32.
    """
    batch, length, dim = hidden.shape
    flat_hidden = hidden.reshape(-1, dim)
    flat_targets = targets.reshape(-1)
    use_checkpoint = torch.is_grad_enabled() and (hidden.requires_grad or head_weight.requires_grad)
    logprobs, entropies = [], []
    for start in range(0, flat_hidden.shape[0], chunk_tokens):
        h = flat_hidden[start : start + chunk_tokens]
        t = flat_targets[start : start + chunk_tokens]
        if use_checkpoint:
            lp, ent = checkpoint(_head_chunk, h, head_weight, head_bias, t, temperature, use_reentrant=False)
        else:  # no reverse-mode graph to save memory for; plain ops also carry forward-mode AD (the probe's JVP)
            lp, ent = logprobs_and_entropy_from_logits(F.linear(h, head_weight, head_bias), t, temperature)
        logprobs.append(lp)
        entropies.append(ent)
    return torch.cat(logprobs).view(batch, length), torch.cat(entropies).view(batch, length)


def response_logprobs_and_entropy(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    response_length: int,
    *,
    temperature: float = 1.0,
    chunk_tokens: int = 4096,
    share_prompts: bool = False,
    pack: bool = False,
    compiled: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs and entropies of the response tokens of ``[prompt | response]`` sequences.

    Args:
        model: a Hugging Face causal LM (``get_decoder()`` and ``get_output_embeddings()``).
        input_ids: ``[B, P + R]`` left-padded prompts followed by right-padded responses.
        attention_mask: ``[B, P + R]``.
        response_length: ``R``; the last ``R`` positions are the response.
        share_prompts: run each prompt once for all adjacent rows that repeat it (the ``n`` samples
            of a prompt), see :func:`shared_prompt_hidden`; the same values and gradients up to
            float round-off. Falls back to the plain forward where the model cannot take a key/value
            cache (gradient checkpointing while training) or no two adjacent rows share a prompt.
        pack: leave the padding out (:func:`packed_logprobs_and_entropy`). With ``share_prompts``
            too, both (:mod:`steer.algo.packed_shared`) where the model's layers can be applied by
            hand (Qwen2/Llama families, not FSDP-sharded) and two adjacent rows share a prompt;
            otherwise packing alone.
        compiled: with both, the hand-applied layers' arithmetic around attention through
            ``torch.compile`` (``model.compile``; :mod:`steer.algo.packed_shared`). Elsewhere ignored.

    Returns:
        ``(logprob, entropy)``, each ``[B, R]`` float32 (padding positions hold garbage; mask them).
    """
    if pack and share_prompts and supports_functional(model):
        groups = prompt_groups(input_ids, attention_mask, response_length)
        if groups is not None:
            hidden, response_mask = packed_shared_hidden(model, input_ids, attention_mask, response_length, *groups, compiled)
            return _scatter_head(model, hidden, input_ids[:, -response_length:], response_mask, temperature, chunk_tokens)
    if pack:
        return packed_logprobs_and_entropy(model, input_ids, attention_mask, response_length, temperature=temperature,
                                           chunk_tokens=chunk_tokens)
    groups = prompt_groups(input_ids, attention_mask, response_length) if share_prompts and _can_cache(model) else None
    if groups is not None:
        hidden = shared_prompt_hidden(model, input_ids, attention_mask, response_length, *groups)
    else:
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        hidden = _backbone(model, input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                           use_cache=False)[0]
        # Position t predicts token t + 1: the hidden states at [P - 1, P + R - 1) predict the response.
        hidden = hidden[:, -response_length - 1 : -1]
    head = model.get_output_embeddings()
    return chunked_logprobs_and_entropy(
        hidden,
        head.weight,
        input_ids[:, -response_length:],
        head_bias=getattr(head, "bias", None),
        temperature=temperature,
        chunk_tokens=chunk_tokens,
    )


def pack_rows(lengths: torch.Tensor, capacity: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Place sequences of ``lengths`` tokens into rows of ``capacity`` tokens, first fit by decreasing
    length; returns each sequence's row and start column, and the number of rows."""
    row_of, start_of = torch.zeros_like(lengths), torch.zeros_like(lengths)
    free: list[int] = []  # tokens left in each row
    for index in torch.sort(lengths, descending=True, stable=True).indices.tolist():
        length = int(lengths[index])
        row = next((r for r, room in enumerate(free) if room >= length), len(free))
        if row == len(free):
            free.append(capacity)
        row_of[index], start_of[index] = row, capacity - free[row]
        free[row] -= length
    return row_of, start_of, len(free)


def packed_logprobs_and_entropy(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    response_length: int,
    *,
    temperature: float = 1.0,
    chunk_tokens: int = 4096,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`response_logprobs_and_entropy` without padding (``algorithm.pack_sequences``).

    Each row's real tokens (its prompt without the left padding, its response without the right
    padding) are laid end to end into rows as long as the longest sequence (first fit, longest
    first), positions restarting at 0 for every sequence and no attention mask: Hugging Face's
    attention reads the sequences off the positions and keeps each one causal and to itself (a
    block-diagonal causal mask for ``sdpa``, ``eager`` and ``flex_attention``; with
    ``flash_attention_*`` its variable-length kernel, which wants every sequence in one row, so
    then there is one row). The decoder and the output head see real tokens only; the values come
    back in the ``[B, R]`` layout, 0 on padding.
    """
    device = input_ids.device
    valid = attention_mask.bool()
    lengths = valid.sum(-1)
    prompt_lengths = valid[:, : input_ids.shape[1] - response_length].sum(-1)
    one_row = str(getattr(model.config, "_attn_implementation", "") or "").startswith(("flash", "kernels-community/flash"))
    capacity = int(lengths.sum() if one_row else lengths.max())
    row_of, start_of, rows = pack_rows(lengths.cpu(), capacity)
    first = (row_of * capacity + start_of).to(device)  # where each sequence starts in the flat rows
    index_in_sequence = valid.long().cumsum(-1) - 1  # each real token's position
    destination = (first[:, None] + index_in_sequence)[valid]
    packed_ids = torch.zeros(rows * capacity, dtype=input_ids.dtype, device=device)
    packed_ids[destination] = input_ids[valid]
    # Room left at a row's end keeps the positions of a count from the row's start: it is a sequence
    # of its own or the tail of the last one, and only attends backwards, so no real token sees it.
    positions = torch.arange(capacity, device=device).repeat(rows)
    positions[destination] = index_in_sequence[valid]
    hidden = _backbone(model, input_ids=packed_ids.view(rows, capacity), position_ids=positions.view(rows, capacity),
                       use_cache=False)[0]
    # Response token t of a row is predicted where its sequence holds position prompt_length - 1 + t.
    response_mask = valid[:, -response_length:]
    predictors = (first + prompt_lengths - 1)[:, None] + torch.arange(response_length, device=device)
    chosen = hidden.reshape(rows * capacity, -1)[predictors[response_mask]]
    return _scatter_head(model, chosen, input_ids[:, -response_length:], response_mask, temperature, chunk_tokens)


def _scatter_head(model, hidden, targets, response_mask, temperature, chunk_tokens) -> tuple[torch.Tensor, torch.Tensor]:
    """The output head on ``hidden [tokens, D]``, the real response tokens in row-major order of
    ``response_mask [B, R]``; log-probs and entropies back in the ``[B, R]`` layout, 0 on padding."""
    head = model.get_output_embeddings()
    logprob, entropy = chunked_logprobs_and_entropy(
        hidden[None], head.weight, targets[response_mask][None],
        head_bias=getattr(head, "bias", None), temperature=temperature, chunk_tokens=chunk_tokens,
    )
    zeros = torch.zeros(response_mask.shape, dtype=logprob.dtype, device=hidden.device)
    return zeros.masked_scatter(response_mask, logprob[0]), zeros.masked_scatter(response_mask, entropy[0])


def prompt_groups(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, response_length: int
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(first, group)``: the first row of each run of adjacent rows with the same prompt (ids and
    mask of the first ``P`` columns), and each row's run index; None when no two adjacent rows share."""
    prompt_length = input_ids.shape[1] - response_length
    if prompt_length <= 0 or response_length <= 0 or input_ids.shape[0] < 2:
        return None
    prompts, masks = input_ids[:, :prompt_length], attention_mask[:, :prompt_length]
    starts = torch.ones(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    starts[1:] = (prompts[1:] != prompts[:-1]).any(-1) | (masks[1:] != masks[:-1]).any(-1)
    if bool(starts.all()):
        return None
    return starts.nonzero().squeeze(-1), starts.long().cumsum(0) - 1


def shared_prompt_hidden(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    response_length: int,
    first: torch.Tensor,
    group: torch.Tensor,
) -> torch.Tensor:
    """The final hidden states that predict the response tokens, ``[B, R, D]``, with each prompt run once.

    The prompts of the rows ``first`` go through the model with a key/value cache; the cache and the
    prompt's last hidden state are indexed out to every row of their run (``group``), and the
    responses go through with that cache, attending to their prompt as in one ``[prompt | response]``
    forward (same positions, same mask). Autograd carries each row's gradient back through the
    indexing to its prompt's one forward, where the ``n`` contributions add up: the prompt's
    forward and backward run once per prompt instead of once per sample.
    """
    prompt_length = input_ids.shape[1] - response_length
    prompt_ids, prompt_mask = input_ids[first, :prompt_length], attention_mask[first, :prompt_length]
    positions = (prompt_mask.long().cumsum(-1) - 1).clamp(min=0)
    prompt_hidden, cache = _backbone(model, input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=positions,
                                     use_cache=True)
    hidden = prompt_hidden[:, -1:].index_select(0, group)  # the last prompt position predicts response token 0
    if response_length == 1:
        return hidden
    cache.batch_select_indices(group)
    steps = torch.arange(response_length - 1, device=input_ids.device)
    response_positions = prompt_mask.long().sum(-1, keepdim=True).index_select(0, group) + steps  # as cumsum(mask) - 1
    response_hidden, _ = _backbone(
        model, input_ids=input_ids[:, prompt_length:-1], attention_mask=attention_mask[:, :-1],
        position_ids=response_positions, use_cache=True, cache=cache,
    )
    return torch.cat([hidden, response_hidden], dim=1)


def _backbone(model: torch.nn.Module, *, cache=None, **inputs) -> tuple[torch.Tensor, object]:
    """``(final hidden states, key/value cache or None)`` of the decoder, without the output head."""
    sharded = _fully_sharded(model)
    if sharded:
        # FSDP2: only the root module's own forward gathers its parameters (embeddings, head), and
        # it keeps them gathered for the head and the backward; one position of logits.
        forward, extra = model, {"output_hidden_states": True, "logits_to_keep": 1}
    else:
        forward, extra = model.get_decoder(), {}
    cache_name = _cache_argument(type(forward)) if inputs.get("use_cache") else None
    if cache is not None:
        extra[cache_name] = cache
    out = forward(**inputs, **extra)
    hidden = out.hidden_states[-1] if sharded else out.last_hidden_state
    return hidden, getattr(out, cache_name) if cache_name else None


@functools.cache
def _cache_argument(forward_class: type) -> str:
    """The key/value cache's argument name (``cache`` from transformers 5.24, ``past_key_values`` before)."""
    return "cache" if "cache" in inspect.signature(forward_class.forward).parameters else "past_key_values"


def _can_cache(model: torch.nn.Module) -> bool:
    """Whether a forward keeps a key/value cache: Hugging Face's gradient-checkpointed layers drop it
    while training (and would then attend without the prompt)."""
    return not (model.training and any(getattr(module, "gradient_checkpointing", False) for module in model.modules()))


def _fully_sharded(model: torch.nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch built without distributed support
        return False
    return isinstance(model, FSDPModule)
