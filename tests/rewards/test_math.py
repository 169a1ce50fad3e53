"""Tests of the math reward: extraction, normalisation, math-verify equivalence, DAPO scoring,
error / timeout / crash handling, and agreement with every benchmark's own ground truths."""

from __future__ import annotations

import os
import pickle
import time
from pathlib import Path

import pytest

pytest.importorskip("math_verify")

import steer.rewards.math as math_reward  # noqa: E402
from steer.rewards.math import (  # noqa: E402
    MathReward,
    extract_answer,
    extract_free_form_answer,
    math_verify_equal,
    normalize_answer,
    strict_match,
)

DATA_DIR = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "math"
BENCHMARK_FILES = ("aime24", "aime25", "amc23", "math500", "minerva_math", "olympiadbench", "DAPO-Math-17k")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("so the result is \\boxed{5}.", "5"),
        ("first \\boxed{1}, then \\boxed{2}", "2"),
        ("\\boxed{\\frac{1}{\\sqrt{2}}}", "\\frac{1}{\\sqrt{2}}"),
        ("\\boxed{{3}}", "{3}"),
        ("\\boxed{\\{1,2\\}}", "\\{1,2\\}"),  # escaped braces are content...
        ("\\boxed{\\left\\{x\\right.} end", "\\left\\{x\\right."),  # ...even when unbalanced
        ("the answer is $\\boxed 7$", "7"),
        ("\\fbox{3}", "3"),
        ("\\boxed{4} but wait \\boxed{5", "4"),  # truncated last box: fall back to the earlier one
        ("\\boxed{} and nothing else", None),
        ("\\boxedfoo{3}", None),
        ("work...\nAnswer: 42", "42"),
        ("Answer: $\\frac{1}{2}$.", "\\frac{1}{2}"),
        ("final answer: \\(x+1\\)", "x+1"),
        ("Answer:\n\n  17\n", "17"),
        ("Answer: 1\nmore work\nAnswer: 2", "2"),
        ("Answer: 3\n\\boxed{4}", "4"),  # a box wins over an Answer line
        ("I don't know", None),
    ],
)
def test_extract_answer(text: str, expected: str | None) -> None:
    assert extract_answer(text) == expected


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ("\\text{Evelyn}", "Evelyn"),
        ("\\$18.90", "18.9"),
        ("11,111,111,100", "11111111100"),
        ("45^{\\circ}", "45"),
        ("62.5\\%", "62.5"),
        ("5 \\text{ cm}", "5"),
        ("10 dollars", "10"),
        ("x = 5", "5"),
        ("\\dfrac12", "\\frac{1}{2}"),
        ("\\sqrt2", "\\sqrt{2}"),
        ("{{3}}", "3"),
        (".35625", "0.35625"),
        ("5.0", "5"),
        ("+2", "2"),
        ("\\left( 1, 2 \\right)", "(1,2)"),
        ("6m", "6m"),  # a single letter after a number may be a variable: kept
        ("f(x)=2x", "f(x)=2x"),  # only a bare variable on the left is dropped
        ("3.", "3"),
    ],
)
def test_normalize_answer(answer: str, expected: str) -> None:
    assert normalize_answer(answer) == expected


@pytest.mark.parametrize(
    ("response", "reference", "expected"),
    [
        ("\\boxed{0.5}", "\\frac{1}{2}", True),
        ("\\boxed{\\dfrac{1}{2}}", "0.5", True),
        ("\\boxed{{3}}", "3", True),
        ("Answer: 1/2", "0.5", True),
        ("\\boxed{4.5\\times 10^{33}}", "4.5e33", True),
        ("\\boxed{(-\\infty, 2) \\cup (3, \\infty)}", "(-\\infty,2)\\cup(3,\\infty)", True),
        ("\\boxed{x^2+2x+1}", "(x+1)^2", True),
        ("\\boxed{2\\sqrt{2}}", "\\sqrt{8}", True),
        ("\\boxed{69, 84}", "69$,$84", True),
        ("\\boxed{0.49}", "\\frac{1}{2}", False),
        ("\\boxed{4}", "5", False),
        ("\\boxed{x+1}", "x-1", False),
        ("\\boxed{1.325e-27}", "2.88e-19", False),  # math-verify alone rounds both to 0
        ("no answer at all", "5", False),
    ],
)
def test_math_verify_mode_in_process(response: str, reference: str, expected: bool) -> None:
    output = MathReward(num_workers=0)([response], [reference])
    assert output.correct == [expected]
    assert output.scores == [1.0 if expected else 0.0]
    assert output.num_errors == 0 and output.num_timeouts == 0


