"""Math answer verification: extract the final answer of a response and compare it to the ground truth.

Three modes (``MathReward(mode=...)``):

- ``"math_verify"`` — symbolic equivalence with math-verify (``\\frac{1}{2}`` == ``0.5``), after a
  fast path that accepts identical normalised strings without calling it. Scores 1 / 0.
- ``"dapo_strict"`` — the DAPO paper's training reward: only the last 300 characters of the response
  count, the last boxed answer (or ``Answer:`` line) is normalised and compared by exact string
  match. Scores +1 / -1.
- ``"either"`` — correct if either check accepts (the DAPO paper's evaluation). Scores 1 / 0.

Plain numbers on both sides are compared here, exactly (:func:`numbers_equal`): integers must be
equal (``4064257`` is wrong for ``4064256``); non-integers may differ by 1e-6 relative and by half
a unit in the last written digit of the less precise one. Ground truths written in display
delimiters (``\\[ 5+\\sqrt{3} \\]``, ``$...$``) are normalised like responses.

Why a process pool: math-verify (sympy) can take unbounded time on hostile answers, and its own
timeouts use ``signal.alarm``, which only works in the main thread. We switch its timeouts off and
apply our own: an interval-timer alarm inside the process that runs the check (recoverable, cheap),
plus, for pool workers, a wall-clock deadline in the parent that kills and replaces a worker stuck
where a signal cannot reach (C code) or that crashed. A bad sample never hangs or stops the trainer.
"""

from __future__ import annotations

import decimal
import functools
import logging
import multiprocessing
import re
import signal
import threading
import time
from collections import deque
from multiprocessing.connection import Connection, wait
from typing import Any, Sequence

from steer.rewards.base import RewardOutput

MODES = ("math_verify", "dapo_strict", "either")
MAX_RESPONSE_CHARS = 100_000
"""Answers are searched for in this many final characters of a response (~25k tokens)."""
DAPO_TAIL_CHARS = 300
"""DAPO's reward only looks at the end of the response (verl ``math_dapo``: last 300 characters)."""
KILL_GRACE_S = 1.0
"""Extra wall-clock time a pool worker gets beyond ``timeout_s`` before the parent kills it."""
MAX_BATCH = 16
"""Most tasks sent to a worker in one message."""
WORKER_START_TIMEOUT_S = 120.0
"""A fresh worker imports sympy; allow for a loaded machine."""

# --------------------------------------------------------------------------------------------------
# Answer extraction
# --------------------------------------------------------------------------------------------------

_BOX_RE = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
_ANSWER_LINE_RE = re.compile(r"\banswer\s*:[ \t]*(.*)", re.IGNORECASE)


_BRACE_TOKEN_RE = re.compile(r"\\.|[{}]", re.DOTALL)
_SPACES_RE = re.compile(r"\s*")
_TOKEN_RE = re.compile(r"[^\s$]+")


def _matching_braces(text: str) -> dict[int, int]:
    """``{open index: close index}`` of every balanced brace pair, in one linear pass.

    Escaped braces (``\\{``, ``\\}``) are content, not delimiters. One pass for the whole text keeps
    extraction linear on hostile input (thousands of unclosed ``\\boxed{``), where scanning from
    each box to the end would be quadratic.
    """
    stack: list[int] = []
    pairs: dict[int, int] = {}
    for token in _BRACE_TOKEN_RE.finditer(text):
        char = token.group()
        if char == "{":
            stack.append(token.start())
        elif char == "}" and stack:
            pairs[stack.pop()] = token.start()
    return pairs


def extract_boxed(text: str) -> str | None:
    """Content of the last complete ``\\boxed{...}`` / ``\\fbox{...}`` / ``\\boxed 5`` in ``text``.

    An unterminated box (a response truncated mid-answer) or an empty one is skipped in favour of an
    earlier one. Linear time in ``len(text)``.
    """
    pairs: dict[int, int] | None = None
    for match in reversed(list(_BOX_RE.finditer(text))):
        rest = match.end()
        start = _SPACES_RE.match(text, rest).end()
        content = None
        if start < len(text) and text[start] == "{":
            if pairs is None:
                pairs = _matching_braces(text)
            close = pairs.get(start)
            content = None if close is None else text[start + 1 : close]
        elif rest < len(text) and text[rest] in " \t":  # "\boxed 5": one token
            token = _TOKEN_RE.match(text, start)
            content = token.group(0) if token else None
        if content is not None and content.strip():
            return content.strip()
    return None


