"""``threads=auto`` during training: the torch thread count follows the cores other processes use.

On a 2-core machine, 2 torch threads are ~1.5x faster than 1 when both cores are free and 2-7x
slower when another process holds one core (the threads wait on each other at every parallel
region; experiments/benchmarks/bench_threads.py). :func:`steer.app.choose_threads` picks the count
at start-up; this callback re-picks it before every RL step from what the other processes used
during the previous one: the busy time of this process's cores (/proc/stat) minus this process's
own CPU time, per second of wall time. So a run that starts on a quiet machine keeps 2 threads
until something else takes a core, then drops to 1 within one step, and goes back when it leaves.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Callable, NamedTuple

import lightning as L
import torch

log = logging.getLogger(__name__)


class CpuSample(NamedTuple):
    wall: float
    """Monotonic seconds."""
    busy: float
    """Busy CPU seconds of this process's cores since boot (every process)."""
    own: float
    """CPU seconds of this process (all its threads)."""


def _idle_and_total(cpus: set[int]) -> tuple[float, float] | None:
    """Summed idle and total jiffies of ``cpus`` from /proc/stat (None off Linux)."""
    try:
        lines = Path("/proc/stat").read_text().splitlines()
    except OSError:
        return None
    idle = total = 0.0
    for line in lines:
        name, *fields = line.split()
        if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus:
            values = [float(v) for v in fields[:8]]  # user nice system idle iowait irq softirq steal
            idle += values[3] + values[4]
            total += sum(values)
    return idle, total


def busy_cores(interval: float = 0.3) -> float:
    """How many of this process's cores other work keeps busy right now: the non-idle share of
    their time over ``interval`` seconds (/proc/stat), times their number. Falls back to the
    1-minute load average where /proc/stat is missing. Sampled, not averaged over a minute: the load
    average still counts a job that ended seconds ago (a first ``threads=auto`` read it, and took 1
    thread on a quiet machine after any earlier run)."""
    cpus = os.sched_getaffinity(0)
    first = _idle_and_total(cpus)
    if first is None:
        return os.getloadavg()[0]
    time.sleep(interval)
    second = _idle_and_total(cpus)
    idle, total = second[0] - first[0], second[1] - first[1]
    return len(cpus) * (1.0 - idle / total) if total > 0 else 0.0


def sample_cpu() -> CpuSample | None:
    """Now, from /proc/stat and ``time.process_time``; None off Linux."""
    counts = _idle_and_total(os.sched_getaffinity(0))
    if counts is None:
        return None
    idle, total = counts
    return CpuSample(time.monotonic(), (total - idle) / os.sysconf("SC_CLK_TCK"), time.process_time())


def threads_for(cores: int, other_busy: float) -> int:
    """Torch threads for ``cores`` usable cores of which other processes keep ``other_busy`` busy."""
    return max(1, min(cores, round(cores - other_busy)))


class ThreadGovernor(L.Callback):
    """Re-picks ``torch.set_num_threads`` before each RL step (added by steer.app when ``threads=auto``)."""

    def __init__(self, cores: int | None = None, sample: Callable[[], CpuSample | None] = sample_cpu) -> None:
        self.cores = len(os.sched_getaffinity(0)) if cores is None else cores
        self.sample = sample
        self.previous: CpuSample | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        now = self.sample()
        previous, self.previous = self.previous, now
        if now is None or previous is None or now.wall - previous.wall < 0.05:
            return
        other_busy = max(0.0, (now.busy - previous.busy) - (now.own - previous.own)) / (now.wall - previous.wall)
        threads = threads_for(self.cores, other_busy)
        if threads != torch.get_num_threads():
            log.info("threads=auto: %d torch threads from RL step %d (other processes kept %.1f of %d cores busy)",
                     threads, getattr(pl_module, "rl_step", batch_idx), other_busy, self.cores)
            torch.set_num_threads(threads)
