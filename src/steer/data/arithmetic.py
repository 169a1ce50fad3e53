"""The embedded task: multi-term addition, answered with a worked line and a ``\\boxed{}`` result.

Prompt ``Compute 12+45+30.``; one valid answer ``45+30=75, 75+12=87. \\boxed{87}``. The terms may be
combined in any order, and the warm-up data uses every order at random, so a warmed-up policy is
genuinely uncertain at many positions of its answer (which pair to add first, which next), not only
at the result's digits. RL rewards every order equally, so whether a method keeps that
order-diversity (entropy) or collapses onto one order is visible without any loss of accuracy —
the question this framework studies.

Problems are a pure function of ``(seed, index)``, so the data order is reproducible and a resumed
run sees the same stream. The held-out split is a fixed set of problems that training never draws.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass, field

from omegaconf import DictConfig
from torch.utils.data import Dataset

from steer.data.records import PromptRecord
from steer.knobs import ConfigError, preset_choice, select

DATA_SOURCE = "arithmetic"


@dataclass(frozen=True)
class ArithmeticTask:
    num_terms: int = 3
    """Numbers to add (>= 2)."""
    digits: int = 2
    """Digits per number; numbers are drawn uniformly from [10^(d-1), 10^d - 1]."""
    num_heldout: int = 200
    """Size of the fixed held-out split."""
    heldout_seed: int = 12345
    """Seed of the held-out split (independent of the run's seed, so every run evaluates the same problems)."""
    _heldout: tuple[tuple[int, ...], ...] = field(init=False, repr=False, compare=False)
    _heldout_keys: frozenset = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.num_terms < 2 or self.digits < 1:
            raise ValueError(f"arithmetic task needs num_terms >= 2 and digits >= 1, got {self.num_terms}, {self.digits}")
        # distinct problems (multisets of terms): the held-out split must leave some for training,
        # or drawing either would never end (one-digit pairs: only 45)
        values = 10**self.digits - 10 ** (self.digits - 1)
        distinct = math.comb(values + self.num_terms - 1, self.num_terms)
        if not 0 <= self.num_heldout < distinct:
            raise ValueError(
                f"num_heldout must be in [0, {distinct}) for {self.num_terms} terms of {self.digits} digit(s) "
                f"({distinct} distinct problems), got {self.num_heldout}"
            )
        rng = random.Random(self.heldout_seed)
        keys: dict[tuple[int, ...], None] = {}
        while len(keys) < self.num_heldout:
            keys[tuple(sorted(self.draw_heldout_terms(rng)))] = None
        object.__setattr__(self, "_heldout", tuple(keys))
        object.__setattr__(self, "_heldout_keys", frozenset(keys))

    def draw_terms(self, rng: random.Random) -> list[int]:
        return self._draw(rng, self.num_terms)

    def draw_heldout_terms(self, rng: random.Random) -> list[int]:
        """A held-out problem (the same distribution as training here; see :class:`MixedArithmeticTask`)."""
        return self.draw_terms(rng)

    def _draw(self, rng: random.Random, count: int) -> list[int]:
        low, high = 10 ** (self.digits - 1), 10**self.digits - 1
        return [rng.randint(low, high) for _ in range(count)]

    @staticmethod
    def prompt(terms: list[int]) -> str:
        return "Compute " + "+".join(map(str, terms)) + "."

    @staticmethod
    def solution(terms: list[int], rng: random.Random) -> str:
        """A worked answer that adds the terms in a random order: ``a+b=s, s+c=t. \\boxed{t}``."""
        order = list(terms)
        rng.shuffle(order)
        steps, total = [], order[0]
        for term in order[1:]:
            steps.append(f"{total}+{term}={total + term}")
            total += term
        return ", ".join(steps) + ". \\boxed{" + str(total) + "}"

    def record(self, terms: list[int]) -> PromptRecord:
        return PromptRecord(
            prompt=[{"role": "user", "content": self.prompt(terms)}],
            reference=str(sum(terms)),
            data_source=DATA_SOURCE,
        )

    def train_terms(self, seed: int, index: int) -> list[int]:
        """The ``index``-th training problem of stream ``seed``; never a held-out problem."""
        rng = random.Random(seed * 1_000_003 + index)
        while True:
            terms = self.draw_terms(rng)
            if tuple(sorted(terms)) not in self._heldout_keys:
                return terms

    def heldout(self) -> list[PromptRecord]:
        return [self.record(list(terms)) for terms in self._heldout]


DEFAULT_INSTRUCTION = "What is {expression}? End your reply with 'The answer is: N', where N is the number."


@dataclass(frozen=True)
class ChatArithmeticTask(ArithmeticTask):
    """The same problems (and held-out split) phrased for an instruct model, answered in free form.

    ``What is 23 + 45? End your reply with 'The answer is: N', where N is the number.`` The reference
    is the sum; the math reward's ``math_verify`` / ``either`` modes read "The answer is: 68"
    (:func:`steer.rewards.math.extract_free_form_answer`). A subclass, not a knob of
    :class:`ArithmeticTask`, so that the embedded task (and the warm-up cache keyed by its fields)
    stays exactly as it was.
    """

    instruction: str = DEFAULT_INSTRUCTION
    """Prompt template; ``{expression}`` becomes the terms joined by `` + ``."""

    def __post_init__(self) -> None:
        if "{expression}" not in self.instruction:
            raise ValueError(f"instruction must contain '{{expression}}', got {self.instruction!r}")
        if self.shots < 0:
            raise ValueError(f"shots must be >= 0, got {self.shots}")
        super().__post_init__()

    shots: int = 0
    """Solved examples given first as earlier chat turns (user question, assistant "The answer is: S.");
    fixed problems, the same for every prompt. A small instruct model follows the format far more
    often with them."""

    def prompt(self, terms: list[int]) -> str:  # type: ignore[override]  # needs the instance's template
        return self.instruction.replace("{expression}", " + ".join(map(str, terms)))

    def examples(self) -> list[dict[str, str]]:
        """The ``shots`` solved example turns (drawn from their own fixed seed)."""
        rng = random.Random(self.heldout_seed + 1)
        messages = []
        for _ in range(self.shots):
            terms = self.draw_terms(rng)
            messages += [{"role": "user", "content": self.prompt(terms)},
                         {"role": "assistant", "content": f"The answer is: {sum(terms)}."}]
        return messages

    def record(self, terms: list[int]) -> PromptRecord:
        return PromptRecord(
            prompt=self.examples() + [{"role": "user", "content": self.prompt(terms)}],
            reference=str(sum(terms)),
            data_source=DATA_SOURCE,
        )


@dataclass(frozen=True)
class MixedArithmeticTask(ArithmeticTask):
    """Problems of ``num_terms`` to ``max_terms`` terms (the count drawn uniformly per problem), with
    a held-out split of ``heldout_terms``-term problems only: the longest, least practised ones, on
    which a warmed-up policy still fails often enough that its pass@k at large k starts well below 1
    and can fall (``data=arithmetic_mixed``). A subclass, so that the embedded task and its warm-up
    cache stay as they are.
    """

    max_terms: int = 4
    """Most terms of a training problem."""
    heldout_terms: int = 4
    """Terms of every held-out problem (between ``num_terms`` and ``max_terms``)."""

    def __post_init__(self) -> None:
        if not self.num_terms <= self.heldout_terms <= self.max_terms:
            raise ValueError(f"mixed arithmetic needs num_terms <= heldout_terms <= max_terms, got {self.num_terms}, "
                             f"{self.heldout_terms}, {self.max_terms}")
        super().__post_init__()

    def draw_terms(self, rng: random.Random) -> list[int]:
        return self._draw(rng, rng.randint(self.num_terms, self.max_terms))

    def draw_heldout_terms(self, rng: random.Random) -> list[int]:
        return self._draw(rng, self.heldout_terms)


class ArithmeticPrompts(Dataset):
    """Map-style view of the training stream: item ``i`` is problem ``i`` of stream ``seed``."""

    def __init__(self, task: ArithmeticTask, seed: int, size: int = 10_000_000) -> None:
        self.task, self.seed, self.size = task, seed, size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> PromptRecord:
        return self.task.record(self.task.train_terms(self.seed, index))


def heldout_records(task: ArithmeticTask) -> list[PromptRecord]:
    """The fixed held-out split (a config-friendly function for ``eval.benchmarks``)."""
    return task.heldout()


_WORKED_STEP = re.compile(r"(\d+)\s*\+\s*(\d+)\s*=")


def order_signature(response: str) -> tuple[int, ...] | None:
    """The order in which a response adds the terms, read from its worked line.

    ``"45+30=75, 75+12=87. \\boxed{87}"`` -> ``(45, 30, 12)``: both operands of the first step, then
    the right operand of every later step. The written partial sums are ignored, so a slip in an
    intermediate sum does not make a new "order". Every permutation of the terms is its own order
    (3 terms: 6 orders, ``a+b`` and ``b+a`` counted apart, as the warm-up writes both). Only the text
    before ``\\boxed`` is read, so the boxed result never counts as a step. ``None`` when no
    ``x+y=`` step is found (e.g. a bare ``\\boxed{87}``): the caller decides how such responses count
    (the held-out evaluation puts them all in one class, see docs/metrics.md).
    """
    worked = response.split("\\boxed", 1)[0]
    pairs = _WORKED_STEP.findall(worked)
    if not pairs:
        return None
    return (int(pairs[0][0]), *(int(right) for _, right in pairs))


def check_needs_task(knob: str, spec: DictConfig) -> None:
    if select(spec, "task") is None:
        data = preset_choice("data")
        raise ConfigError(f"{knob} reads the arithmetic task, but {f'data={data}' if data else 'the data preset'} has none (data.task is null); "
                          "allowed: data=arithmetic, or for math data an eval preset such as eval=math_small or eval=math_paper")
