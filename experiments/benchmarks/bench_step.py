"""Per-phase cost of an RL step: K warm-up steps, then N measured steps, in this process.

The run is assembled by the project's own entry point (:func:`steer.app.train` on the config that
``python src/run.py`` would compose, with the same Hydra overrides), so whatever the trainer or the
rollout engine do today is what gets measured. Only the bookkeeping differs: no tracking
(``logger=none``), no checkpoints, no progress bar and, unless asked for, no evaluation and no
entropy probe. A Lightning callback reads each step's ``time/<phase>_s`` metrics (the module's own
phase timers) and the wall clock between steps.

Prints per-phase medians over the measured steps (rollout, reward, old_logprobs, update, observers,
and ``other`` = end-to-end minus the phases: Lightning, the data loader, callbacks), end-to-end
seconds per RL step, generated tokens/s (response tokens sampled per second of step time), trained
tokens/s (response tokens that carry loss, times epochs, per second of step time), the policy's
parameter count and the process's peak RSS, as a table and optionally as JSON::

    python experiments/benchmarks/bench_step.py --warmup 2 --steps 8 --json out.json [overrides ...]
    python experiments/benchmarks/bench_step.py model.warmup=null model.tiny.hidden_size=64 algorithm.prompts_per_step=8

Absolute times on a shared machine are upper bounds: compare configurations by running them
interleaved (see bench_vs_trl.py, bench_interventions.py) and read the load average printed here.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import lightning as L

REPO = Path(__file__).resolve().parents[2]
CONF = REPO / "conf"
PHASES = ("rollout", "reward", "old_logprobs", "update", "observers")

# What a benchmark leaves out unless asked: tracking, checkpoints, the progress bar.
QUIET = ["logger=none", "callbacks.progress=null", "callbacks.checkpoint=null", "+trainer.enable_progress_bar=false"]


class StepClock(L.Callback):
    """Records, per RL step, the module's published metrics and the wall clock between steps."""

    last: "StepClock | None" = None  # the instance Hydra built for the current run

    def __init__(self) -> None:
        StepClock.last = self
        self.starts: list[float] = []
        self.metrics: list[dict[str, float]] = []
        self.end: float | None = None
        self.fit_start = time.perf_counter()
        self.train_start: float | None = None
        self.parameters = 0

    def on_train_start(self, trainer, module) -> None:
        self.train_start = time.perf_counter()
        self.parameters = sum(p.numel() for p in module.policy.parameters())

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self.starts.append(time.perf_counter())

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.metrics.append(dict(getattr(module, "last_metrics", {}) or {}))

    def on_train_end(self, trainer, module) -> None:
        self.end = time.perf_counter()

    def step_seconds(self) -> list[float]:
        """End-to-end seconds of each step: from its start to the next step's start (the last one: to
        the end of training), so Lightning's loop, the data loader and every callback are included."""
        ends = self.starts[1:] + [self.end if self.end is not None else time.perf_counter()]
        return [end - start for start, end in zip(self.starts, ends)]