def test_equivalence_needs_math_verify_not_the_fast_path() -> None:
    assert normalize_answer("0.5") != normalize_answer("\\frac{1}{2}")
    assert math_verify_equal("0.5", "\\frac{1}{2}")
    assert not math_verify_equal("0.5", "\\frac{1}{3}")


def test_plain_numbers_are_compared_relatively_without_sympy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(math_reward, "_math_verify", None)  # any call to math-verify would raise
    output = MathReward(num_workers=0)(
        ["\\boxed{3.89e-10}", "\\boxed{3.9e-10}", "\\boxed{1,200}", "\\boxed{0.3333333}"],
        ["3.890e-10", "3.89e-10", "1200.0", "0.33333333"],
    )
    assert output.correct == [True, False, True, True]
    assert output.num_errors == 0


def test_no_answer_rate() -> None:
    output = MathReward(num_workers=0)(["\\boxed{1}", "blah", "Answer: 2", "nothing"], ["1", "1", "2", "3"])
    assert output.correct == [True, False, True, False]
    assert output.extra["no_answer_rate"] == pytest.approx(0.5)


def test_dapo_strict_scores_plus_minus_one_on_the_tail_only() -> None:
    reward = MathReward(mode="dapo_strict")
    filler = " and so on" * 40  # > 300 characters after the answer
    responses = [
        "\\boxed{34}", "Answer: 34", "\\boxed{0.5}", "\\boxed{34}" + filler, "\\boxed{\\text{34 dollars}}", "none"
    ]
    references = ["34", "34", "\\frac{1}{2}", "34", "34", "34"]
    output = reward(responses, references)
    assert output.scores == [1.0, 1.0, -1.0, -1.0, 1.0, -1.0]
    assert output.correct == [True, True, False, False, True, False]
    # the answer beyond the tail is found by math_verify mode, which reads the whole response
    assert MathReward(num_workers=0)([responses[3]], ["34"]).correct == [True]


def test_either_mode_accepts_what_either_check_accepts() -> None:
    responses = ["\\boxed{0.5}", "\\boxed{\\text{Evelyn}}", "\\boxed{7}"]
    references = ["\\frac{1}{2}", "Evelyn", "8"]
    assert [strict_match(r, g) for r, g in zip(responses, references)] == [False, True, False]
    output = MathReward(mode="either", num_workers=0)(responses, references)
    assert output.correct == [True, True, False]
    assert output.scores == [1.0, 1.0, 0.0]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The answer is: 12", "12"),
        ("the answer is 12", "12"),
        ("So the answer is 12.", "12"),
        ("The final answer is $\\frac{3}{4}$.", "\\frac{3}{4}"),
        ("The final answer is $42$. I hope it is correct.", "42"),
        ("Final Answer: The final answer is $5$. I hope it is correct.", "5"),  # Minerva's format
        ("Answer: 7", "7"),
        ("The answer is: 1,234.", "1,234"),
        ("The answer is -5.", "-5"),
        ("The answer is 3/4.", "3/4"),
        ("The answer is \\frac{3}{4}.", "\\frac{3}{4}"),
        ("The answer is 2\\sqrt{3}.", "2\\sqrt{3}"),
        ("The answer is 2.5.", "2.5"),
        ("The answer is \\boxed{9}.", "9"),
        ("The answer is: **12**", "12"),
        ("The answer is 12 apples.", "12"),
        ("The answer is:\n\n42", "42"),
        ("The answer is (B).", "(B)"),
        # intermediate numbers are not the answer
        ("3+4=7, so the answer is 12", "12"),
        ("So the answer is 7, because 3+4=7.", "7"),
        ("The answer is: 5.\nWait, 2+4=6, I made an error.\nThe answer is: 6.", "6"),
        ("The answer is 5.\nAnswer: 6", "6"),  # a later Answer: line wins
        ("Answer: 6\nthe answer is 7.", "7"),  # and a later statement wins over it
        ("Answer: 3\nthe answer is \\boxed{4}", "4"),
        # statements that state no answer are skipped
        ("the answer is not 5", None),
        ("The answer is 7. Let me check: the answer is not 5.", "7"),
        ("2+2=4 and the answer is correct.", None),
        ("The answer is $5", None),  # unclosed: truncated
        ("The answer is N.", "N"),  # one letter reads as a choice (and scores wrong for a number)
        # without the phrase: today's behaviour
        ("3+4=7", None),
        ("work...\nAnswer: 42", "42"),
        ("I don't know", None),
    ],
)
def test_extract_free_form_answer(text: str, expected: str | None) -> None:
    assert extract_free_form_answer(text) == expected


