"""Code benchmarks as :class:`PromptRecord` lists whose references drive :class:`CodeReward`.

- HumanEval+ / MBPP+ (EvalPlus): each task's tests are its inputs (``base_input``, plus
  ``plus_input`` for ``tests="plus"``); the expected outputs are computed once, here, by running
  the canonical solution on them in the sandbox, as EvalPlus itself does. MBPP+ needs the
  ``evalplus`` package (``pip install steer-lab[code]``): it turns the JSON inputs back into the
  tuples/sets the functions expect, and it names the tasks that need a special comparison.
- LiveCodeBench (public tests): stdin programs and LeetCode-style ``class Solution`` methods, from
  the JSON list format of ``../shared/data/code`` (both files).

The reference format is documented in :mod:`steer.rewards.code`. Each reference also carries
``task_id`` and, for EvalPlus, ``canonical_solution`` (used by tests and benchmarks).
"""

from __future__ import annotations

import gzip
import importlib
import json
import logging
import re
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

from omegaconf import DictConfig

from steer.data.records import PromptRecord
from steer.knobs import ConfigError, one_of, select
from steer.rewards.code import run_tests

log = logging.getLogger(__name__)

EVALPLUS_FILES = {"humaneval_plus": "HumanEvalPlus.jsonl.gz", "mbpp_plus": "MbppPlus.jsonl.gz"}

EVALPLUS_INSTRUCTION = (
    "Solve the following Python programming task. Write the complete solution, including the "
    "imports and helper functions it needs, in a single ```python code block.\n\n"
    "```python\n{prompt}```"
)
LIVECODEBENCH_FUNCTIONAL_INSTRUCTION = (
    "{problem}\n\nComplete the following starter code. Write the whole class in a single "
    "```python code block.\n\n```python\n{starter_code}\n```"
)
LIVECODEBENCH_STDIN_INSTRUCTION = (
    "{problem}\n\nWrite a Python program that reads the input from standard input and prints the "
    "answer to standard output. Write the program in a single ```python code block."
)
# Imports a contest judge typically provides; `List` etc. must exist for the starter code's
# annotations to evaluate.
LIVECODEBENCH_PREAMBLE = (
    "from typing import *\nfrom collections import *\nfrom functools import *\n"
    "from itertools import *\nfrom heapq import *\nfrom bisect import *\n"
    "import bisect, collections, functools, heapq, itertools, math, re, string, sys\n"
)

# Limits for running the canonical solutions: generous, they only fail on broken tasks.
_GROUND_TRUTH_LIMITS = {"timeout_s": 600.0, "test_timeout_s": 60.0, "memory_mb": 4096}


def load_evalplus(
    name: Literal["humaneval_plus", "mbpp_plus"],
    path: str | Path | None = None,
    *,
    data_dir: str | Path | None = None,
    tests: Literal["base", "plus"] = "plus",
    task_ids: Sequence[str] | None = None,
    limit: int | None = None,
    num_workers: int = 2,
) -> list[PromptRecord]:
    """Load HumanEval+ or MBPP+ with expected outputs computed from the canonical solutions.

    Args:
        name: ``"humaneval_plus"`` or ``"mbpp_plus"``.
        path: an EvalPlus ``.jsonl(.gz)`` release file.
        data_dir: folder holding ``HumanEvalPlus.jsonl.gz`` / ``MbppPlus.jsonl.gz``, used when
            ``path`` is None. With neither, the ``evalplus`` package downloads the release.
        tests: ``"base"`` (the original tests' inputs) or ``"plus"`` (base + EvalPlus inputs).
        task_ids: keep only these tasks (in this order), e.g. for a quick subset.
        limit: keep only the first N tasks (after ``task_ids``; quick runs and smoke tests).
        num_workers: canonical solutions run at once when computing expected outputs.
    """
    if name not in EVALPLUS_FILES:
        raise ValueError(f"unknown EvalPlus set {name!r}; valid: {', '.join(EVALPLUS_FILES)}")
    if path is None and data_dir is not None:
        path = Path(data_dir) / EVALPLUS_FILES[name]
    tasks = _read_evalplus(name, path)
    if task_ids is not None:
        tasks = [tasks[task_id] for task_id in task_ids]
    else:
        tasks = list(tasks.values())
    if limit is not None:
        tasks = tasks[:limit]
    references = [_evalplus_reference(name, task, tests) for task in tasks]
    with ThreadPoolExecutor(max_workers=num_workers) as pool:
        list(pool.map(_fill_expected_outputs, references))
    return [
        PromptRecord(
            prompt=[{"role": "user", "content": EVALPLUS_INSTRUCTION.format(prompt=task["prompt"])}],
            reference=reference,
            data_source=name,
        )
        for task, reference in zip(tasks, references, strict=True)
    ]