def compose(overrides: list[str], keep_eval: bool = False, keep_probe: bool = False, output_dir: str | None = None):
    """The config ``python src/run.py <overrides>`` would run, with the benchmark's quiet settings
    first (so that an override on the command line wins) and the step clock added."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import open_dict

    import steer.app  # noqa: F401  registers the config resolvers

    output_dir = output_dir or tempfile.mkdtemp(prefix="steer-bench-")
    quiet = list(QUIET) + ([] if keep_probe else ["callbacks.entropy_probe=null"])
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = hydra_compose(config_name="config", overrides=[*quiet, *overrides, f"output_dir={output_dir}", f"store_dir={output_dir}"])
    with open_dict(cfg):
        if not keep_eval:
            cfg.eval.benchmarks = {}  # the evaluation callback then evaluates nothing
        cfg.callbacks.bench_step_clock = {"_target_": f"{StepClock.__module__}.{StepClock.__qualname__}"}
    return cfg


def measure(overrides: list[str], warmup: int = 2, steps: int = 8, keep_eval: bool = False, keep_probe: bool = False) -> dict:
    """Run ``warmup + steps`` RL steps of the composed config; the statistics of the last ``steps``."""
    if steps < 1 or warmup < 0:
        raise ValueError(f"need steps >= 1 and warmup >= 0, got steps={steps}, warmup={warmup}")
    begin = time.perf_counter()
    load_before = os.getloadavg()
    from steer.app import train

    cfg = compose([*overrides, f"algorithm.steps={warmup + steps}"], keep_eval, keep_probe)
    imported = time.perf_counter()
    train(cfg)
    clock = StepClock.last
    if clock is None or len(clock.metrics) < warmup + steps:
        raise RuntimeError(f"expected {warmup + steps} RL steps, the clock saw {0 if clock is None else len(clock.metrics)}")
    seconds = clock.step_seconds()[warmup:]
    rows = clock.metrics[warmup:]
    n, epochs = int(cfg.algorithm.n), int(cfg.algorithm.epochs)
    generated = [row.get("response/length_mean", 0.0) * row.get("batch/prompts", 0.0) * n for row in rows]
    phase_keys = sorted({key for row in rows for key in row if key.startswith("time/") and key.endswith("_s")},
                        key=lambda k: (PHASES.index(k[5:-2]) if k[5:-2] in PHASES else len(PHASES), k))
    phases = {key[5:-2]: statistics.median(row.get(key, 0.0) for row in rows) for key in phase_keys}
    other = [s - sum(row.get(key, 0.0) for key in phase_keys) for s, row in zip(seconds, rows)]
    phases["other"] = statistics.median(other)
    total_seconds = sum(seconds)
    return {
        "overrides": list(overrides),
        "warmup_steps": warmup,
        "measured_steps": steps,
        "threads": cfg.get("threads"),
        "parameters": clock.parameters,
        "phase_median_s": phases,
        "step_median_s": statistics.median(seconds),
        "step_mean_s": total_seconds / len(seconds),
        "step_s": seconds,
        "generated_tokens_per_step": statistics.median(generated),
        "generated_tokens_per_s": sum(generated) / total_seconds,
        "trained_tokens_per_s": sum(generated) * epochs / total_seconds,
        "setup_s": (clock.train_start or clock.fit_start) - begin,  # imports, compose, model build/warm-up, Lightning setup
        "compose_s": imported - begin,
        "total_s": time.perf_counter() - begin,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "load_average_before": list(load_before),
        "load_average_after": list(os.getloadavg()),
    }


def format_table(result: dict) -> str:
    step = result["step_median_s"]
    lines = [
        f"{result['parameters']:,} parameters, threads={result['threads']}, {result['warmup_steps']} warm-up + "
        f"{result['measured_steps']} measured RL steps; overrides: {' '.join(result['overrides']) or '(none)'}",
        f"{'phase':<14} {'median_s':>9} {'% of step':>9}",
    ]
    for phase, seconds in result["phase_median_s"].items():
        lines.append(f"{phase:<14} {seconds:9.4f} {100 * seconds / step:8.1f}%")
    lines += [
        f"{'step (e2e)':<14} {step:9.4f}   (mean {result['step_mean_s']:.4f})",
        f"generated tokens/s {result['generated_tokens_per_s']:10.1f}   ({result['generated_tokens_per_step']:.0f} per step)",
        f"trained tokens/s   {result['trained_tokens_per_s']:10.1f}",
        f"peak RSS           {result['peak_rss_mb']:10.1f} MB",
        f"setup {result['setup_s']:.1f} s, whole run {result['total_s']:.1f} s; load average "
        f"{' '.join(f'{x:.2f}' for x in result['load_average_before'])} -> {' '.join(f'{x:.2f}' for x in result['load_average_after'])}",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--warmup", type=int, default=2, help="RL steps run before measuring (default 2)")
    parser.add_argument("--steps", type=int, default=8, help="measured RL steps (default 8)")
    parser.add_argument("--json", type=Path, help="also write the result as JSON here")
    parser.add_argument("--keep-eval", action="store_true", help="keep the configured evaluation (off by default)")
    parser.add_argument("--keep-probe", action="store_true", help="keep the entropy probe (off by default)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for src/run.py")
    args = parser.parse_args(argv)
    result = measure(args.overrides, args.warmup, args.steps, args.keep_eval, args.keep_probe)
    print(format_table(result), flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    sys.path.insert(0, str(REPO / "src"))
    main()
