"""Loaders of the code benchmarks: HumanEval+, MBPP+ (EvalPlus) and LiveCodeBench."""

from __future__ import annotations

import gzip
import importlib.util
import json
import re
import sys
import types
from pathlib import Path

import pytest

from steer.data.code import LIVECODEBENCH_PREAMBLE, load_evalplus, load_livecodebench

CODE_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "code"
HAS_EVALPLUS = importlib.util.find_spec("evalplus") is not None
pytestmark = pytest.mark.skipif(not CODE_DATA.is_dir(), reason=f"benchmark data not found at {CODE_DATA}")


def _raw_tasks(file_name: str) -> dict[str, dict]:
    with gzip.open(CODE_DATA / file_name, "rt") as file:
        return {task["task_id"]: task for task in map(json.loads, file)}


@pytest.mark.parametrize(
    ("file_name", "size", "num_stdin"),
    [("livecodebench_2408_2501.json", 279, 175), ("livecodebench_v5_public.json", 879, 498)],
)
def test_livecodebench_both_layouts(file_name: str, size: int, num_stdin: int):
    records = load_livecodebench(CODE_DATA / file_name)
    assert len(records) == size
    assert sum(r.reference["kind"] == "stdin" for r in records) == num_stdin
    for record in records:
        reference = record.reference
        assert record.data_source == "livecodebench"
        assert record.prompt[0]["role"] == "user" and "```python" in record.prompt[0]["content"]
        assert reference["preamble"] == LIVECODEBENCH_PREAMBLE
        assert len(reference["inputs"]) == len(reference["expected"]) >= 1
        if reference["kind"] == "functional":
            assert reference["oracle"] == "json"
            method = reference["entry_point"].removeprefix("Solution.")
            signature = re.search(
                rf"def {method}\(self,?(.*?)\)\s*(->|:)", record.prompt[0]["content"], re.DOTALL
            )
            num_parameters = len([p for p in signature.group(1).split(",") if p.strip()])
            assert all(len(args) == num_parameters for args in reference["inputs"]), reference["task_id"]
        else:
            assert reference["oracle"] == "lines"
            assert all(isinstance(text, str) for text in reference["inputs"] + reference["expected"])


def test_livecodebench_functional_tests_are_parsed_json():
    records = load_livecodebench(CODE_DATA / "livecodebench_2408_2501.json")
    reference = records[5].reference
    assert reference["entry_point"] == "Solution.shortestDistanceAfterQueries"
    assert reference["inputs"][0] == [5, [[2, 4], [0, 2], [0, 4]]]
    assert reference["expected"][0] == [3, 2, 1]
    assert "class Solution:" in records[5].prompt[0]["content"]


def test_humaneval_plus_references():
    raw = _raw_tasks("HumanEvalPlus.jsonl.gz")
    task_ids = ["HumanEval/0", "HumanEval/32"]
    plus = load_evalplus("humaneval_plus", CODE_DATA / "HumanEvalPlus.jsonl.gz", task_ids=task_ids)
    base = load_evalplus("humaneval_plus", data_dir=CODE_DATA, tests="base", task_ids=task_ids)
    for record, base_record, task_id in zip(plus, base, task_ids, strict=True):
        reference, task = record.reference, raw[task_id]
        assert record.data_source == "humaneval_plus"
        assert task["prompt"] in record.prompt[0]["content"]
        assert reference["task_id"] == task_id and reference["entry_point"] == task["entry_point"]
        assert reference["inputs"] == task["base_input"] + task["plus_input"]
        assert len(reference["expected"]) == len(reference["reference_times"]) == len(reference["inputs"])
        assert reference["dropped_tests"] == 0
        assert reference["preamble"] == task["prompt"]  # the prompt's imports and helpers
        assert base_record.reference["inputs"] == task["base_input"]
    has_close_elements, find_zero = (record.reference for record in plus)
    assert has_close_elements["expected"][:2] == [True, False]  # from the docstring of HumanEval/0
    assert has_close_elements["oracle"] == "exact" and has_close_elements["atol"] == 0
    assert find_zero["oracle"] == "poly_root" and find_zero["atol"] == 1e-4


@pytest.mark.skipif(not HAS_EVALPLUS, reason="evalplus not installed (MBPP+ needs it)")
def test_mbpp_plus_references_use_evalplus_types_and_special_oracles():
    records = load_evalplus(
        "mbpp_plus", data_dir=CODE_DATA, task_ids=["Mbpp/2", "Mbpp/581", "Mbpp/737", "Mbpp/3"]
    )
    similar, surface_area, check_str, not_prime = (record.reference for record in records)
    assert all(record.data_source == "mbpp_plus" for record in records)
    assert similar["oracle"] == "set" and similar["inputs"][0] == [(3, 4, 5, 6), (5, 7, 4, 10)]
    assert sorted(similar["expected"][0]) == [4, 5]
    assert len(surface_area["also_accepted"]) == len(surface_area["inputs"])
    assert check_str["oracle"] == "not_none" and {*check_str["expected"]} == {True, False}
    assert not_prime["oracle"] == "exact" and "also_accepted" not in not_prime
    assert not_prime["preamble"] == ""


def test_mbpp_plus_without_evalplus_says_how_to_install(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setitem(sys.modules, "evalplus.data.mbpp", None)  # makes the import fail
    with pytest.raises(ImportError, match="pip install evalplus"):
        load_evalplus("mbpp_plus", data_dir=CODE_DATA, task_ids=["Mbpp/2"])


def test_without_a_path_evalplus_provides_the_release(monkeypatch: pytest.MonkeyPatch):
    task = _raw_tasks("HumanEvalPlus.jsonl.gz")["HumanEval/0"]
    fake = types.ModuleType("evalplus.data")
    fake.get_human_eval_plus = lambda: {"HumanEval/0": task}  # the real one downloads
    monkeypatch.setitem(sys.modules, "evalplus.data", fake)
    (record,) = load_evalplus("humaneval_plus")
    assert record.reference["task_id"] == "HumanEval/0"
    assert len(record.reference["expected"]) == len(task["base_input"]) + len(task["plus_input"])


def test_unknown_evalplus_name_is_rejected():
    with pytest.raises(ValueError, match="humaneval_plus"):
        load_evalplus("apps", data_dir=CODE_DATA)  # type: ignore[arg-type]


def test_livecodebench_exclude_and_limit(tmp_path: Path):
    """`exclude` drops the problems of another file by statement; `limit` keeps the first N after it."""
    full = CODE_DATA / "livecodebench_v5_public.json"
    rows = json.loads(full.read_text())
    held_out = tmp_path / "held_out.json"
    held_out.write_text(json.dumps([{"problem": "  " + rows[1]["problem"] + "\n"}, {"problem": rows[3]["problem"]}]))
    kept = load_livecodebench(full, exclude=held_out, limit=3)
    statements = [r.prompt[0]["content"] for r in kept]
    assert len(kept) == 3
    assert [rows[i]["problem"].strip() in s for s, i in zip(statements, (0, 2, 4))] == [True] * 3
    assert len(load_livecodebench(full, exclude=full)) == 0


def test_evalplus_limit_keeps_the_first_tasks():
    records = load_evalplus("humaneval_plus", data_dir=CODE_DATA, tests="base", limit=2)
    assert [r.reference["task_id"] for r in records] == ["HumanEval/0", "HumanEval/1"]