def load_livecodebench(path: str | Path, *, exclude: str | Path | None = None,
                       limit: int | None = None) -> list[PromptRecord]:
    """Load LiveCodeBench problems with their public tests from a JSON list.

    Accepts both layouts found in ``../shared/data/code``: ``tests`` as a list, or
    ``public_test_cases`` as a JSON string; each test is ``{input, output, testtype}`` with
    ``testtype`` "stdin" or "functional" (one JSON argument per input line, JSON output).

    Args:
        path: the JSON list.
        exclude: another such file; its problems (same statement text) are dropped, so that a
            training set drawn from ``path`` holds none of an evaluation set's problems.
        limit: keep only the first N problems (after ``exclude``).
    """
    rows = json.loads(Path(path).read_text(encoding="utf-8"))
    if exclude is not None:
        held_out = {row["problem"].strip() for row in json.loads(Path(exclude).read_text(encoding="utf-8"))}
        rows = [row for row in rows if row["problem"].strip() not in held_out]
    if limit is not None:
        rows = rows[:limit]
    records = []
    for index, row in enumerate(rows):
        tests = row["tests"] if "tests" in row else json.loads(row["public_test_cases"])
        kinds = {test["testtype"] for test in tests}
        if len(kinds) != 1:
            raise ValueError(f"problem {index} of {path} mixes test types {sorted(kinds)}")
        reference: dict[str, Any] = {"task_id": f"livecodebench/{index}", "preamble": LIVECODEBENCH_PREAMBLE}
        if kinds == {"functional"}:
            method = re.search(r"def\s+(\w+)\s*\(\s*self", row["starter_code"])
            if method is None:
                raise ValueError(
                    f"problem {index} of {path}: no method in starter code {row['starter_code']!r}"
                )
            reference |= {
                "kind": "functional",
                "entry_point": f"Solution.{method.group(1)}",
                "inputs": [
                    [json.loads(line) for line in test["input"].strip().split("\n")] for test in tests
                ],
                "expected": [json.loads(test["output"]) for test in tests],
                "oracle": "json",
            }
            prompt = LIVECODEBENCH_FUNCTIONAL_INSTRUCTION.format(
                problem=row["problem"].strip(), starter_code=row["starter_code"].rstrip()
            )
        else:
            reference |= {
                "kind": "stdin",
                "inputs": [test["input"] for test in tests],
                "expected": [test["output"] for test in tests],
                "oracle": "lines",
            }
            prompt = LIVECODEBENCH_STDIN_INSTRUCTION.format(problem=row["problem"].strip())
        records.append(
            PromptRecord(
                prompt=[{"role": "user", "content": prompt}], reference=reference, data_source="livecodebench"
            )
        )
    return records


def _read_evalplus(name: str, path: str | Path | None) -> dict[str, dict[str, Any]]:
    """Tasks by id, with MBPP+ inputs already turned back into tuples/sets where needed."""
    if path is None:  # the real release, downloaded and cached by evalplus
        evalplus_data = _import_evalplus("evalplus.data")
        if name == "humaneval_plus":
            return evalplus_data.get_human_eval_plus()
        return evalplus_data.get_mbpp_plus()
    opener: Callable[..., Any] = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as file:
        tasks = {task["task_id"]: task for task in map(json.loads, filter(str.strip, file))}
    if name == "mbpp_plus":
        deserialize = _import_evalplus("evalplus.data.mbpp").mbpp_deserialize_inputs
        for task_id, task in tasks.items():
            task["base_input"] = deserialize(task_id, task["base_input"])
            task["plus_input"] = deserialize(task_id, task["plus_input"])
    return tasks