def _strip_math_delimiters(answer: str) -> str:
    """Remove surrounding ``$...$`` / ``\\(...\\)`` / ``\\[...\\]`` and a final full stop."""
    answer = answer.strip().rstrip(".").strip()
    for left, right in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
        if answer.startswith(left) and answer.endswith(right) and len(answer) > len(left) + len(right):
            answer = answer[len(left) : -len(right)].strip()
            break
    return answer.rstrip(".").strip()


def extract_answer_line(text: str) -> str | None:
    """The answer on the last ``Answer: X`` line (several benchmark prompts ask for that format).

    If nothing follows the colon, the next non-empty line is taken ("Answer:\\n42").
    """
    matches = list(_ANSWER_LINE_RE.finditer(text))
    if not matches:
        return None
    last = matches[-1]
    answer = last.group(1).strip()
    if not answer:
        following = [line.strip() for line in text[last.end() :].splitlines() if line.strip()]
        answer = following[0] if following else ""
    answer = _strip_math_delimiters(answer)
    return answer or None


def extract_answer(text: str) -> str | None:
    """The final answer of a response: the last boxed answer, else the last ``Answer:`` line.

    Only the last ``MAX_RESPONSE_CHARS`` characters are searched, which bounds the time a
    megabyte of hostile text (e.g. 100,000 unclosed ``\\boxed{``) can take outside any timer.
    """
    text = text[-MAX_RESPONSE_CHARS:]
    boxed = extract_boxed(text)
    if boxed is not None:
        return boxed
    return extract_answer_line(text)


_ANSWER_IS_RE = re.compile(r"\banswer\s+is\b[ \t]*(?::[ \t]*)?(.*)", re.IGNORECASE)
# After the phrase: a leading plain number ("12", "-3", "1,234", "3/4", "2.5") is the answer when
# words follow it ("12 apples", "12 because ..."); otherwise the clause up to a sentence break is.
_LEADING_NUMBER_RE = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?(?=\s+[A-Za-z]|\s*$)")
_CLAUSE_END_RE = re.compile(r"(?<!\\)[.;!?](?!\d)|,(?!\d{3}\b)|\s+(?:because|since|which|so|and|but|as|if)\b", re.IGNORECASE)
_NEGATION_RE = re.compile(r"(?:not|no|never|unclear|unknown|wrong|incorrect|correct|right)\b", re.IGNORECASE)
_NEXT_LINE_RE = re.compile(r"\s*(\S.*)")
_MATH_OPENERS = (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]"))


def _phrase_answer(rest: str) -> str | None:
    """The answer written after "the answer is", or None when none is there (``not 5``, ``correct``).

    Accepted: delimited math at the start (``$\\frac{3}{4}$``), a plain number followed by words or
    nothing, or a short clause that contains a digit, a LaTeX command, or is one letter (a choice).
    """
    rest = rest.strip().strip("*").strip()  # **12** (markdown bold)
    if _NEGATION_RE.match(rest):
        return None
    for left, right in _MATH_OPENERS:
        if rest.startswith(left):
            close = rest.find(right, len(left))
            if close > len(left):
                return rest[len(left) : close].strip() or None
            return None  # unclosed: a truncated answer
    number = _LEADING_NUMBER_RE.match(rest)
    if number:
        return number.group(0)
    clause = _CLAUSE_END_RE.split(rest, maxsplit=1)[0].strip().strip("*").strip()
    if clause and (any(c.isdigit() for c in clause) or "\\" in clause or re.fullmatch(r"\(?[A-Za-z]\)?", clause)):
        return clause
    return None


def extract_answer_phrase(text: str) -> str | None:
    """The answer of the last "... answer is X" statement that states one ("The answer is: 12",
    "the final answer is $\\frac{3}{4}$.", "So the answer is 1,234 apples.").

    Later statements win (a corrected answer on the final line beats an earlier one); a statement
    without an answer ("the answer is not 5", "the answer is correct") is skipped. If nothing
    follows the phrase on its line, the next non-empty line is read ("The answer is:\\n42").
    """
    for match in reversed(list(_ANSWER_IS_RE.finditer(text))):
        rest = match.group(1)
        if not rest.strip():  # the next non-empty line (a regex from here: linear, unlike splitting the rest)
            following = _NEXT_LINE_RE.match(text, match.end())
            rest = following.group(1) if following else ""
        answer = _phrase_answer(rest)
        if answer is not None:
            return answer
    return None