@pytest.mark.parametrize(
    "text", ["3+4=7", "work...\nAnswer: 42", "Answer: 1\nmore work\nAnswer: 2", "\\boxed{4} but wait \\boxed{5", "none"]
)
def test_free_form_extraction_without_the_phrase_is_the_strict_one(text: str) -> None:
    assert extract_free_form_answer(text) == extract_answer(text)


def test_free_form_statements_score_in_the_free_form_modes_only() -> None:
    responses = ["The answer is: 1,234.", "3+4=7, so the answer is 12", "The final answer is $\\frac{1}{2}$.", "Answer: 7"]
    references = ["1234", "7", "0.5", "7"]
    for mode in ("math_verify", "either"):
        output = MathReward(mode=mode, num_workers=0)(responses, references)
        assert output.correct == [True, False, True, True], mode
        assert output.extra["no_answer_rate"] == 0.0
    strict = MathReward(mode="dapo_strict", num_workers=0)(responses, references)
    assert strict.correct == [False, False, False, True]  # DAPO's rule reads a box or an Answer: line only
    assert strict.extra["no_answer_rate"] == 0.75
    # majority voting reads what the mode scores
    assert MathReward(num_workers=0).extract_answer("The answer is: 1,234.") == "1234"
    assert MathReward(mode="dapo_strict", num_workers=0).extract_answer("The answer is: 1,234.") is None


def test_custom_scores_and_bad_arguments() -> None:
    output = MathReward(num_workers=0, correct_score=2.0, wrong_score=-0.5)(["\\boxed{1}", "\\boxed{2}"], ["1", "3"])
    assert output.scores == [2.0, -0.5]
    with pytest.raises(ValueError, match="valid modes"):
        MathReward(mode="exact")
    with pytest.raises(ValueError, match="references"):
        MathReward(num_workers=0)(["a"], ["1", "2"])


def test_a_raising_check_scores_wrong_and_counts_as_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def explode_on_boom(answer: str, reference: str) -> bool:
        if answer == "boom":
            raise RuntimeError("sympy blew up")
        return answer == "y"

    monkeypatch.setattr(math_reward, "math_verify_equal", explode_on_boom)
    output = MathReward(num_workers=0, wrong_score=-1.0)(["\\boxed{boom}", "\\boxed{y}"], ["x", "z"])
    assert output.scores == [-1.0, 1.0]
    assert output.correct == [False, True]
    assert output.num_errors == 1 and output.num_timeouts == 0


def test_a_slow_check_times_out_in_process(monkeypatch: pytest.MonkeyPatch) -> None:
    def slow_unless_fast(answer: str, reference: str) -> bool:
        if answer == "slow":
            time.sleep(60)
        return True

    monkeypatch.setattr(math_reward, "math_verify_equal", slow_unless_fast)
    started = time.monotonic()
    output = MathReward(num_workers=0, timeout_s=0.2)(["\\boxed{slow}", "\\boxed{x}"], ["1", "2"])
    assert time.monotonic() - started < 5
    assert output.correct == [False, True]
    assert output.num_timeouts == 1 and output.num_errors == 0


# Worker stand-ins for the pool tests. They are module-level so that spawned processes can import
# them; they answer "correct" for everything except the answers that make them misbehave.
def _misbehaving_worker(conn, timeout_s: float) -> None:
    conn.send("ready")
    while (batch := conn.recv()) is not None:
        for answer, _ in batch:
            if answer == "hang":
                time.sleep(3600)  # no alarm here: only the parent's deadline can stop this
            if answer == "crash":
                os._exit(1)
            if answer == "nap":
                time.sleep(0.1)
            conn.send(("ok", True))


def test_pool_kills_a_stuck_worker_and_a_crashed_one_and_goes_on() -> None:
    reward = MathReward(num_workers=1, timeout_s=0.3)
    reward._worker_target = _misbehaving_worker
    try:
        started = time.monotonic()
        output = reward(["\\boxed{a}", "\\boxed{hang}", "\\boxed{b}", "\\boxed{crash}", "\\boxed{c}"], ["1"] * 5)
        assert time.monotonic() - started < 60
        assert output.correct == [True, False, True, False, True]
        assert output.num_timeouts == 1 and output.num_errors == 1
        # the replaced worker keeps serving
        assert reward(["\\boxed{d}"], ["1"]).correct == [True]
    finally:
        reward.close()


