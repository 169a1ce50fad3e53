"""Code reward: run the code of a response against a task's tests in the sandbox.

The code is the last fenced ```python block of the response, else the whole text. All tests of one
sample run in ONE sandboxed process (:mod:`steer.rewards.sandbox`), through a small harness:

- ``functional`` tests call a function (``entry_point``, or ``"Solution.method"`` for
  LeetCode-style starter code) on each input, each call under its own time limit (SIGALRM);
- ``stdin`` tests fork one child per test with the test's input on file descriptor 0 and run the
  program as ``__main__``; its stdout is captured.

The harness reports each test's output (as type-tagged JSON; a large output as a SHA-256
:class:`Digest` of a canonical encoding, so huge outputs cost neither memory nor transfer) and
never sees the expected outputs: those are compared here, in the trusted process, so a response
cannot fake a pass with an object whose ``__eq__`` always says True, nor by printing a verdict.

A reference (built by :mod:`steer.data.code`) is a dict::

    kind           "functional" | "stdin"
    inputs         functional: one list of positional arguments per test; stdin: one str per test
    expected       functional: the expected return values; stdin: the expected stdout (str)
    entry_point    functional only: "function_name" or "ClassName.method" (a new instance per test)
    oracle         how an output is compared, one of ORACLES (default "exact"; stdin: "lines")
    atol           absolute float tolerance (default 0; floats then still get 1e-6, as in EvalPlus)
    preamble       code run before the response's code (imports, the prompt's helper functions)
    also_accepted  optional, one value or None per test: a second accepted output (EvalPlus
                   special oracles of some MBPP+ tasks)
    reference_times  optional, seconds the reference solution took per test; a test may take
                   REFERENCE_TIME_FACTOR times as long (at least ``test_timeout_s``)

Comparison rules follow EvalPlus: equality, else for floats ``|out - exp| <= atol + 1e-7 |exp|``
elementwise with the same container type and length; ``set``: same elements in any order;
``not_none``: the expected value says whether the reference returned something other than None;
``any``: any output counts (the call only has to return); ``poly_root``: HumanEval/32's output
must be a root of the input polynomial within ``atol``; ``json``: tuples count as lists
(LiveCodeBench functional tests, whose expected values are JSON); ``lines``: stdout equals the
expected text line by line after stripping.
"""

from __future__ import annotations

import json
import math
import pickle
import re
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal

from steer.rewards.base import RewardOutput
from steer.rewards.sandbox import SandboxResult, containment, run_python

ORACLES = ("exact", "set", "not_none", "any", "poly_root", "json", "lines")
REFERENCE_TIME_FACTOR = 4.0
"""A test may take this many times the reference solution's time (EvalPlus's factor)."""

