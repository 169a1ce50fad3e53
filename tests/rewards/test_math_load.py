"""The math-verify worker pool under a burst of slow answers, each near the timeout: the step
stays within timeout x rounds (a round: one check per worker) and no correct answer loses its
score. The larger run with numbers is experiments/benchmarks/bench_math_burst.py."""

from __future__ import annotations

import math
import time

import pytest

pytest.importorskip("math_verify")

from steer.rewards.base import score_safely  # noqa: E402
from steer.rewards.math import MathReward  # noqa: E402
from tests.rewards.slow_verifier import slow_worker_main  # noqa: E402

# cheap for sympy, so that each check's time is the injected delay (plus a few ms)
ANSWERS = [("\\frac{1}{2}", "0.5"), ("2\\sqrt{2}", "\\sqrt{8}"), ("\\pi", "\\pi"), ("7", "8")]
TIMEOUT_S = 2.0
NUM_WORKERS = 4


def burst(count: int, delay: float) -> tuple[list[str], list[str], list[bool]]:
    """``count`` answers that each take ``delay`` x timeout; three in four are correct."""
    picked = [ANSWERS[i % len(ANSWERS)] for i in range(count)]
    responses = [f"so \\boxed{{slow{delay}:{answer}}}" for answer, _ in picked]
    return responses, [reference for _, reference in picked], [i % len(ANSWERS) != 3 for i in range(count)]


@pytest.fixture(scope="module")
def slow_reward():
    """A pool whose workers are started (spawn + sympy import) and warm, outside the timed steps."""
    reward = MathReward(num_workers=NUM_WORKERS, timeout_s=TIMEOUT_S)
    reward._worker_target = slow_worker_main
    responses, references, expected = burst(len(ANSWERS) * NUM_WORKERS, delay=0.0)
    assert reward(responses, references).correct == expected
    yield reward
    reward.close()


def test_a_burst_of_slow_answers_stays_within_timeout_times_rounds(slow_reward: MathReward) -> None:
    count, delay = 12, 0.7  # 0.7: near the timeout, with room for the check itself on a loaded machine
    responses, references, expected = burst(count, delay)
    started = time.monotonic()
    output = score_safely(slow_reward, responses, references)
    elapsed = time.monotonic() - started
    rounds = math.ceil(count / NUM_WORKERS)
    assert output.correct == expected  # no score lost to the load
    assert output.num_timeouts == 0 and output.num_errors == 0
    assert elapsed <= TIMEOUT_S * rounds, f"{elapsed:.2f} s > {TIMEOUT_S} s x {rounds} rounds"
    assert elapsed >= delay * TIMEOUT_S * rounds * 0.95  # the checks did wait: the test measures the pool


def test_answers_over_the_timeout_cost_only_their_own_score(slow_reward: MathReward) -> None:
    responses, references, expected = burst(8, delay=0.3)
    responses[1] = responses[1].replace("slow0.3:", "slow3:")  # over the timeout: the timer stops it
    expected[1] = False
    output = slow_reward(responses, references)
    assert output.correct == expected
    assert output.num_timeouts == 1 and output.num_errors == 0