def test_pool_agrees_with_in_process_and_survives_pickling() -> None:
    responses = ["\\boxed{0.5}", "\\boxed{3}", "\\boxed{x^2-1}", "\\boxed{\\sqrt{8}}", "nothing", "\\boxed{2}"]
    references = ["\\frac{1}{2}", "4", "(x-1)(x+1)", "2\\sqrt{2}", "1", "2"]
    expected = MathReward(num_workers=0)(responses, references)
    reward = MathReward(num_workers=2)
    try:
        output = reward(responses, references)
        assert output.correct == expected.correct == [True, False, True, True, False, True]
        clone = pickle.loads(pickle.dumps(reward))  # a used reward pickles without its processes
        assert clone._workers == [] and clone.num_workers == 2
    finally:
        reward.close()
        reward.close()  # idempotent


def _ground_truth_rows(name: str, limit: int | None) -> list[str]:
    if not DATA_DIR.is_dir():
        pytest.skip(f"benchmark data not found at {DATA_DIR}")
    import pyarrow.parquet as pq

    reward_models = pq.read_table(DATA_DIR / f"{name}.parquet", columns=["reward_model"]).column(0).to_pylist()
    references = [row["ground_truth"] for row in reward_models]
    if limit is None:
        return references
    unique = list(dict.fromkeys(references))
    return unique[:: max(1, len(unique) // limit)][:limit]


def _assert_ground_truths_score_correct(references: list[str], self_check: int | None) -> None:
    responses = [f"The answer is \\boxed{{{reference}}}" for reference in references]
    for mode in ("math_verify", "dapo_strict"):
        output = MathReward(mode=mode, num_workers=0)(responses, references)
        failures = [reference for reference, ok in zip(references, output.correct) if not ok]
        assert failures == [], mode
    # math-verify alone (no string fast path) must also accept each ground truth against itself,
    # and must reject the next distinct ground truth (a different problem's answer)
    subset = list(dict.fromkeys(references))[:self_check]
    assert [gt for gt in subset if not math_verify_equal(extract_answer(f"\\boxed{{{gt}}}"), gt)] == []
    pairs = [(other, gt) for gt, other in zip(subset, subset[1:] + subset[:1])]
    wrong_pairs = [(other, gt) for other, gt in pairs if normalize_answer(other) != normalize_answer(gt)]
    output = MathReward(num_workers=0)([f"\\boxed{{{other}}}" for other, _ in wrong_pairs], [gt for _, gt in wrong_pairs])
    assert [pair for pair, ok in zip(wrong_pairs, output.correct) if ok] == []


@pytest.mark.parametrize("name", BENCHMARK_FILES)
def test_ground_truth_answers_score_correct_on_a_sample(name: str) -> None:
    _assert_ground_truths_score_correct(_ground_truth_rows(name, limit=40), self_check=12)


@pytest.mark.slow
@pytest.mark.parametrize("name", BENCHMARK_FILES)
def test_ground_truth_answers_score_correct_on_every_row(name: str) -> None:
    _assert_ground_truths_score_correct(_ground_truth_rows(name, limit=None), self_check=None)


# --- regressions: exact integers, the decimal rule, display delimiters in ground truths ---------


@pytest.mark.parametrize("mode", ["math_verify", "either", "dapo_strict"])
def test_a_large_wrong_integer_is_wrong(mode: str) -> None:
    """``\\boxed{4064257}`` was scored correct for 4064256: plain numbers were compared with a
    relative tolerance of 1e-6 before math-verify."""
    responses = ["\\boxed{4064257}", "\\boxed{4064256}", "\\boxed{4,064,256}", "\\boxed{4064256.0}", "\\boxed{4064255}"]
    output = MathReward(mode=mode, num_workers=0)(responses, ["4064256"] * len(responses))
    assert output.correct == [False, True, True, True, False]


@pytest.mark.parametrize(
    ("answer", "reference", "expected"),
    [
        ("4064257", "4064256", False),
        ("123456789012345678901", "123456789012345678902", False),
        ("1" + "0" * 300, "1" + "0" * 299 + "1", False),
        ("4064256.0", "4064256", True),  # integers compare by value ...
        ("4.064256e6", "4,064,256", True),
        ("3.0000001", "3", False),  # ... and exactly, even against a near-integer decimal
        ("4064257.5", "4064256.5", False),  # decimals: within half a unit of the coarser last digit
        ("3.14159", "3.14159265", True),
        ("0.3333333", "0.33333333", True),
        ("0.333", "0.33333333", False),  # within half a unit of 0.333 but not within 1e-6 relative
        ("3.9e-10", "3.89e-10", False),
        ("1.325e-27", "2.88e-19", False),
        ("1e999999999", "1e999999998", False),  # beyond float range: still exact, no overflow
    ],
)
def test_numbers_equal_rule(answer: str, reference: str, expected: bool) -> None:
    assert math_reward.numbers_equal(answer, reference) is expected
    assert math_reward.numbers_equal(reference, answer) is expected  # symmetric


@pytest.mark.parametrize(
    "reference", ["\\[ 5+\\sqrt{3} \\]", "\\( 5+\\sqrt{3} \\)", "$5+\\sqrt{3}$", "$$ 5+\\sqrt{3} $$", "5+\\sqrt{3}"]
)
@pytest.mark.parametrize("mode", ["math_verify", "either", "dapo_strict"])
def test_ground_truths_in_display_delimiters_are_normalised_like_responses(reference: str, mode: str) -> None:
    responses = ["\\boxed{5+\\sqrt{3}}", "Answer: $5 + \\sqrt{3}$", "\\boxed{5-\\sqrt{3}}"]
    output = MathReward(mode=mode, num_workers=0)(responses, [reference] * 3)
    assert output.correct == [True, True, False]
    assert normalize_answer(reference) == normalize_answer("5+\\sqrt{3}")


def test_display_delimited_numbers_compare_as_numbers() -> None:
    assert math_reward.numbers_equal("\\[ 4064256 \\]", "4064256") is True
    assert math_reward.numbers_equal("4064257", "$4064256$") is False


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # the dropped one
def test_a_timeout_swallowed_by_a_finaliser_is_raised_again(monkeypatch: pytest.MonkeyPatch) -> None:
    """The garbage collector may run a ``__del__`` during the check just when the alarm fires;
    Python prints and drops an exception raised there. The alarm repeats, so the check still stops."""
    import gc

    class SwallowsInDel:
        def __del__(self):
            time.sleep(0.5)  # the alarm fires in here and its CheckTimeout is dropped

    def slow_check(answer: str, reference: str) -> bool:
        cycle = SwallowsInDel()
        cycle.self = cycle
        del cycle
        gc.collect()  # runs __del__ while the first alarm is due
        time.sleep(30)
        return True

    monkeypatch.setattr(math_reward, "math_verify_equal", slow_check)
    started = time.monotonic()
    assert math_reward.checked_math_verify("x", "y", 0.2) == ("timeout", False)
    assert time.monotonic() - started < 5
    time.sleep(0.2)  # the repeating timer is off again: no stray alarm reaches us here
    assert not math_reward._Alarm.active


def _slow_to_restart_worker(conn, timeout_s: float) -> None:
    """Like _misbehaving_worker, but every start after the first two takes 3 s (a replacement
    importing sympy on a loaded machine). Starts are counted in a file named after the parent."""
    with open(f"/tmp/steer-test-starts-{os.getppid()}", "a") as file:
        file.write("start\n")
    with open(f"/tmp/steer-test-starts-{os.getppid()}") as file:
        if len(file.readlines()) > 2:
            time.sleep(3)
    _misbehaving_worker(conn, timeout_s)


def test_a_replacement_worker_starts_in_the_background() -> None:
    """While the replacement of a killed worker starts, the other worker serves the batch."""
    counter = Path(f"/tmp/steer-test-starts-{os.getpid()}")
    counter.unlink(missing_ok=True)
    reward = MathReward(num_workers=2, timeout_s=0.3)
    reward._worker_target = _slow_to_restart_worker
    try:
        reward(["\\boxed{a}", "\\boxed{b}"], ["1", "1"])  # both workers up
        started = time.monotonic()
        # slot 0 hangs (killed after 1.3 s) while slot 1 naps through about 13 tasks; 6 remain
        output = reward(["\\boxed{hang}"] + ["\\boxed{nap}"] * 19, ["1"] * 20)
        elapsed = time.monotonic() - started
        assert output.correct == [False] + [True] * 19
        assert output.num_timeouts == 1
        assert elapsed < 3.5, f"{elapsed:.2f} s: the step waited for the replacement to start"
    finally:
        reward.close()
        counter.unlink(missing_ok=True)