# Runs inside the sandbox as main.py. stdin carries a pickled job (written by us, so unpickling is
# safe): {"kind", "code", "entry_point", "inputs", "time_limits"}. It prints one JSON line per
# finished test on the original stdout, flushed at once so a killed run still reports the tests it
# finished; the solution's own prints go to /dev/null.
HARNESS = r'''
import builtins, hashlib, io, json, numbers, os, pickle, signal, sys, time, traceback

builtins.exit = builtins.quit = sys.exit  # defined by `site`, which the sandbox may skip (-S)
job = pickle.loads(sys.stdin.buffer.read())
results = os.fdopen(os.dup(1), "w")
devnull = os.open(os.devnull, os.O_RDWR)
os.dup2(devnull, 0)
os.dup2(devnull, 1)
sys.stdin = io.StringIO()


def emit(index, record):
    record["index"] = index
    results.write(json.dumps(record) + "\n")
    results.flush()


def encode(x, canonical=False):
    """A JSON-able, type-tagged copy of a return value; unknown types become their repr.

    canonical=True makes values that compare equal encode alike (sets and dicts sorted, integral
    floats as ints), for digests of large outputs.
    """
    if x is None or isinstance(x, (bool, str)):
        return x
    if isinstance(x, numbers.Integral):
        x = int(x)
        return x if x.bit_length() < 10000 else {"int": hex(x)}  # str(int) caps at 4300 digits
    if isinstance(x, numbers.Real):
        x = float(x)
        return int(x) if canonical and x.is_integer() else x
    if isinstance(x, numbers.Complex):
        return {"complex": [x.real, x.imag]}
    if isinstance(x, list):
        return [encode(v, canonical) for v in x]
    if isinstance(x, tuple):
        return {"tuple": [encode(v, canonical) for v in x]}
    if isinstance(x, (set, frozenset)):
        items = [encode(v, canonical) for v in x]
        return {type(x).__name__: sorted(items, key=json.dumps) if canonical else items}
    if isinstance(x, dict):
        items = [[encode(k, canonical), encode(v, canonical)] for k, v in x.items()]
        return {"dict": sorted(items, key=json.dumps) if canonical else items}
    if isinstance(x, bytes):
        return {"bytes": x.hex()}
    return {"repr": f"{type(x).__name__}: {repr(x)[:200]}"}


def report(x):
    """The output itself, or for a large one (> 4096 items or > 64 kB encoded) only a digest."""
    if not (isinstance(x, (str, bytes, list, tuple, set, frozenset, dict)) and len(x) > 4096):
        encoded = encode(x)
        if len(json.dumps(encoded)) <= 1 << 16:
            return {"output": encoded}
    return {"digest": hashlib.sha256(json.dumps(encode(x, canonical=True)).encode()).hexdigest()}


class TestTimeout(BaseException):  # BaseException: `except Exception` in the solution can't eat it
    pass


def on_alarm(signum, frame):
    raise TestTimeout


def run_functional(code, entry_point, inputs, time_limits):
    sys.stdout = sys.stderr = open(os.devnull, "w")
    namespace = {"__name__": "__solution__"}
    try:
        exec(compile(code, "solution.py", "exec"), namespace)
    except BaseException:  # report why on the real stderr (sys.stderr is /dev/null by now)
        os.write(2, traceback.format_exc()[-2000:].encode())
        raise SystemExit(1)
    class_name, _, method = entry_point.rpartition(".")
    signal.signal(signal.SIGALRM, on_alarm)
    for index, args in enumerate(inputs):
        start = time.perf_counter()
        try:
            signal.setitimer(signal.ITIMER_REAL, time_limits[index])
            try:
                function = getattr(namespace[class_name](), method) if class_name else namespace[method]
                record = {"status": "ok", **report(function(*args))}
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
        except TestTimeout:
            record = {"status": "timeout"}
        except BaseException as error:  # SystemExit and KeyboardInterrupt included
            record = {"status": "error", "error": f"{type(error).__name__}: {error}"[:300]}
        record["time_s"] = time.perf_counter() - start
        emit(index, record)


def run_program(program, test_input):
    """Child side of a stdin test: real fds 0/1, the program as __main__, then exit."""
    status = 1
    try:
        with open("input.txt", "w") as file:
            file.write(test_input)
        os.dup2(os.open("input.txt", os.O_RDONLY), 0)
        os.dup2(os.open("output.txt", os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 1)
        os.dup2(devnull, 2)
        sys.stdin, sys.stdout, sys.stderr = open(0), open(1, "w"), open(2, "w")
        try:
            exec(program, {"__name__": "__main__"})
            if "threading" in sys.modules:  # programs that run main() in a big-stack thread
                for thread in sys.modules["threading"].enumerate():
                    if thread is not sys.modules["threading"].main_thread() and not thread.daemon:
                        thread.join()
            status = 0
        except SystemExit as stop:
            status = stop.code if isinstance(stop.code, int) else int(stop.code is not None)
        sys.stdout.flush()
    except BaseException:
        traceback.print_exc()
        status = 1
    finally:
        os._exit(status)


def run_stdin(code, inputs, time_limits):
    program = compile(code, "solution.py", "exec")
    for index, test_input in enumerate(inputs):
        start = time.perf_counter()
        pid = os.fork()
        if pid == 0:
            run_program(program, test_input)
        while True:  # wait for the child, at most its time limit
            done, wait_status = os.waitpid(pid, os.WNOHANG)
            if done or time.perf_counter() - start > time_limits[index]:
                break
            time.sleep(0.001)
        if not done:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            record = {"status": "timeout"}
        elif os.waitstatus_to_exitcode(wait_status) != 0:
            record = {"status": "error", "error": f"exit code {os.waitstatus_to_exitcode(wait_status)}"}
        else:
            with open("output.txt", encoding="utf-8", errors="replace") as file:
                record = {"status": "ok", "output": file.read()}
        record["time_s"] = time.perf_counter() - start
        emit(index, record)


if job["kind"] == "functional":
    run_functional(job["code"], job["entry_point"], job["inputs"], job["time_limits"])
else:
    run_stdin(job["code"], job["inputs"], job["time_limits"])
'''


