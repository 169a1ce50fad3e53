"""The embedded task: held-out problems never leak into training, solutions are right and varied."""

from __future__ import annotations

import logging
import random

from steer.data.arithmetic import ArithmeticPrompts, ArithmeticTask
from steer.data.prompts import encode_prompts
from steer.data.records import PromptRecord
from steer.models.tiny import build_char_tokenizer
from steer.rewards.math import MathReward


def test_training_stream_is_deterministic_and_disjoint_from_heldout():
    task = ArithmeticTask(num_heldout=300)
    heldout = {tuple(sorted(map(int, r.prompt[0]["content"][8:-1].split("+")))) for r in task.heldout()}
    assert len(heldout) == 300
    stream = ArithmeticPrompts(task, seed=3)
    first = [stream[i].prompt[0]["content"] for i in range(2000)]
    assert first == [ArithmeticPrompts(task, seed=3)[i].prompt[0]["content"] for i in range(2000)]
    assert first != [ArithmeticPrompts(task, seed=4)[i].prompt[0]["content"] for i in range(2000)]
    for text in first:
        assert tuple(sorted(map(int, text[8:-1].split("+")))) not in heldout


def test_worked_solutions_are_correct_use_every_order_and_score_with_the_math_reward():
    task, rng = ArithmeticTask(), random.Random(0)
    terms = [12, 45, 30]
    solutions = {task.solution(terms, rng) for _ in range(200)}
    assert len(solutions) == 6  # 3! orders of adding three distinct numbers
    for solution in solutions:
        first, second = solution.split(". ")[0].split(", ")
        a, rest = first.split("+")
        b, s = rest.split("=")
        assert int(a) + int(b) == int(s)
    reward = MathReward(num_workers=0)
    scored = reward(sorted(solutions), [task.record(terms).reference] * len(solutions))
    assert scored.correct == [True] * 6
    assert reward(["12+45=57, 57+30=88. \\boxed{88}"], ["87"]).correct == [False]


def test_encode_prompts_applies_the_chat_template_and_drops_long_prompts_with_one_warning(caplog):
    tokenizer = build_char_tokenizer()
    records = [PromptRecord([{"role": "user", "content": "hi"}], "1"), PromptRecord("x" * 100, "2")]
    with caplog.at_level(logging.WARNING):
        kept, ids, dropped = encode_prompts(records, tokenizer, max_prompt_length=20)
    assert dropped == 1 and kept == records[:1]
    assert tokenizer.decode(ids[0]) == "Q: hi\nA: "
    assert sum("dropped 1 of 2" in message for message in caplog.messages) == 1
