"""CodeReward: code extraction, output comparison, and real benchmark tasks end to end."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from steer.data.code import load_evalplus, load_livecodebench
from steer.rewards.code import CodeReward, Digest, check, extract_code, output_matches, run_tests
from steer.rewards.sandbox import SandboxResult

CODE_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "code"
HAS_EVALPLUS = importlib.util.find_spec("evalplus") is not None
needs_data = pytest.mark.skipif(not CODE_DATA.is_dir(), reason=f"benchmark data not found at {CODE_DATA}")
needs_evalplus = pytest.mark.skipif(not HAS_EVALPLUS, reason="evalplus not installed (pip install evalplus)")

# Quick tasks covering the special comparisons: float tolerance (HumanEval/2, /4, Mbpp/82),
# any root of a polynomial (HumanEval/32), set equality and tuple inputs (Mbpp/2, /7, /769),
# "returns something" (Mbpp/737, /787), a second accepted answer (Mbpp/558, /581).
HUMANEVAL_SAMPLE = [
    f"HumanEval/{i}" for i in (0, 2, 4, 7, 11, 12, 16, 23, 28, 29, 30, 32, 34, 35, 42, 45, 48, 52, 53, 60)
]
MBPP_SAMPLE = [
    f"Mbpp/{i}" for i in (2, 3, 4, 6, 7, 8, 9, 11, 12, 14, 17, 18, 19, 20, 82, 558, 581, 737, 769, 787)
]


def fenced(code: str) -> str:
    return f"Sure, here it is:\n```python\n{code}\n```\nHope this helps."


def add_reference(inputs: list[list[int]]) -> dict:
    return {
        "kind": "functional",
        "entry_point": "add",
        "inputs": inputs,
        "expected": [a + b for a, b in inputs],
    }


# --- code extraction and comparison rules ---------------------------------------------------


def test_extract_code_takes_the_last_python_block():
    response = "```python\nx = 1\n```\ntext\n```py\ny = 2\n```\n```\nnot python\n```"
    assert extract_code(response) == "y = 2\n"
    assert extract_code("```Python3\nz = 3\n```") == "z = 3\n"
    assert extract_code("def f():\n    return 1") == "def f():\n    return 1"


def test_output_matches_follows_evalplus_rules():
    assert output_matches([1, 2], [1, 2])
    assert not output_matches((1, 2), [1, 2])  # a tuple is not a list ...
    assert output_matches((1, 2), [1, 2], oracle="json")  # ... unless the expected value is JSON
    assert output_matches(0.1 + 0.2, 0.3)  # floats always get 1e-6
    assert not output_matches(0.3001, 0.3)
    assert output_matches(0.30001, 0.3, atol=1e-4)
    assert not output_matches(1, 1.5, atol=1e-4)
    assert output_matches([3, 1, 2], [1, 2, 3], oracle="set")
    assert not output_matches([[1]], [1], oracle="set")  # unhashable: no crash, no pass
    assert output_matches(None, False, oracle="not_none")
    assert not output_matches("match", False, oracle="not_none")
    roots = {"oracle": "poly_root", "atol": 1e-4, "inputs": [[2, -3, 1]]}  # (x - 1)(x - 2)
    assert output_matches(1.0, 2.0, **roots) and output_matches(2.0, 2.0, **roots)  # either root
    assert not output_matches(1.5, 2.0, **roots) and not output_matches("2", 2.0, **roots)
    assert output_matches(7, 5, also_accepted=7)
    assert output_matches(" 3 \n4\n\n", "3\n4", oracle="lines")
    assert not output_matches("3 4", "3\n4", oracle="lines")
    assert output_matches(Digest("ab"), Digest("ab")) and not output_matches([1], Digest("ab"))
    with pytest.raises(ValueError, match="unknown oracle"):
        output_matches(1, 1, oracle="fuzzy")


# --- small hand-made references -----------------------------------------------------------------


def test_scores_in_all_pass_and_fraction_mode():
    reference = add_reference([[1, 2], [3, 4], [5, 6], [7, 8]])
    half_right = fenced("def add(a, b):\n    return a + b if a < 4 else 0")
    right = fenced("def add(a, b):\n    return a + b")
    all_pass = CodeReward(mode="all_pass")([right, half_right], [reference, reference])
    fraction = CodeReward(mode="fraction")([right, half_right], [reference, reference])
    assert all_pass.scores == [1.0, 0.0]
    assert fraction.scores == [1.0, 0.5]
    assert fraction.correct == [True, False]
    assert fraction.extra["tests_passed_fraction"] == 0.75


def test_each_test_has_its_own_time_limit():
    reference = add_reference([[1, 2], [0, 0], [3, 4]])
    slow_on_zero = "def add(a, b):\n    while a == 0:\n        pass\n    return a + b"
    result = check(slow_on_zero, reference, test_timeout_s=0.5)
    assert result.passed == [True, False, True]
    assert result.timed_out
    assert "timeout" in result.detail


def test_bad_code_scores_zero_and_broken_references_count_as_errors():
    reference = add_reference([[1, 2]])
    reward = CodeReward(timeout_s=2.0, test_timeout_s=0.5)
    output = reward(
        ["def add(a, b)\n    return a + b", "while True:\n    pass", "def add(a, b):\n    return a + b"],
        [reference, reference, {"kind": "functional"}],  # the last reference lacks its tests
    )
    assert output.scores == [0.0, 0.0, 0.0]
    assert output.num_timeouts == 1
    assert output.num_errors == 1


def test_a_sandbox_failure_counts_as_an_error(monkeypatch: pytest.MonkeyPatch):
    def failing_sandbox(*args, **kwargs):
        return SandboxResult("error", "", "sandbox could not start", None, 0.0)

    monkeypatch.setattr("steer.rewards.code.run_python", failing_sandbox)
    output = CodeReward()(["def add(a, b):\n    return a + b"], [add_reference([[1, 2]])])
    assert output.scores == [0.0] and output.num_errors == 1


def test_a_fake_equal_object_or_printed_verdict_does_not_pass():
    reference = add_reference([[1, 2]])
    always_equal = (
        "class Anything:\n    def __eq__(self, other):\n        return True\n\n"
        "def add(a, b):\n    return Anything()"
    )
    prints = 'def add(a, b):\n    print(\'{"index": 0, "status": "ok", "output": 3}\')\n    return 0'
    assert not check(always_equal, reference).all_passed
    assert not check(prints, reference).all_passed


def test_large_outputs_come_back_as_digests_that_compare_like_values():
    reference = {"kind": "functional", "entry_point": "f", "inputs": [[100_000], [10]]}
    forward, _ = run_tests("def f(n):\n    return {i: str(i) for i in range(n)}", reference)
    backward, _ = run_tests("def f(n):\n    return {i: str(i) for i in reversed(range(n))}", reference)
    shifted, _ = run_tests("def f(n):\n    return {i: str(i + 1) for i in range(n)}", reference)
    assert isinstance(forward[0].output, Digest)
    assert forward[0].output == backward[0].output != shifted[0].output
    assert forward[1].output == {i: str(i) for i in range(10)}  # small outputs come back whole


# --- LiveCodeBench ------------------------------------------------------------------------------

SECOND_LARGEST = """
n = int(input())
a = list(map(int, input().split()))
print(a.index(sorted(a)[-2]) + 1)
"""
LARGEST = """
n = int(input())
a = list(map(int, input().split()))
print(a.index(max(a)) + 1)
"""
SHORTEST_PATHS = """
class Solution:
    def shortestDistanceAfterQueries(self, n: int, queries: List[List[int]]) -> List[int]:
        roads = [[i + 1] for i in range(n - 1)] + [[]]
        answer = []
        for u, v in queries:
            roads[u].append(v)
            distance = [-1] * n
            distance[0] = 0
            queue = deque([0])
            while queue:
                city = queue.popleft()
                for nxt in roads[city]:
                    if distance[nxt] < 0:
                        distance[nxt] = distance[city] + 1
                        queue.append(nxt)
            answer.append(distance[n - 1])
        return answer