def _evalplus_reference(name: str, task: dict[str, Any], tests: str) -> dict[str, Any]:
    """The reference of one task, ``expected`` still to be computed."""
    inputs = list(task["base_input"]) + (list(task["plus_input"]) if tests == "plus" else [])
    reference = {
        "task_id": task["task_id"],
        "kind": "functional",
        "entry_point": task["entry_point"],
        "inputs": inputs,
        "atol": float(task["atol"] or 0.0),
        "oracle": "exact",
        "canonical_solution": task["prompt"] + task["canonical_solution"],
        # HumanEval prompts hold imports and helper functions the solution may rely on.
        "preamble": task["prompt"] if name == "humaneval_plus" else "",
    }
    if name == "humaneval_plus" and task["entry_point"] == "find_zero":
        reference["oracle"] = "poly_root"  # any root of the polynomial is right
    if name == "mbpp_plus":
        reference |= _mbpp_special_oracle(task["entry_point"], inputs)
    return reference


def _mbpp_special_oracle(entry_point: str, inputs: list[Any]) -> dict[str, Any]:
    """EvalPlus's special comparisons for MBPP+ tasks whose outputs are not unique."""
    oracles = _import_evalplus("evalplus.eval._special_oracle")
    if entry_point in oracles.MBPP_OUTPUT_SET_EQ_TASKS:
        return {"oracle": "set"}
    if entry_point in oracles.MBPP_OUTPUT_NOT_NONE_TASKS:
        return {"oracle": "not_none"}
    if entry_point == "are_equivalent":
        return {"oracle": "any"}
    if entry_point == "sum_div":
        return {"also_accepted": [0] * len(inputs)}
    if entry_point == "surface_Area":
        return {"also_accepted": [oracles._surface_Area(*args) for args in inputs]}
    if entry_point == "digit_distance_nums":
        return {"also_accepted": [oracles._digit_distance_nums(*args) for args in inputs]}
    return {}


def _fill_expected_outputs(reference: dict[str, Any]) -> None:
    """Run the canonical solution on every input; store its outputs as ``expected`` and its
    run times as ``reference_times`` (they scale the time limit of each test).

    Tests on which the canonical solution itself fails (error or time limit) cannot be judged:
    they are dropped, with a warning, and counted in ``reference["dropped_tests"]``.
    """
    records, _ = run_tests(reference["canonical_solution"], reference, **_GROUND_TRUTH_LIMITS)
    keep = [index for index, record in enumerate(records) if record.status == "ok"]
    if len(keep) < len(records):
        failed = next(record for record in records if record.status != "ok")
        log.warning(
            "%s: canonical solution fails %d of %d tests (first: %s %s); dropping them",
            reference["task_id"],
            len(records) - len(keep),
            len(records),
            failed.status,
            failed.error,
        )
    outputs = [records[index].output for index in keep]
    if reference["oracle"] == "not_none":
        outputs = [output is not None for output in outputs]
    reference["inputs"] = _pick(reference["inputs"], keep)
    if "also_accepted" in reference:
        reference["also_accepted"] = _pick(reference["also_accepted"], keep)
    reference["expected"] = outputs
    reference["reference_times"] = [records[index].time_s for index in keep]
    reference["dropped_tests"] = len(records) - len(keep)


def _pick(values: Sequence[Any], indices: Iterable[int]) -> list[Any]:
    return [values[index] for index in indices]


def _import_evalplus(module: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ImportError(
            f"{module} is needed here (MBPP+ input types and special oracles, or downloading a "
            "release). Install it with `pip install evalplus` (or `pip install steer-lab[code]`)."
        ) from error


def check_file_argument(argument: str) -> Callable[[str, DictConfig], None]:
    def check(knob: str, spec: DictConfig) -> None:
        value = select(spec, argument)
        if value is not None and not Path(str(value)).expanduser().is_file():
            raise ConfigError(f"{knob}.{argument}={str(value)!r} is not an existing file; allowed: the path of the "
                              "benchmark's data file (data_dir, i.e. STEER_DATA_DIR, is the datasets folder)")
    return check


def check_evalplus_spec(knob: str, spec: DictConfig) -> None:
    name = select(spec, "name")
    one_of(f"{knob}.name", name, EVALPLUS_FILES)
    check_file_argument("path")(knob, spec)
    data_dir = select(spec, "data_dir")
    if select(spec, "path") is None and data_dir is not None and not (Path(str(data_dir)).expanduser() / EVALPLUS_FILES[name]).is_file():
        raise ConfigError(f"{knob}.data_dir={str(data_dir)!r} holds no {EVALPLUS_FILES[name]}; allowed: the folder with "
                          "the EvalPlus release files, or data_dir: null to let evalplus download them")
