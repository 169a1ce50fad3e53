"""Tests of the benchmark metrics against brute-force references."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from steer.data.arithmetic import ArithmeticTask, order_signature
from steer.eval.metrics import bootstrap_ci, maj_at_k, mean_at_k, pass_at_k, pass_at_k_mean, solution_diversity


def brute_force_pass_at_k(num_samples: int, num_correct: int, k: int) -> float:
    """Fraction of all k-subsets of the samples that contain at least one correct sample."""
    subsets = list(itertools.combinations(range(num_samples), k))
    return sum(any(i < num_correct for i in subset) for subset in subsets) / len(subsets)


def test_mean_at_k() -> None:
    assert mean_at_k([[1, 0, 0, 1], [1, 1, 1, 1], [0, 0, 0, 0]]) == pytest.approx(0.5)
    assert mean_at_k(np.array([[True, False]])) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="matrix"):
        mean_at_k([1, 0, 1])


@pytest.mark.parametrize("num_samples", range(1, 8))
def test_pass_at_k_matches_brute_force(num_samples: int) -> None:
    for num_correct in range(num_samples + 1):
        for k in range(1, num_samples + 1):
            assert pass_at_k(num_samples, num_correct, k) == pytest.approx(
                brute_force_pass_at_k(num_samples, num_correct, k), abs=1e-12
            )


def test_pass_at_k_large_n_is_stable_and_closed_form() -> None:
    assert pass_at_k(1000, 1, 1) == pytest.approx(0.001)
    expected = 1 - math.comb(1024 - 7, 64) / math.comb(1024, 64)
    assert pass_at_k(1024, 7, 64) == pytest.approx(expected, rel=1e-12)


def test_pass_at_k_rejects_impossible_arguments() -> None:
    with pytest.raises(ValueError, match="k <= n"):
        pass_at_k(4, 1, 5)
    with pytest.raises(ValueError, match="num_correct"):
        pass_at_k(4, 5, 1)
    with pytest.raises(ValueError, match="k <= n"):
        pass_at_k_mean([[1, 0]], k=3)


def test_pass_at_k_mean_averages_prompts_and_pass_at_1_is_mean_at_k() -> None:
    correct = np.array([[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0]], dtype=bool)
    expected = np.mean([brute_force_pass_at_k(4, int(c), 2) for c in correct.sum(axis=1)])
    assert pass_at_k_mean(correct, 2) == pytest.approx(expected)
    assert pass_at_k_mean(correct, 1) == pytest.approx(mean_at_k(correct))


def test_maj_at_k() -> None:
    answers = [
        ["3", "4", "4", "3", "4"],  # k=5: "4" wins 3-2 (correct); k=4: tie 2-2, first seen "3" wins (wrong)
        [None, None, "7", "8"],  # None never wins: tie 7 vs 8 -> "7" (wrong)
        [None, None],  # no answer at all: wrong
        ["1", "2", "2", "2"],  # k=2: tie -> "1" (wrong); k=4: "2" wins 3-1 (correct)
    ]
    correct = [
        [False, True, True, False, True],
        [False, False, False, True],
        [False, False],
        [False, True, True, True],
    ]
    assert maj_at_k([answers[0]], [correct[0]], k=5) == 1.0
    assert maj_at_k([answers[0]], [correct[0]], k=4) == 0.0
    assert maj_at_k([answers[1]], [correct[1]], k=4) == 0.0
    assert maj_at_k([answers[2]], [correct[2]], k=2) == 0.0
    assert maj_at_k([answers[3]], [correct[3]], k=2) == 0.0
    assert maj_at_k([answers[3]], [correct[3]], k=4) == 1.0
    three = [0, 3, 1]  # wrong, right, wrong at k=4
    assert maj_at_k([answers[i] for i in three], [correct[i] for i in three], k=4) == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="k <= n"):
        maj_at_k([["1"]], [[True]], k=2)


def test_bootstrap_ci_contains_the_mean_is_deterministic_and_shrinks() -> None:
    rng = np.random.default_rng(1)
    small = rng.random(30) < 0.4
    large = rng.random(3000) < 0.4
    low, high = bootstrap_ci(small)
    assert low <= small.mean() <= high
    assert bootstrap_ci(small) == (low, high)  # seeded
    large_low, large_high = bootstrap_ci(large)
    assert large_low <= large.mean() <= large_high
    assert large_high - large_low < (high - low) / 5  # ~ 1/sqrt(100) = 1/10 expected
    # against the normal approximation, which is accurate for 3000 prompts
    normal_width = 2 * 1.959964 * large.std() / math.sqrt(large.size)
    assert large_high - large_low == pytest.approx(normal_width, rel=0.15)


def test_bootstrap_ci_edge_cases() -> None:
    assert bootstrap_ci([0.25] * 10) == (0.25, 0.25)
    with pytest.raises(ValueError):
        bootstrap_ci([])
    with pytest.raises(ValueError):
        bootstrap_ci([1.0, 0.0], confidence=1.5)


def test_pass_at_16_and_32_of_a_known_32_sample_matrix() -> None:
    """The study's large k: per prompt 1 - C(32-c, k) / C(32, k) (exact integers), then the mean."""
    rng = np.random.default_rng(3)
    correct = rng.random((5, 32)) < np.array([[0.0], [0.03], [0.1], [0.5], [1.0]])
    correct[1, :] = False
    correct[1, 7] = True  # one correct sample in 32: pass@16 = 1/2, pass@32 = 1
    for k in (16, 32):
        expected = np.mean([1 - math.comb(32 - int(c), k) / math.comb(32, k) for c in correct.sum(axis=1)])
        assert pass_at_k_mean(correct, k) == pytest.approx(expected, abs=1e-12)
    assert pass_at_k(32, 1, 16) == pytest.approx(0.5)
    assert pass_at_k(32, 1, 32) == 1.0 and pass_at_k(32, 0, 32) == 0.0


