"""A math-verify worker whose checks are slow on purpose, for load tests of the worker pool.

An answer written ``slow<f>:<answer>`` (e.g. ``slow0.8:\\frac{1}{2}``) waits ``f`` x the reward's
timeout, then is checked by the real ``math_verify_equal`` (inside the real worker loop, under the
real per-check timer). Module-level so that spawned workers can import it.
"""

from __future__ import annotations

import time

import steer.rewards.math as math_reward

_real_math_verify_equal = math_reward.math_verify_equal


def slow_math_verify_equal(answer: str, reference: str) -> bool:
    if answer.startswith("slow") and ":" in answer:
        head, answer = answer.split(":", 1)
        time.sleep(float(head[4:]) * math_reward._Alarm.timeout_s)
    return _real_math_verify_equal(answer, reference)


def slow_worker_main(conn, timeout_s: float) -> None:
    math_reward.math_verify_equal = slow_math_verify_equal
    math_reward._worker_main(conn, timeout_s)
