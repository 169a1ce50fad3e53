"""Micro-batches by a token budget (``algorithm.micro_batch_tokens``).

Responses in RLVR range from a few tokens to the length limit, and a micro-batch costs its rows
times its longest prompt plus its longest response: a short response padded to a long one is paid
for in every layer, forward and backward. With a token budget the rows of a mini-batch are sorted
by length (longest first) and cut into consecutive micro-batches whose padded size
``rows x (longest prompt + longest response)`` stays within the budget, so rows of similar length
share a forward and padding nearly disappears (the idea of verl's dynamic batch size). The loss is
unchanged: every micro-batch is normalised by the mini-batch totals (:mod:`steer.algo.aggregation`),
so the sum over micro-batches is the same loss whatever the split.
"""

from __future__ import annotations

import torch


def padded_tokens(prompt_lengths: torch.Tensor, response_lengths: torch.Tensor) -> int:
    """Tokens of one forward over these rows, each cut to the longest prompt and the longest response."""
    if len(prompt_lengths) == 0:
        return 0
    return len(prompt_lengths) * int(prompt_lengths.max() + response_lengths.max().clamp(min=1))


def token_budget_microbatches(
    prompt_lengths: torch.Tensor,
    response_lengths: torch.Tensor,
    budget: int,
    max_rows: int | None = None,
    count: int | None = None,
) -> list[torch.Tensor]:
    """Positions (into the given ``[B]`` length vectors) of each micro-batch, longest rows first.

    The rows are sorted by ``prompt + response`` length (descending, ties in row order) and filled
    greedily into consecutive micro-batches of at most ``budget`` padded tokens (:func:`padded_tokens`)
    and at most ``max_rows`` rows; a row longer than the budget is a micro-batch of its own.
    ``count``: split the micro-batches with the most rows in two until there are this many (ranks
    of FSDP must run the same number of forwards). The concatenation of
    the result is a permutation of ``range(B)``.
    """
    if budget < 1:
        raise ValueError(f"the token budget must be >= 1, got {budget}")
    order = torch.sort(prompt_lengths + response_lengths.clamp(min=1), descending=True, stable=True).indices
    parts: list[list[int]] = []
    current: list[int] = []
    longest_prompt = longest_response = 0  # of the rows in current
    for row in order.tolist():
        prompt, response = int(prompt_lengths[row]), max(int(response_lengths[row]), 1)
        full = max_rows is not None and len(current) >= max_rows
        if current and (full or (len(current) + 1) * (max(longest_prompt, prompt) + max(longest_response, response)) > budget):
            parts.append(current)
            current, longest_prompt, longest_response = [], 0, 0
        current.append(row)
        longest_prompt, longest_response = max(longest_prompt, prompt), max(longest_response, response)
    if current:
        parts.append(current)
    if count is not None:
        if count > len(order):
            raise ValueError(f"cannot cut {len(order)} rows into {count} micro-batches")
        while len(parts) < count:  # halve the micro-batch with the most rows (first of equals): still within budget
            index = max(range(len(parts)), key=lambda i: (len(parts[i]), -i))
            part = parts[index]
            parts[index : index + 1] = [part[: len(part) // 2], part[len(part) // 2 :]]
    return [torch.tensor(part, dtype=torch.long) for part in parts]