def test_order_signature_parses_the_worked_line_and_tells_orders_apart() -> None:
    assert order_signature("45+30=75, 75+12=87. \\boxed{87}") == (45, 30, 12)
    assert order_signature("12+30=42, 42+45=87. \\boxed{87}") == (12, 30, 45)
    assert order_signature("45+30=76, 76+12=87. \\boxed{87}") == (45, 30, 12)  # a slip in a partial sum: same order
    assert order_signature("30+45=75, 75+12=87. \\boxed{87}") != order_signature("45+30=75, 75+12=87. \\boxed{87}")
    assert order_signature("\\boxed{87}") is None and order_signature("no idea") is None
    assert order_signature("4+5=9. \\boxed{1+2=3}") == (4, 5)  # the boxed part is never a step
    # Every one of the task's own worked solutions parses, and the 6 orders of 3 terms give 6 signatures.
    import random

    terms = [12, 45, 30]
    seen = {order_signature(ArithmeticTask.solution(terms, random.Random(seed))) for seed in range(200)}
    assert len(seen) == 6 and None not in seen
    assert all(sorted(order) == sorted(terms) for order in seen)


def test_solution_diversity_counts_distinct_signatures_among_correct_samples() -> None:
    a, b, c = ((1, 2), (3, 3)), ((2, 1), (3, 3)), ((3, 3), (6, 3))
    signatures = [[a, a, b, c], [a, b, None, None], [c, c, c, c]]
    correct = [[True, True, True, False],   # a, a, b correct: 2 orders, shares 2/3, 1/3
               [True, False, True, True],   # a, None, None: 2 classes (None counts as one), 1/3 unparsed x2
               [False, False, False, False]]  # no correct sample: left out
    result = solution_diversity(signatures, correct)
    assert result["distinct"].tolist() == [2, 2]
    assert result["correct"].tolist() == [3, 3]
    h = -(2 / 3 * math.log(2 / 3) + 1 / 3 * math.log(1 / 3))
    assert result["entropy"] == pytest.approx([h, h])
    assert result["unparsed"] == pytest.approx([0.0, 2 / 3])
    with pytest.raises(ValueError, match="shape"):
        solution_diversity([[a]], correct)
    empty = solution_diversity([[a, b]], [[False, False]])
    assert empty["distinct"].size == 0