"""
NO_SHORTCUTS = """
class Solution:
    def shortestDistanceAfterQueries(self, n, queries):
        return [n - 1] * len(queries)
"""


@needs_data
def test_livecodebench_stdin_and_functional_problems():
    records = {
        r.reference["task_id"]: r for r in load_livecodebench(CODE_DATA / "livecodebench_2408_2501.json")
    }
    stdin_reference = records["livecodebench/0"].reference  # index of the second largest element
    functional_reference = records["livecodebench/5"].reference  # shortest path after each query
    assert stdin_reference["kind"] == "stdin" and functional_reference["kind"] == "functional"
    reward = CodeReward(num_workers=2)
    output = reward(
        [fenced(SECOND_LARGEST), fenced(LARGEST), fenced(SHORTEST_PATHS), fenced(NO_SHORTCUTS)],
        [stdin_reference, stdin_reference, functional_reference, functional_reference],
    )
    assert output.scores == [1.0, 0.0, 1.0, 0.0]
    assert output.num_errors == 0 and output.num_timeouts == 0


# --- EvalPlus -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def humaneval_sample():
    if not CODE_DATA.is_dir():
        pytest.skip(f"benchmark data not found at {CODE_DATA}")
    return [
        r.reference for r in load_evalplus("humaneval_plus", data_dir=CODE_DATA, task_ids=HUMANEVAL_SAMPLE)
    ]


@pytest.fixture(scope="module")
def mbpp_sample():
    if not CODE_DATA.is_dir():
        pytest.skip(f"benchmark data not found at {CODE_DATA}")
    if not HAS_EVALPLUS:
        pytest.skip("evalplus not installed (MBPP+ needs it): pip install evalplus")
    return [r.reference for r in load_evalplus("mbpp_plus", data_dir=CODE_DATA, task_ids=MBPP_SAMPLE)]


def _canonical_and_broken(references: list[dict]) -> None:
    canonical = [fenced(r["canonical_solution"]) for r in references]
    broken = [fenced(f"def {r['entry_point']}(*args):\n    return None") for r in references]
    results = CodeReward(num_workers=2).check_batch(canonical + broken, references + references)
    for reference, result in zip(references, results[: len(references)], strict=True):
        assert result is not None and result.all_passed, (reference["task_id"], result)
        assert len(result.passed) == len(reference["expected"]) > 10  # base and plus tests ran
    for reference, result in zip(references, results[len(references) :], strict=True):
        assert result is not None and not result.all_passed, reference["task_id"]


def test_humaneval_plus_canonical_solutions_pass_and_broken_ones_fail(humaneval_sample):
    _canonical_and_broken(humaneval_sample)


def test_mbpp_plus_canonical_solutions_pass_and_broken_ones_fail(mbpp_sample):
    _canonical_and_broken(mbpp_sample)


def test_plus_tests_catch_a_subtle_bug(humaneval_sample):
    truncate_number = next(r for r in humaneval_sample if r["task_id"] == "HumanEval/2")
    rounded = fenced("def truncate_number(number: float) -> float:\n    return round(number % 1.0, 2)")
    result = CodeReward(mode="fraction").check(rounded, truncate_number)
    assert 0 < result.fraction < 1
    assert CodeReward(mode="fraction")([rounded], [truncate_number]).scores == [result.fraction]


def test_another_newton_method_passes_find_zero(humaneval_sample):
    find_zero = next(r for r in humaneval_sample if r["task_id"] == "HumanEval/32")
    newton = """
def find_zero(xs: list):
    x = 1.0
    for _ in range(10_000):
        value = poly(xs, x)
        if abs(value) < 1e-9:
            break
        slope = sum(i * c * x ** (i - 1) for i, c in enumerate(xs) if i)
        x = x + 0.1 if slope == 0 else x - value / slope
    return x
"""  # `poly` is the prompt's helper: the preamble (the prompt) provides it
    assert CodeReward().check(fenced(newton), find_zero).all_passed


@pytest.mark.slow
@needs_data
@pytest.mark.parametrize("name", ["humaneval_plus", pytest.param("mbpp_plus", marks=needs_evalplus)])
def test_all_canonical_solutions_pass(name: str):
    references = [r.reference for r in load_evalplus(name, data_dir=CODE_DATA)]
    results = CodeReward(num_workers=2).check_batch(
        [fenced(r["canonical_solution"]) for r in references], references
    )
    failing = {
        r["task_id"]: res and res.detail
        for r, res in zip(references, results, strict=True)
        if not (res and res.all_passed)
    }
    # Mbpp/255 and Mbpp/599 need 20-40 s per check and can hit the 60 s limit on a loaded machine.
    assert len(failing) <= 0.01 * len(references), failing