@dataclass
class TestRecord:
    """What the harness reported for one test."""

    status: Literal["ok", "error", "timeout", "missing"]
    """``missing``: the run ended (crash, syntax error, sample time limit) before this test."""
    output: Any = None
    """The decoded return value (functional) or stdout text (stdin) when ``status == "ok"``."""
    error: str = ""
    time_s: float = 0.0


@dataclass
class CheckResult:
    """Outcome of one sample against all tests of its reference."""

    passed: list[bool]
    """One entry per test."""
    timed_out: bool
    """The run, or one of its tests, hit a time limit."""
    detail: str
    """Why the first failing test failed ('' when all passed)."""

    @property
    def all_passed(self) -> bool:
        return bool(self.passed) and all(self.passed)

    @property
    def fraction(self) -> float:
        return sum(self.passed) / len(self.passed) if self.passed else 0.0


@dataclass(frozen=True)
class Unencodable:
    """A return value of a type the harness does not encode, known only by its repr."""

    text: str


@dataclass(frozen=True)
class Digest:
    """A large return value (> 4096 items or > 64 kB encoded), known by a hash of its canonical
    encoding.

    Two digests are equal when the values compare equal with ``==`` (ints equal to floats, sets
    and dicts in any order); float tolerance does not apply to them.
    """

    sha256: str


def extract_code(response: str) -> str:
    """The last ```python (or ```py / ```python3) fenced block of ``response``, else all of it."""
    blocks = re.findall(r"```(?:python3?|py)[ \t]*\n(.*?)```", response, flags=re.DOTALL | re.IGNORECASE)
    return blocks[-1] if blocks else response


def run_tests(
    code: str,
    reference: Mapping[str, Any],
    *,
    timeout_s: float = 60.0,
    test_timeout_s: float = 4.0,
    memory_mb: int = 1024,
    max_output_bytes: int = 64 << 20,
    max_processes: int = 64,
) -> tuple[list[TestRecord], SandboxResult]:
    """Run ``code`` (the preamble is prepended) on every input of ``reference`` in one sandbox.

    Each test may run ``test_timeout_s``, or ``REFERENCE_TIME_FACTOR`` times as long as the
    reference solution took on it (``reference["reference_times"]``) if that is longer.
    Returns one record per test (``missing`` where the run ended early) and the sandbox result;
    raises RuntimeError if the sandbox itself failed (CodeReward counts that as an error).
    """
    num_tests = len(reference["inputs"])
    reference_times = reference.get("reference_times") or [0.0] * num_tests
    job = {
        "kind": reference["kind"],
        "code": reference.get("preamble", "") + "\n" + code,
        "entry_point": reference.get("entry_point", ""),
        "inputs": list(reference["inputs"]),
        "time_limits": [max(test_timeout_s, REFERENCE_TIME_FACTOR * t) for t in reference_times],
    }
    result = run_python(
        HARNESS,
        pickle.dumps(job),
        timeout_s=timeout_s,
        memory_mb=memory_mb,
        max_output_bytes=max_output_bytes,
        max_processes=max_processes,
        site_packages=False,  # tests need the standard library only; start-up is ~4x faster
    )
    if result.status == "error":  # the sandbox failed, not the code: no verdict possible
        raise RuntimeError(f"sandbox error: {result.stderr[-300:]}")
    last_error_line = (result.stderr.strip().splitlines() or [""])[-1][:300]
    ended = f"the run {result.status} before it: {last_error_line}".rstrip(": ")
    records = [TestRecord("missing", error=ended)] * num_tests
    for line in result.stdout.splitlines():
        try:
            raw = json.loads(line)
            index = raw["index"]
            if records[index].status == "missing":
                if "digest" in raw:
                    output: Any = Digest(raw["digest"])
                elif reference["kind"] == "functional":
                    output = decode(raw.get("output"))
                else:
                    output = raw.get("output")
                records[index] = TestRecord(
                    raw["status"], output, raw.get("error", ""), raw.get("time_s", 0.0)
                )
        except (ValueError, KeyError, IndexError, TypeError):
            continue  # a truncated last line, or junk the solution wrote on our channel
    return records, result


