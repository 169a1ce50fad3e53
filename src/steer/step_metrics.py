"""What one RL step measures about itself: wall-clock seconds per phase (:class:`PhaseTimer`) and
metrics accumulated over micro-batches, optimiser steps and ranks (:class:`MetricAccumulator`)."""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Iterator

import torch

from steer.distributed import gather_objects


class PhaseTimer:
    """Wall-clock seconds per named phase of a step (``time/<phase>_s``)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        self.seconds[f"time/{phase}_s"] = self.seconds.get(f"time/{phase}_s", 0.0) + time.perf_counter() - start


SUMMED_SUFFIXES = ("_count", "/tokens", "_sum")


class MetricAccumulator:
    """Metrics combined over micro-batches, optimiser steps and ranks: weighted means, sums or maxima.

    ``add(metrics, weight)`` accumulates weighted means (e.g. token-weighted); counts and sums
    (keys ending in ``_count``, ``/tokens`` or ``_sum``) and keys added with ``how="sum"`` add up;
    ``how="max"`` keeps the largest value.
    :meth:`reduce_over_ranks` combines every rank's accumulator the same way (one collective), so a
    data-parallel run reports what one process would over the same global batch.
    """

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.weights: dict[str, float] = {}
        self.kinds: dict[str, str] = {}

    def add(self, metrics: dict[str, torch.Tensor | float], weight: float = 1.0, how: str = "mean") -> None:
        for key, value in metrics.items():
            kind = "sum" if key.endswith(SUMMED_SUFFIXES) else how  # counts add up over micro-batches and ranks
            self._combine(key, kind, float(value) * weight if kind == "mean" else float(value), weight)

    def _combine(self, key: str, kind: str, value: float, weight: float) -> None:
        self.kinds[key] = kind
        if kind == "max":
            self.sums[key] = max(self.sums.get(key, -float("inf")), value)
            self.weights[key] = 1.0
        elif kind == "sum":
            self.sums[key] = self.sums.get(key, 0.0) + value
            self.weights[key] = 1.0
        else:
            self.sums[key] = self.sums.get(key, 0.0) + value
            self.weights[key] = self.weights.get(key, 0.0) + weight

    def reduce_over_ranks(self) -> "MetricAccumulator":
        """This accumulator combined over all ranks (itself in one process); every rank gets the result."""
        gathered = gather_objects((self.sums, self.weights, self.kinds))
        if len(gathered) == 1:
            return self
        reduced = MetricAccumulator()
        for sums, weights, kinds in gathered:
            for key, value in sums.items():
                reduced._combine(key, kinds[key], value, weights[key])
        return reduced

    def result(self) -> dict[str, float]:
        return {key: total / max(self.weights[key], 1e-12) for key, total in self.sums.items()}
