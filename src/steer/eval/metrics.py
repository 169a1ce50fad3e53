"""Benchmark metrics over n sampled responses per prompt: mean@k, pass@k, maj@k, bootstrap CIs,
and solution diversity (distinct signatures among the correct samples).

Conventions: ``correct`` is a ``[num_prompts, num_samples]`` boolean matrix (sample order = the
order they were generated in); every metric is a mean over prompts, so each prompt weighs the same
whatever its number of copies in the source file.
"""

from __future__ import annotations

from collections import Counter
from typing import Hashable, Sequence

import numpy as np


def _as_matrix(correct: np.ndarray | Sequence[Sequence[bool]]) -> np.ndarray:
    matrix = np.asarray(correct, dtype=float)
    if matrix.ndim != 2 or matrix.shape[0] == 0 or matrix.shape[1] == 0:
        raise ValueError(f"expected a non-empty [num_prompts, num_samples] matrix, got shape {matrix.shape}")
    return matrix


def mean_at_k(correct: np.ndarray | Sequence[Sequence[bool]]) -> float:
    """mean@k (a.k.a. avg@k): accuracy averaged over the k samples of each prompt, then over prompts.

    Args:
        correct: ``[num_prompts, k]`` booleans.
    """
    return float(_as_matrix(correct).mean())


def pass_at_k(num_samples: int, num_correct: int, k: int) -> float:
    """Unbiased pass@k estimate for one prompt (Chen et al. 2021, "Evaluating LLMs trained on code").

    The probability that at least one of k samples drawn without replacement from n, of which c are
    correct, is correct: ``1 - C(n-c, k) / C(n, k)``, computed as the product
    ``prod_{i=n-c+1..n} (1 - k / i)`` so large n does not overflow.
    """
    if not 0 <= num_correct <= num_samples:
        raise ValueError(f"need 0 <= num_correct <= num_samples, got c={num_correct}, n={num_samples}")
    if not 1 <= k <= num_samples:
        raise ValueError(f"pass@k needs 1 <= k <= n samples per prompt, got k={k}, n={num_samples}")
    if num_samples - num_correct < k:
        return 1.0  # every k-subset contains a correct sample
    return float(1.0 - np.prod(1.0 - k / np.arange(num_samples - num_correct + 1, num_samples + 1)))


def pass_at_k_mean(correct: np.ndarray | Sequence[Sequence[bool]], k: int) -> float:
    """pass@k of a benchmark: the unbiased per-prompt estimate from all n samples, averaged over prompts.

    Args:
        correct: ``[num_prompts, n]`` booleans, n >= k.
    """
    matrix = _as_matrix(correct)
    num_samples = matrix.shape[1]
    return float(np.mean([pass_at_k(num_samples, int(row.sum()), k) for row in matrix]))


def maj_at_k(
    answers: Sequence[Sequence[str | None]], correct: Sequence[Sequence[bool]], k: int
) -> float:
    """maj@k: accuracy of the majority-voted answer among each prompt's first k samples.

    Answers are compared as strings, so pass normalised answers. ``None`` (no answer extracted)
    never wins; a prompt without any answer counts as wrong. Ties go to the answer that appeared
    first, so the result is deterministic. The voted answer is correct iff the first sample giving
    it was judged correct.

    Args:
        answers: per prompt, the extracted answer of each sample.
        correct: per prompt, whether each sample was judged correct (same shape as ``answers``).
    """
    if len(answers) != len(correct) or not answers:
        raise ValueError(f"need the same non-zero number of prompts, got {len(answers)} and {len(correct)}")
    hits = []
    for prompt_answers, prompt_correct in zip(answers, correct):
        if len(prompt_answers) != len(prompt_correct):
            raise ValueError("answers and correct must have the same number of samples per prompt")
        if not 1 <= k <= len(prompt_answers):
            raise ValueError(f"maj@k needs 1 <= k <= n samples per prompt, got k={k}, n={len(prompt_answers)}")
        votes = Counter(answer for answer in prompt_answers[:k] if answer is not None)
        if not votes:
            hits.append(False)
            continue
        top = max(votes.values())
        winner = next(answer for answer in prompt_answers[:k] if votes.get(answer) == top)
        hits.append(bool(prompt_correct[list(prompt_answers).index(winner)]))
    return float(np.mean(hits))