def check(code: str, reference: Mapping[str, Any], **run_options: Any) -> CheckResult:
    """Run ``code`` on the reference's tests and compare each output with the expected one."""
    records, result = run_tests(code, reference, **run_options)
    expected = reference["expected"]
    alternatives = reference.get("also_accepted") or [None] * len(expected)
    passed, detail = [], ""
    for index, record in enumerate(records):
        ok = record.status == "ok" and output_matches(
            record.output,
            expected[index],
            oracle=reference.get("oracle", "exact"),
            atol=reference.get("atol", 0.0),
            inputs=reference["inputs"][index],
            also_accepted=alternatives[index],
        )
        passed.append(ok)
        if not ok and not detail:
            reason = (
                "wrong output" if record.status == "ok" else f"{record.status}: {record.error}".rstrip(": ")
            )
            detail = f"test {index}: {reason}"
    timed_out = result.status == "timeout" or any(r.status == "timeout" for r in records)
    return CheckResult(passed, timed_out, detail)


def output_matches(
    output: Any,
    expected: Any,
    *,
    oracle: str = "exact",
    atol: float = 0.0,
    inputs: Any = None,
    also_accepted: Any = None,
) -> bool:
    """Whether one test's output counts as correct (see the module docstring for the oracles)."""
    try:
        if oracle == "exact":
            return _values_match(output, expected, atol) or (
                also_accepted is not None and (output == also_accepted or _close(output, also_accepted, atol))
            )
        if oracle == "json":
            return _values_match(_tuples_as_lists(output), expected, atol)
        if oracle == "set":
            return set(output) == set(expected)
        if oracle == "not_none":
            return output == expected if isinstance(output, bool) else expected == (output is not None)
        if oracle == "any":
            return True
        if oracle == "poly_root":
            coefficients = inputs[0]
            return abs(sum(c * math.pow(output, i) for i, c in enumerate(coefficients))) <= atol
        if oracle == "lines":
            return _lines(output) == _lines(expected)
    except (TypeError, ValueError, OverflowError):
        return False  # e.g. set() of unhashable items, a non-number where a number is needed
    raise ValueError(f"unknown oracle {oracle!r}; valid: {', '.join(ORACLES)}")


def decode(value: Any) -> Any:
    """Invert the harness's tagged-JSON encoding into plain Python values."""
    if isinstance(value, list):
        return [decode(v) for v in value]
    if not isinstance(value, dict):
        return value
    ((tag, payload),) = value.items()
    if tag == "tuple":
        return tuple(decode(v) for v in payload)
    if tag == "set":
        return {decode(v) for v in payload}
    if tag == "frozenset":
        return frozenset(decode(v) for v in payload)
    if tag == "dict":
        return {decode(k): decode(v) for k, v in payload}
    if tag == "complex":
        return complex(*payload)
    if tag == "int":
        return int(payload, 16)
    if tag == "bytes":
        return bytes.fromhex(payload)
    return Unencodable(payload)


def _values_match(output: Any, expected: Any, atol: float) -> bool:
    if output == expected:
        return True
    if atol == 0 and _is_floats(expected):
        atol = 1e-6  # EvalPlus compares floats with at least this tolerance
    if atol == 0 or type(output) is not type(expected):
        return False
    return _close(output, expected, atol)


def _close(output: Any, expected: Any, atol: float, rtol: float = 1e-7) -> bool:
    """Elementwise ``|a - b| <= atol + rtol |b|`` (numpy.allclose's rule) over nested sequences."""
    if isinstance(expected, (list, tuple)):
        return (
            isinstance(output, (list, tuple))
            and len(output) == len(expected)
            and all(_close(a, b, atol, rtol) for a, b in zip(output, expected, strict=True))
        )
    if isinstance(output, (int, float)) and isinstance(expected, (int, float)):
        return output == expected or abs(output - expected) <= atol + rtol * abs(expected)
    return output == expected