def extract_free_form_answer(text: str) -> str | None:
    """The final answer of a free-form response: the last boxed answer; else whichever comes last of
    the last ``Answer:`` line and the last "the answer is X" statement (:func:`extract_answer_phrase`).

    What the ``math_verify`` and ``either`` modes read (the paper's evaluation reads free-form
    answers). Without such a statement the result is :func:`extract_answer`'s. The strict DAPO rule
    (``dapo_strict``, and the strict half of ``either``) keeps :func:`extract_answer`.
    """
    text = text[-MAX_RESPONSE_CHARS:]
    boxed = extract_boxed(text)
    if boxed is not None:
        return boxed
    phrases = list(_ANSWER_IS_RE.finditer(text))
    if not phrases:
        return extract_answer_line(text)
    lines = list(_ANSWER_LINE_RE.finditer(text))
    if lines and lines[-1].start() > phrases[-1].start():
        return extract_answer_line(text)  # an "Answer:" line after the last statement
    phrase = extract_answer_phrase(text)
    return phrase if phrase is not None else extract_answer_line(text)


# --------------------------------------------------------------------------------------------------
# String normalisation (DAPO-style strict match and the fast path)
# --------------------------------------------------------------------------------------------------

_TEXT_COMMANDS_RE = re.compile(r"\\(?:text|textbf|textit|textrm|mathrm|mathbf|mbox|operatorname)\s*\{([^{}]*)\}")
_SPACING_RE = re.compile(r"\\(?:left|right|displaystyle|big|Big|bigl|bigr|Bigl|Bigr)(?![A-Za-z])|\\[,;:! ]")
_DEGREES_RE = re.compile(r"\^\s*\{?\s*\\circ\s*\}?|°|\\circ(?![A-Za-z])|\\degree")
# Multi-letter only: a single letter after a number is too often a variable ("6m", "2k").
_UNITS = (
    "cm", "mm", "km", "kg", "sec", "seconds", "second", "minutes", "minute", "min",
    "hours", "hour", "hr", "days", "day", "weeks", "years", "degrees", "degree", "dollars", "dollar",
    "cents", "cent", "units", "unit", "inches", "inch", "feet", "foot", "ft", "meters", "meter",
    "miles", "mile", "mph", "yards", "points", "ways", "people", "students", "sq", "square",
)
_TRAILING_UNIT_RE = re.compile(
    r"(?<=[\d.])\s*(?:" + "|".join(sorted(_UNITS, key=len, reverse=True)) + r")(?:\^\{?\d\}?)?$"
)
MAX_TEXT_NESTING = 8
"""Levels of nested ``\\text{}``-like wrappers removed (more is hostile input, not an answer)."""
_THOUSANDS_RE = re.compile(r"^-?\d{1,3}(?:,\d{3})+(?:\.\d+)?$")
_SIMPLE_LHS_RE = re.compile(r"^[A-Za-z](?:_\{?[A-Za-z0-9]+\}?)?=(?!=)")


def _unwrap_outer_braces(text: str) -> str:
    """``{{3}}`` -> ``3``: drop brace pairs that enclose the whole string (linear time)."""
    if not text.startswith("{"):
        return text
    pairs = _matching_braces(text)
    depth, last = 0, len(text) - 1
    while depth < last - depth and text[depth] == "{" and pairs.get(depth) == last - depth:
        depth += 1
    return text[depth : len(text) - depth]


@functools.lru_cache(maxsize=65536)
def normalize_answer(answer: str) -> str:
    """Canonical string form of an answer for exact matching (DAPO-style strict check).

    Removes formatting that does not change the value: dollar signs, ``\\text{}`` wrappers,
    ``\\left``/``\\right`` and spacing commands, degree and percent signs, trailing units after a
    number, thousands separators, a leading ``x =``, a trailing full stop, redundant braces and
    trailing decimal zeros; ``\\dfrac``/``\\tfrac`` -> ``\\frac``; ``\\frac12`` -> ``\\frac{1}{2}``.
    Deliberately conservative: it never evaluates anything, so ``1/2`` and ``0.5`` stay different
    (that is math-verify's job).
    """
    text = _strip_math_delimiters(answer)  # ground truths may be written "\\[ 5+\\sqrt{3} \\]"
    boxed = extract_boxed(text) if text.startswith(("\\boxed", "\\fbox")) else None
    if boxed is not None:
        text = boxed
    text = text.replace("\\$", "").replace("$", "").replace("\n", " ")
    text = _SPACING_RE.sub("", text)
    text = re.sub(r"\\[dt]frac", r"\\frac", text)
    for _ in range(MAX_TEXT_NESTING):  # \\text{\\textbf{x}}: one level per pass, bounded
        if (unwrapped := _TEXT_COMMANDS_RE.sub(r"\1", text)) == text:
            break
        text = unwrapped
    text = _DEGREES_RE.sub("", text)
    text = text.replace("\\%", "").replace("%", "")
    text = text.strip().rstrip(".").strip()
    text = _TRAILING_UNIT_RE.sub("", text)
    text = re.sub(r"\s+", "", text)
    text = re.sub(r"\\frac(\d)(\d)", r"\\frac{\1}{\2}", text)
    text = re.sub(r"\\frac(\d)\{", r"\\frac{\1}{", text)
    text = re.sub(r"\\frac\{([^{}]*)\}(\d)", r"\\frac{\1}{\2}", text)
    text = re.sub(r"\\sqrt(\d)", r"\\sqrt{\1}", text)
    if _SIMPLE_LHS_RE.match(text) and text.count("=") == 1:
        text = text.split("=", 1)[1]
    text = _unwrap_outer_braces(text)
    if _THOUSANDS_RE.match(text):
        text = text.replace(",", "")
    text = text.lstrip("+") if re.fullmatch(r"\+[\d.]+", text) else text
    if re.fullmatch(r"-?\d*\.\d+", text):  # 18.90 -> 18.9, 5.0 -> 5, .35 -> 0.35
        text = re.sub(r"^(-?)\.", r"\g<1>0.", text.rstrip("0").rstrip(".")) or "0"
    return text