def bootstrap_ci(
    per_prompt_values: np.ndarray | Sequence[float],
    num_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of the mean over prompts.

    Prompts (not samples) are resampled with replacement, because samples of one prompt are
    correlated: the interval reflects how much the score depends on which problems the benchmark
    happens to contain (AIME's 30 problems give wide intervals).

    Args:
        per_prompt_values: one value per prompt (e.g. each prompt's mean@k).
        num_resamples: bootstrap resamples.
        confidence: coverage of the interval, in (0, 1).
        seed: seed of the resampling generator (the result is deterministic).

    Returns:
        ``(low, high)``.
    """
    values = np.asarray(per_prompt_values, dtype=float).ravel()
    if values.size == 0:
        raise ValueError("bootstrap_ci needs at least one value")
    if not 0 < confidence < 1 or num_resamples < 1:
        raise ValueError(f"need 0 < confidence < 1 and num_resamples >= 1, got {confidence}, {num_resamples}")
    rng = np.random.default_rng(seed)
    means = np.empty(num_resamples)
    chunk = max(1, 2**22 // values.size)  # bound memory at ~32 MB of indices per chunk
    for start in range(0, num_resamples, chunk):
        stop = min(start + chunk, num_resamples)
        means[start:stop] = values[rng.integers(0, values.size, size=(stop - start, values.size))].mean(axis=1)
    alpha = (1.0 - confidence) / 2
    low, high = np.quantile(means, [alpha, 1.0 - alpha])
    return float(low), float(high)


def solution_diversity(
    signatures: Sequence[Sequence[Hashable | None]], correct: np.ndarray | Sequence[Sequence[bool]]
) -> dict[str, np.ndarray]:
    """How many different ways each prompt is solved: distinct signatures among its correct samples.

    A signature is any hashable summary of one response (for the embedded arithmetic task the order
    in which the terms are added, :func:`steer.data.arithmetic.order_signature`). ``None`` (the
    response has no readable signature) is one class of its own: all such correct responses count
    as one more way, so that a policy dropping its worked line does not look more diverse.

    Args:
        signatures: ``[num_prompts][k]`` signature of each sample.
        correct: ``[num_prompts, k]`` booleans.

    Returns:
        per-prompt arrays over the prompts with at least one correct sample (prompts without one
        are left out, so the values do not simply repeat accuracy):
        ``distinct`` (number of distinct signatures), ``entropy`` (entropy in nats of the empirical
        signature distribution), ``correct`` (number of correct samples, which bounds ``distinct``),
        and ``unparsed`` (share of correct samples whose signature is ``None``).
    """
    matrix = np.asarray(correct, dtype=bool)
    if len(signatures) != matrix.shape[0] or any(len(row) != matrix.shape[1] for row in signatures):
        raise ValueError(f"signatures must match correct's shape {matrix.shape}")
    distinct, entropy, count, unparsed = [], [], [], []
    for row_signatures, row_correct in zip(signatures, matrix):
        kept = [signature for signature, ok in zip(row_signatures, row_correct) if ok]
        if not kept:
            continue
        counts = np.array(list(Counter(kept).values()), dtype=float)
        share = counts / counts.sum()
        distinct.append(len(counts))
        entropy.append(float(-(share * np.log(share)).sum()))
        count.append(len(kept))
        unparsed.append(sum(signature is None for signature in kept) / len(kept))
    return {"distinct": np.array(distinct, dtype=float), "entropy": np.array(entropy),
            "correct": np.array(count, dtype=float), "unparsed": np.array(unparsed)}
