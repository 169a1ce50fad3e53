"""Seeded generator of hostile (response, ground truth) pairs for the math reward: unbalanced and
deeply nested braces, huge numbers, pathological LaTeX, Unicode, very long responses, and
mutations of real answers. Shared by tests/rewards/test_math_fuzz.py and
experiments/benchmarks/bench_math_fuzz.py.
"""

from __future__ import annotations

import random

REALISTIC = [
    "5", "-3", "4064256", "\\frac{1}{2}", "0.5", "\\sqrt{2}", "5+\\sqrt{3}", "\\[ 5+\\sqrt{3} \\]", "x^2+1",
    "(1,2)", "\\text{Evelyn}", "\\{1,2,3\\}", "(-\\infty, 2) \\cup (3, \\infty)", "3.89e-10", "1,200", "45^\\circ",
    "\\pi", "2\\pi i", "\\begin{pmatrix} 1 & 2 \\\\ 3 & 4 \\end{pmatrix}", "a = 3", "62.5\\%", "\\$18.90",
]
_PIECES = ["{", "}", "\\boxed{", "\\fbox{", "\\{", "\\}", "\\", "$", "$$", "\\[", "\\]", "\\(", "\\)", "^", "_",
           "\\frac", "\\sqrt", "\\left(", "\\right)", "\\text{", "Answer:", "\n", " ", "1", "9", ".", ",", "-", "!"]
_UNICODE_RANGES = [
    (0x20, 0x7E), (0xA0, 0x24F), (0x300, 0x36F), (0x590, 0x6FF), (0x900, 0x97F), (0x2000, 0x206F),
    (0x2200, 0x22FF), (0x4E00, 0x4FFF), (0xD800, 0xDFFF), (0xFF10, 0xFF19), (0x1D400, 0x1D7FF), (0x1F600, 0x1F64F),
]


def _unicode(rng: random.Random, length: int) -> str:
    return "".join(chr(rng.randint(*rng.choice(_UNICODE_RANGES))) for _ in range(length))


def _digits(rng: random.Random, length: int) -> str:
    return str(rng.randint(1, 9)) + "".join(rng.choice("0123456789") for _ in range(length - 1))


def _braces(rng: random.Random) -> str:
    return "".join(rng.choice(_PIECES) for _ in range(rng.randint(1, 3000)))


def _deep(rng: random.Random) -> str:
    depth = rng.choice([10, 100, 1000, 20000])
    close = rng.choice([depth, depth - 1, depth + 1, 0, depth // 2])
    inner = rng.choice(REALISTIC)
    opener = rng.choice(["{", "\\boxed{", "\\frac{1}{", "\\sqrt{", "\\text{", "(", "\\left("])
    return "\\boxed{" + opener * depth + inner + "}" * close + "}"


def _huge_number(rng: random.Random) -> str:
    length = rng.choice([20, 400, 5000, 50000])
    form = rng.randrange(6)
    if form == 0:
        number = _digits(rng, length)
    elif form == 1:
        number = f"{_digits(rng, 3)}.{_digits(rng, length)}e{rng.choice(['', '-'])}{_digits(rng, rng.randint(1, 12))}"
    elif form == 2:
        number = ",".join(_digits(rng, 3) for _ in range(length // 4 + 1))
    elif form == 3:
        number = "0." + "0" * length + "1"
    elif form == 4:
        number = f"10^{{{_digits(rng, rng.randint(1, 30))}}}"
    else:
        number = "".join(chr(0xFF10 + int(d)) for d in _digits(rng, min(length, 400)))  # full-width digits
    return rng.choice(["\\boxed{%s}", "Answer: %s", "The answer is $%s$.", "%s"]) % number


def _pathological_latex(rng: random.Random) -> str:
    n = rng.choice([3, 10, 50, 300])
    options = [
        "\\frac{" * n + "1" + "}{2}" * n,
        "2^{" * n + "2" + "}" * n,
        "9" + "!" * rng.randint(1, 6),
        f"({_digits(rng, 5)})!",
        f"\\sqrt[{_digits(rng, 9)}]{{2}}",
        f"{_digits(rng, 20)}^{{{_digits(rng, 15)}}}",
        "(x+1)^{" + _digits(rng, 4) + "}",
        "\\sum_{i=1}^{10^{10}} i^{i}",
        "\\int_0^\\infty e^{-x^" + str(n) + "}\\,dx",
        "\\left(" * n + "x" + "\\right." * (n // 2),
        "\\begin{pmatrix}" + " & ".join(["x"] * n) + "\\\\" * n + "\\end{pmatrix}",
        "\\" * (n * 10),
        "$" * n + "5" + "$" * (n - 1),
        "\\text{" * n + "a" + "}" * n,
        "\\overline{" * n + "3" + "}" * n,
        "x" + "'" * n + "=" * n + "y",
        "\\boxed{" * n + "1" + "}" * (n - 1),
        "\\mathbb{R}^{" + _digits(rng, 8) + "}",
        ",".join(["1"] * (n * 10)),
        "\\{" * n + "1" + "\\}" * n,
    ]
    latex = rng.choice(options)
    return rng.choice(["\\boxed{%s}", "Answer: %s", "so $%s$", "%s"]) % latex


def _long(rng: random.Random) -> str:
    filler = rng.choice(["Let me think. ", "{", "\\boxed{", " ", "x" * 80 + "\n", _unicode(rng, 20)])
    body = filler * (rng.choice([10_000, 100_000, 1_000_000]) // len(filler))
    answer = "\\boxed{" + rng.choice(REALISTIC) + "}"
    return rng.choice([body + answer, answer + body, body, body + "\\boxed{" + rng.choice(REALISTIC)])


def _mutation(rng: random.Random) -> str:
    text = list("\\boxed{" + rng.choice(REALISTIC) + "}")
    for _ in range(rng.randint(1, 8)):
        position = rng.randrange(len(text) + 1)
        operation = rng.randrange(3)
        if operation == 0:
            text.insert(position, rng.choice(_PIECES + [_unicode(rng, 1)]))
        elif operation == 1 and position < len(text):
            del text[position]
        elif position < len(text):
            text[position] = rng.choice(_PIECES)
    return "".join(text)


def _unicode_answer(rng: random.Random) -> str:
    return rng.choice(["\\boxed{%s}", "Answer: %s", "%s"]) % _unicode(rng, rng.randint(1, 400))


_FAMILIES = [
    (_braces, 20), (_deep, 10), (_huge_number, 15), (_pathological_latex, 15), (_unicode_answer, 15),
    (_long, 2), (_mutation, 23),
]


def fuzz_pairs(count: int, seed: int = 0) -> list[tuple[str, str, str]]:
    """``count`` seeded ``(family, response, ground truth)`` triples; about one ground truth in five is
    itself generated (hostile), the rest are realistic answers."""
    rng = random.Random(seed)
    functions, weights = zip(*_FAMILIES)
    triples = []
    for _ in range(count):
        make = rng.choices(functions, weights)[0]
        response = make(rng)
        if rng.random() < 0.2:
            reference = rng.choices(functions, weights)[0](rng)[:2000]
        else:
            reference = rng.choice(REALISTIC)
        triples.append((make.__name__.lstrip("_"), response, reference))
    return triples