def strict_match(response: str, reference: str) -> bool:
    """DAPO's training check: exact match of the normalised final answer in the response's tail."""
    answer = extract_answer(response[-DAPO_TAIL_CHARS:])
    if answer is None:
        return False
    normalised = normalize_answer(answer)
    return bool(normalised) and normalised == normalize_answer(str(reference))


# --------------------------------------------------------------------------------------------------
# math-verify check (no timeouts of its own: callers run it under their own limit)
# --------------------------------------------------------------------------------------------------

_SCIENTIFIC_RE = re.compile(r"^(-?\d+(?:\.\d+)?)[eE]([+-]?\d+)$")
_PLAIN_NUMBER_RE = re.compile(r"(?=[-+]?\.?\d)[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)?(?:\.\d+)?(?:[eE][-+]?\d+)?")
NUMBER_REL_TOL = 1e-6
"""Relative tolerance between two plain non-integer numbers (see :func:`numbers_equal`)."""
MAX_NUMBER_CHARS = 400
"""Longer "plain numbers" are compared as exact strings only (no Decimal arithmetic on huge input)."""


class _QuietTimeoutWarning(logging.Filter):
    """Drop math-verify's "timeout is disabled" warning: we do apply a timeout, our own."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Timeout is disabled" not in record.getMessage()


@functools.cache
def _math_verify():
    """Import math-verify once (it pulls sympy, ~1 s) and return ``(parse, verify)``."""
    import math_verify

    for name in ("math_verify.parser", "math_verify.grader"):
        logging.getLogger(name).addFilter(_QuietTimeoutWarning())
    return math_verify.parse, math_verify.verify


def _math_verify_input(answer: str) -> str:
    """Answer text as math-verify should see it: no stray ``$``, scientific notation as LaTeX.

    Ground truths such as ``69$,$84`` carry inner dollar signs, and Minerva writes ``4.5e33``,
    which sympy would read as ``4.5 * E * 33``.
    """
    answer = _strip_math_delimiters(answer).replace("$", "").strip()
    scientific = _SCIENTIFIC_RE.match(answer)
    if scientific:
        answer = f"{scientific.group(1)}\\times10^{{{scientific.group(2)}}}"
    return answer


@functools.lru_cache(maxsize=4096)
def parse_expression(answer: str) -> tuple:
    """math-verify parse of a bare answer (no surrounding text), cached: references repeat n times.

    Tried as ``$answer$`` first (reads ``62.5\\%``), then as ``\\boxed{answer}``; the first result
    that contains a sympy object wins, else the string fallback of the first.
    """
    parse, _ = _math_verify()
    text = _math_verify_input(answer)
    first: list = []
    for wrapped in (f"${text}$", f"\\boxed{{{text}}}"):
        parsed = parse(wrapped, parsing_timeout=None)
        if any(not isinstance(item, str) for item in parsed):
            return tuple(parsed)
        first = first or parsed
    return tuple(first)


def _as_number(answer: str) -> decimal.Decimal | None:
    """The exact value of a plain decimal or scientific-notation number (``-1,200.5``,
    ``3.89e-10``, also inside display delimiters), else None."""
    text = _strip_math_delimiters(answer.replace("\\$", "")).replace("$", "").strip()
    if len(text) > MAX_NUMBER_CHARS or not _PLAIN_NUMBER_RE.fullmatch(text):
        return None
    try:
        return decimal.Decimal(text.replace(",", ""))
    except decimal.DecimalException:
        return None


def _is_integer(number: decimal.Decimal) -> bool:
    return number == number.to_integral_value()


def numbers_equal(answer: str, reference: str) -> bool | None:
    """Compare two plain numbers; None unless both are plain numbers.

    The rule:

    - **integers compare exactly**: if either value is an integer (``4064256``, ``4,064,256``,
      ``4064256.0``, ``4.064256e6``) the two must be equal, so ``4064257`` is wrong for
      ``4064256`` however large the numbers (a relative tolerance accepted it);
    - two **non-integers** are equal when they differ by at most ``NUMBER_REL_TOL`` relative to the
      larger *and* by at most half a unit in the last digit written in the less precise of the two:
      ``0.3333333`` matches ``0.33333333`` and ``3.14159`` matches ``3.14159265``, but
      ``4064257.5`` does not match ``4064256.5`` and ``3.9e-10`` does not match ``3.89e-10``.

    Exact decimal arithmetic (no floats): cheap (no sympy), so integer-answer datasets such as
    DAPO-Math-17k never need a worker, and exact for tiny values, where math-verify's rounding to 6
    decimals would make every pair of values below 1e-6 equal (Minerva's ``1.325e-27`` vs ``2.88e-19``).
    """
    numbers = _as_number(answer), _as_number(reference)
    if numbers[0] is None or numbers[1] is None:
        return None
    a, b = numbers
    try:
        if a == b:
            return True
        if _is_integer(a) or _is_integer(b):
            return False
        difference = abs(a - b)
        half_unit = max(decimal.Decimal(1).scaleb(n.as_tuple().exponent) for n in numbers) / 2
        return difference <= half_unit and difference <= decimal.Decimal(NUMBER_REL_TOL) * max(abs(a), abs(b))
    except (decimal.DecimalException, TypeError):  # e.g. an exponent beyond Decimal's range
        return False


def math_verify_equal(answer: str, reference: str) -> bool:
    """Whether math-verify finds the extracted ``answer`` equivalent to the ground truth.

    Two plain numbers are compared by :func:`numbers_equal` instead.

    Runs without math-verify's own ``signal.alarm`` timeouts (``parsing_timeout=None``,
    ``timeout_seconds=None``); see :func:`run_with_timeout`.
    """
    numeric = numbers_equal(answer, str(reference))
    if numeric is not None:
        return numeric
    _, verify = _math_verify()
    gold = parse_expression(str(reference))
    predicted = parse_expression(answer)
    if not gold or not predicted:
        return False
    return verify(list(gold), list(predicted), timeout_seconds=None)


class CheckTimeout(BaseException):
    """Raised by our alarm. A BaseException so that sympy's and math-verify's ``except Exception``
    blocks cannot swallow it (math-verify's own timeout class is a BaseException for the same reason)."""


ALARM_REPEAT_S = 0.05
"""After the deadline the alarm repeats this often until the check has stopped: one CheckTimeout
can be swallowed (raised inside a ``__del__`` or weakref callback that the garbage collector ran
during the check, where Python only prints it), the next one is not."""


class _Alarm:
    """State of the one SIGALRM timer of this process (see :func:`run_with_timeout`)."""

    active = False
    timeout_s = 0.0
    previous: tuple = (signal.SIG_DFL, 0.0, 0.0)  # the caller's handler, its timer's delay, our start


def _on_alarm(signum, frame) -> None:
    if _Alarm.active:
        raise CheckTimeout(f"check exceeded {_Alarm.timeout_s} s")


def _disarm() -> None:
    """Stop our timer, put back the caller's handler and timer. Idempotent, and called again by
    :func:`checked_math_verify` in case an alarm cut this very function short; the flag goes
    first, so an alarm that still arrives meanwhile is a no-op."""
    if not _Alarm.active:
        return
    _Alarm.active = False
    previous_handler, previous_delay, started = _Alarm.previous
    signal.setitimer(signal.ITIMER_REAL, 0)
    signal.signal(signal.SIGALRM, previous_handler)
    if previous_delay > 0:
        signal.setitimer(signal.ITIMER_REAL, max(previous_delay - (time.monotonic() - started), 1e-3))


def run_with_timeout(check, timeout_s: float, *args) -> bool:
    """Run ``check(*args)`` under a SIGALRM interval timer of ``timeout_s`` seconds.

    Only possible in the main thread of a process; elsewhere the check runs without a limit (the
    pool path adds a wall-clock kill on top). Raises :class:`CheckTimeout` when the timer fires,
    and again every ``ALARM_REPEAT_S`` until the check has stopped. A timer set by the caller
    (e.g. pytest-timeout) is restored afterwards.
    """
    _math_verify()  # import outside the timer: an interrupted import would leave sympy half-loaded
    if threading.current_thread() is not threading.main_thread() or timeout_s <= 0 or _Alarm.active:
        return check(*args)
    previous_handler = signal.signal(signal.SIGALRM, _on_alarm)
    _Alarm.timeout_s = timeout_s
    _Alarm.previous = (previous_handler, 0.0, time.monotonic())
    _Alarm.active = True
    previous_delay, _ = signal.setitimer(signal.ITIMER_REAL, timeout_s, ALARM_REPEAT_S)
    _Alarm.previous = (previous_handler, previous_delay, _Alarm.previous[2])
    try:
        return check(*args)
    finally:
        _disarm()


def checked_math_verify(answer: str, reference: str, timeout_s: float) -> tuple[str, bool]:
    """``(status, correct)`` of one math-verify check, status in ``ok | timeout | error``. Never raises."""
    try:
        return "ok", bool(run_with_timeout(math_verify_equal, timeout_s, answer, reference))
    except CheckTimeout:
        _disarm()
        return "timeout", False
    except Exception:  # noqa: BLE001 - a broken sample must never stop training
        return "error", False


# --------------------------------------------------------------------------------------------------
# Worker processes
# --------------------------------------------------------------------------------------------------


def _worker_main(conn: Connection, timeout_s: float) -> None:
    """Loop of one worker: receive a list of ``(answer, reference)``, send one ``(status, correct)``
    per item as soon as it is checked (the parent measures progress by them); ``None`` stops."""
    parse_expression("1")  # import sympy and warm caches before announcing readiness
    conn.send("ready")
    while True:
        try:
            batch = conn.recv()
        except (EOFError, OSError):  # parent gone
            return
        if batch is None:
            return
        for answer, reference in batch:
            conn.send(checked_math_verify(answer, reference, timeout_s))


class _Worker:
    """One spawned worker process and its pipe."""

    def __init__(self, timeout_s: float, target=_worker_main, wait: bool = True) -> None:
        context = multiprocessing.get_context("spawn")  # safe with torch/CUDA/threads in the parent
        self.conn, child_conn = context.Pipe(duplex=True)
        self.process = context.Process(target=target, args=(child_conn, timeout_s), daemon=True)
        self.process.start()
        child_conn.close()
        self.ready = False
        self.started = time.monotonic()
        if wait:
            self.wait_ready()

    def poll_ready(self) -> bool:
        """Whether the worker has said "ready" (without blocking); RuntimeError if it died or
        took longer than ``WORKER_START_TIMEOUT_S``."""
        if not self.ready:
            if self.conn.poll() or time.monotonic() - self.started > WORKER_START_TIMEOUT_S:
                self.wait_ready()
        return self.ready

    def wait_ready(self) -> None:
        """Block until the worker has imported sympy and said so; RuntimeError if it never does."""
        try:
            if not self.conn.poll(max(WORKER_START_TIMEOUT_S - (time.monotonic() - self.started), 0)):
                raise TimeoutError(f"no answer within {WORKER_START_TIMEOUT_S} s")
            self.conn.recv()  # "ready"
            self.ready = True
        except (EOFError, OSError) as error:  # OSError includes the TimeoutError above
            self.kill()
            raise RuntimeError(
                f"math-verify worker failed to start (exit code {self.process.exitcode}); spawned workers "
                "re-import the main module, so scripts need an `if __name__ == '__main__':` guard"
            ) from error

    def kill(self) -> None:
        self.process.kill()
        self.process.join(timeout=5)
        self.conn.close()

    def stop(self) -> None:
        try:
            self.conn.send(None)
        except (OSError, ValueError):
            pass
        self.process.join(timeout=1)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(timeout=5)
        self.conn.close()


# --------------------------------------------------------------------------------------------------
# The reward
# --------------------------------------------------------------------------------------------------


class MathReward:
    """Reward for math answers (see the module docstring for the three modes).

    Args:
        mode: ``"math_verify"`` | ``"dapo_strict"`` | ``"either"``.
        timeout_s: wall-clock limit per math-verify check; a sample over it scores ``wrong_score``
            and counts in ``num_timeouts``.
        num_workers: math-verify worker processes (spawned lazily on first use, then reused); a
            check past ``timeout_s + KILL_GRACE_S`` has its worker killed and replaced, so no answer
            holds a call up for longer. 0 checks in the calling process: with a timer in the main
            thread, without one elsewhere; the timer cannot stop C code (big-number arithmetic in
            sympy), so a check may overrun ``timeout_s`` by seconds (up to 10.5 s over a 1 s limit
            in the 10,000-string fuzz): use 0 only where no model writes the answers.
        correct_score, wrong_score: rewards; ``None`` takes the mode's default
            (1 / 0, and +1 / -1 for ``dapo_strict`` as in DAPO).

    ``extra`` reports ``no_answer_rate`` (responses without an extractable answer: a format signal).
    The ``math_verify`` and ``either`` modes also read free-form final statements ("The answer is: 12",
    :func:`extract_free_form_answer`); ``dapo_strict`` reads only a box or an ``Answer:`` line.
    """

    def __init__(
        self,
        mode: str = "math_verify",
        timeout_s: float = 5.0,
        num_workers: int = 1,
        correct_score: float | None = None,
        wrong_score: float | None = None,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown math reward mode {mode!r}; valid modes: {', '.join(MODES)}")
        if num_workers < 0 or timeout_s <= 0:
            raise ValueError(f"need num_workers >= 0 and timeout_s > 0, got {num_workers}, {timeout_s}")
        self.mode = mode
        self.timeout_s = float(timeout_s)
        self.num_workers = int(num_workers)
        self.correct_score = 1.0 if correct_score is None else float(correct_score)
        self.wrong_score = (-1.0 if mode == "dapo_strict" else 0.0) if wrong_score is None else float(wrong_score)
        self._workers: list[_Worker | None] = []
        self._worker_target = _worker_main

    def __call__(self, responses: Sequence[str], references: Sequence[Any]) -> RewardOutput:
        """Score each response against its ground truth."""
        if len(responses) != len(references):
            raise ValueError(f"{len(responses)} responses but {len(references)} references")
        correct = [False] * len(responses)
        statuses = ["ok"] * len(responses)
        no_answer = 0
        to_verify: list[tuple[int, str, str]] = []  # (index, answer, reference) for math-verify
        for index, (response, reference) in enumerate(zip(responses, references)):
            try:
                reference = str(reference)
                if self.mode != "math_verify" and strict_match(response, reference):
                    correct[index] = True
                    continue
                if self.mode == "dapo_strict":
                    no_answer += extract_answer(response[-DAPO_TAIL_CHARS:]) is None
                    continue
                answer = extract_free_form_answer(response)
                normalised = None if answer is None else normalize_answer(answer)
                if answer is None:
                    no_answer += 1
                elif normalised and normalised == normalize_answer(reference):
                    correct[index] = True  # fast path: no need to ask sympy
                elif (numeric := numbers_equal(answer, reference)) is not None:
                    correct[index] = numeric  # two plain numbers: no need to ask sympy either
                else:
                    to_verify.append((index, answer, reference))
            except Exception:  # noqa: BLE001 - a broken sample must never stop training
                statuses[index] = "error"
        for index, (status, is_correct) in self._verify(to_verify).items():
            statuses[index], correct[index] = status, is_correct
        return RewardOutput(
            scores=[self.correct_score if ok else self.wrong_score for ok in correct],
            correct=correct,
            num_errors=statuses.count("error"),
            num_timeouts=statuses.count("timeout"),
            extra={"no_answer_rate": no_answer / max(len(responses), 1)},
        )

    def extract_answer(self, response: str) -> str | None:
        """The normalised final answer this mode reads (majority voting in evaluation uses it):
        :func:`extract_free_form_answer` for ``math_verify`` / ``either``, the strict
        :func:`extract_answer` for ``dapo_strict``."""
        extract = extract_answer if self.mode == "dapo_strict" else extract_free_form_answer
        answer = extract(response)
        return None if answer is None else normalize_answer(answer)

    def _verify(self, tasks: list[tuple[int, str, str]]) -> dict[int, tuple[str, bool]]:
        """math-verify each ``(index, answer, reference)``; returns ``index -> (status, correct)``."""
        if self.num_workers == 0 or not tasks:
            return {index: checked_math_verify(answer, ref, self.timeout_s) for index, answer, ref in tasks}
        return self._verify_in_pool(tasks)

    def _verify_in_pool(self, tasks: list[tuple[int, str, str]]) -> dict[int, tuple[str, bool]]:
        """Check tasks in the workers; kill and replace a worker that is stuck or died.

        Tasks go out in small batches (one message per batch saves most of the IPC cost); results
        come back one by one, and a worker's deadline restarts with each result, so the first
        unanswered task of a batch is exactly the one that hung or crashed its worker. It scores as
        a timeout or an error; the rest of its batch goes back to the queue.
        """
        if not self._workers:
            self._workers = [None] * self.num_workers
        try:
            return self._dispatch(tasks)
        except BaseException:
            # results of batches still in flight would be read by the next call: start afresh
            self._kill_all()
            raise

    def _dispatch(self, tasks: list[tuple[int, str, str]]) -> dict[int, tuple[str, bool]]:
        self._start_workers(min(self.num_workers, len(tasks)))
        limit_s = self.timeout_s + KILL_GRACE_S
        batch_size = max(1, min(MAX_BATCH, len(tasks) // (4 * self.num_workers)))
        results: dict[int, tuple[str, bool]] = {}
        pending = deque(tasks)
        busy: dict[int, tuple[deque, float]] = {}  # worker slot -> (tasks awaiting results, deadline)
        while pending or busy:
            for slot in range(self.num_workers):
                if slot not in busy and pending:
                    worker = self._workers[slot] or self._start_worker(slot)
                    if not worker.poll_ready():
                        continue  # a replacement still importing sympy: the other slots go on
                    batch = deque(pending.popleft() for _ in range(min(batch_size, len(pending))))
                    try:
                        worker.conn.send([(answer, reference) for _, answer, reference in batch])
                    except OSError:  # died while idle: give its batch to a fresh worker
                        pending.extendleft(reversed(batch))
                        self._replace_worker(slot)
                        continue
                    busy[slot] = (batch, time.monotonic() + limit_s)
            starting = [w.conn for w in self._workers if w is not None and not w.ready] if pending else []
            if not busy:
                wait(starting, timeout=1.0)
                continue
            next_deadline = min(deadline for _, deadline in busy.values())
            wait([self._workers[slot].conn for slot in busy] + starting, timeout=max(next_deadline - time.monotonic(), 0))
            for slot, (waiting, deadline) in list(busy.items()):
                conn = self._workers[slot].conn
                try:
                    while waiting and conn.poll():
                        results[waiting.popleft()[0]] = conn.recv()
                        deadline = time.monotonic() + limit_s
                except (EOFError, OSError):  # the worker died on this task (crash, OOM kill)
                    failure = "error"
                else:
                    failure = "timeout" if waiting and time.monotonic() > deadline else None
                if failure is not None:
                    results[waiting.popleft()[0]] = (failure, False)
                    pending.extendleft(reversed(waiting))
                    waiting.clear()
                    self._replace_worker(slot)
                if waiting:
                    busy[slot] = (waiting, deadline)
                else:
                    del busy[slot]
        return results

    def _start_workers(self, count: int) -> None:
        """Start the first ``count`` slots' missing workers side by side, not one after the other:
        each start imports sympy (seconds), which a step would otherwise pay ``count`` times."""
        fresh = {}
        for slot in range(count):
            if self._workers[slot] is None:
                fresh[slot] = self._workers[slot] = _Worker(self.timeout_s, target=self._worker_target, wait=False)
        for slot, worker in fresh.items():
            try:
                worker.wait_ready()
            except RuntimeError:
                self._workers[slot] = None
                raise

    def _start_worker(self, slot: int) -> _Worker:
        """Start a worker in ``slot`` without waiting for it (see :meth:`_Worker.poll_ready`)."""
        self._workers[slot] = _Worker(self.timeout_s, target=self._worker_target, wait=False)
        return self._workers[slot]

    def _replace_worker(self, slot: int) -> None:
        """Kill a stuck or dead worker and start its replacement at once, in the background: the
        dispatch loop keeps serving the other slots while it imports sympy."""
        self._workers[slot].kill()
        self._start_worker(slot)

    def _kill_all(self) -> None:
        for worker in self._workers:
            if worker is not None:
                worker.kill()
        self._workers = []

    def close(self) -> None:
        """Stop the worker processes (they are restarted if the reward is called again)."""
        for worker in self._workers:
            if worker is not None:
                worker.stop()
        self._workers = []

    def __getstate__(self) -> dict[str, Any]:
        """Pickle the configuration only: worker processes belong to the process that started them."""
        state = self.__dict__.copy()
        state["_workers"] = []
        return state

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    def __repr__(self) -> str:
        return f"MathReward(mode={self.mode!r}, timeout_s={self.timeout_s}, num_workers={self.num_workers})"