def _is_floats(value: Any) -> bool:
    if isinstance(value, float):
        return True
    return isinstance(value, (list, tuple)) and bool(value) and all(isinstance(v, float) for v in value)


def _tuples_as_lists(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_tuples_as_lists(v) for v in value]
    return value


def _lines(text: Any) -> list[str]:
    return [line.strip() for line in str(text).strip().splitlines()]


class CodeReward:
    """Reward = 1 if a response's code passes all tests of its reference (``mode="all_pass"``),
    or the share of tests it passes (``mode="fraction"``).

    Samples run in parallel, ``num_workers`` sandboxed processes at a time. The threads here only
    wait on those processes (the GIL is released meanwhile); every limit is enforced by the
    sandbox, and the trainer process is never forked.

    Args:
        mode: ``"all_pass"`` (binary) or ``"fraction"``.
        timeout_s: wall-clock limit for one sample, all its tests together.
        test_timeout_s: time limit of one test (a function call or one program run); raised to
            ``REFERENCE_TIME_FACTOR`` times the reference solution's time where that is known.
        memory_mb: address-space limit of each sandboxed process; where the sandbox can make a
            cgroup, a sample's processes together get ``memory_mb`` + 144 MB (its working
            directory's tmpfs) + 64 MB (:func:`steer.rewards.sandbox.run_python`).
        max_processes: processes (and threads) one sample may run at once (``RLIMIT_NPROC``, and
            the cgroup's ``pids.max`` where there is one).
        num_workers: samples checked at once (at most the number of free CPU cores).
    """

    def __init__(
        self,
        mode: Literal["all_pass", "fraction"] = "all_pass",
        timeout_s: float = 60.0,
        test_timeout_s: float = 4.0,
        memory_mb: int = 1024,
        num_workers: int = 2,
        max_processes: int = 64,
    ) -> None:
        if mode not in ("all_pass", "fraction"):
            raise ValueError(f"mode must be 'all_pass' or 'fraction', got {mode!r}")
        self.mode = mode
        self.run_options = {
            "timeout_s": timeout_s,
            "test_timeout_s": test_timeout_s,
            "memory_mb": memory_mb,
            "max_processes": max_processes,
        }
        self.num_workers = num_workers
        containment()  # probe the sandbox once per process and log what it enforces, at start-up

    def check(self, response: str, reference: Mapping[str, Any]) -> CheckResult:
        """Check one response (the code is extracted from it first)."""
        return check(extract_code(response), reference, **self.run_options)

    def check_batch(self, responses: Sequence[str], references: Sequence[Any]) -> list[CheckResult | None]:
        """Check responses in parallel; None where the check itself failed (it never raises)."""
        if len(responses) != len(references):
            raise ValueError(f"{len(responses)} responses but {len(references)} references")
        with ThreadPoolExecutor(max_workers=self.num_workers) as pool:
            return list(pool.map(self._safe_check, responses, references))

    def __call__(self, responses: Sequence[str], references: Sequence[Any]) -> RewardOutput:
        outcomes = self.check_batch(responses, references)
        scores, correct, errors, timeouts, fractions = [], [], 0, 0, []
        for outcome in outcomes:
            if outcome is None:  # the check itself failed: score 0, counted as an error
                scores.append(0.0)
                correct.append(False)
                fractions.append(0.0)
                errors += 1
                continue
            scores.append(float(outcome.all_passed) if self.mode == "all_pass" else outcome.fraction)
            correct.append(outcome.all_passed)
            fractions.append(outcome.fraction)
            timeouts += outcome.timed_out
        extra = {"tests_passed_fraction": sum(fractions) / len(fractions)} if fractions else {}
        return RewardOutput(scores, correct, num_errors=errors, num_timeouts=timeouts, extra=extra)

    def _safe_check(self, response: str, reference: Mapping[str, Any]) -> CheckResult | None:
        try:
            return self.check(response, reference)
        except Exception:  # noqa: BLE001 - a broken sample or reference must never stop training
            return None
