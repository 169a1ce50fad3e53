"""Where an RL step's time goes: py-spy samples bench_step.py, and this prints the top entries.

Runs ``py-spy record --format raw`` (collapsed stacks) on ``bench_step.py`` with the given Hydra
overrides, keeps only the samples taken inside ``RLVRModule.training_step`` (imports, model build
and Lightning setup are left out) and prints, as % of those samples:

* the phases: inclusive share of the rollout engine's ``generate``, the old-log-prob pass, the
  optimiser steps, the reward, ...
* the top functions by self time (the innermost Python frame of each sample; with ``--native`` the
  innermost frame including C/C++ frames of torch);
* the top functions by inclusive time.

    python experiments/benchmarks/profile_step.py --out prof.txt [--steps 6] [--top 20] [overrides ...]

Needs py-spy (``pip install py-spy``) and permission to ptrace the child (root, or
``kernel.yama.ptrace_scope=0``).
"""

from __future__ import annotations

import argparse
import collections
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]

# Inclusive phase markers: the first frame below training_step whose function is one of these
# names its phase (py-spy writes frames as ``Class.function (package/file.py:line)``).
PHASES = [
    ("rollout (generate)", {"generate", "sync_weights"}),
    ("old_logprobs", {"_score_without_grad"}),
    ("update: optimiser step", {"_accumulate_gradients", "_apply_gradients"}),
    ("reward", {"score_safely", "batch_decode"}),
    ("observers", {"before_update", "after_optimizer_step"}),
]


def function(frame: str) -> str:
    """``Class.function (path/file.py:12)`` -> ``function``."""
    return frame.split(" (", 1)[0].rsplit(".", 1)[-1]


def is_rl_step(frame: str) -> bool:
    """The module's training_step (not Lightning's Strategy.training_step that calls it)."""
    return function(frame) == "training_step" and "steer/" in frame


def is_wrapper(frame: str) -> bool:
    """Decorator and dispatch frames (they would top every inclusive list and say nothing)."""
    name = frame.split(" (", 1)[0]
    return "<locals>" in name or function(frame) in {"_call_impl", "_wrapped_call_impl", "decorate_context"}


def frame_name(frame: str) -> str:
    """``function (path/to/file.py:line)`` -> ``function (file.py)``."""
    if " (" not in frame:
        return frame
    function, where = frame.split(" (", 1)
    return f"{function} ({Path(where.split(':', 1)[0]).name})"


def summarise(raw: Path, top: int) -> str:
    stacks: list[tuple[list[str], int]] = []
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            stacks.append((stack.split(";"), int(count)))
    inside = [(frames, count) for frames, count in stacks if any(is_rl_step(f) for f in frames)]
    total = sum(count for _, count in inside)
    everything = sum(count for _, count in stacks)
    if not total:
        return f"no samples inside training_step ({everything} samples in all)"
    phases = collections.Counter()
    own = collections.Counter()
    inclusive = collections.Counter()
    for frames, count in inside:
        step_at = next(i for i, f in enumerate(frames) if is_rl_step(f))
        below = frames[step_at + 1 :]
        phase = next((name for f in below for name, marks in PHASES if function(f) in marks), "other (metrics, loop)")
        phases[phase] += count
        own[frame_name(frames[-1])] += count
        for name in set(frame_name(f) for f in below if not is_wrapper(f)):
            inclusive[name] += count
    lines = [f"{total} samples inside training_step ({100 * total / everything:.0f}% of {everything} in the process)", "", "phase (inclusive)"]
    lines += [f"  {100 * c / total:5.1f}%  {name}" for name, c in phases.most_common()]
    lines += ["", f"top {top} by self time"]
    lines += [f"  {100 * c / total:5.1f}%  {name}" for name, c in own.most_common(top)]
    lines += ["", f"top {top} by inclusive time"]
    lines += [f"  {100 * c / total:5.1f}%  {name}" for name, c in inclusive.most_common(top)]
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--summarise":  # re-read a kept --raw file
        print(summarise(Path(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3 else 15))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6, help="measured RL steps (after 1 warm-up step)")
    parser.add_argument("--rate", type=int, default=100, help="py-spy samples per second")
    parser.add_argument("--native", action="store_true", help="include C/C++ frames (slower sampling)")
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--raw", type=Path, help="keep the collapsed stacks here")
    parser.add_argument("--out", type=Path, help="also write the summary here")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    raw = args.raw or Path(tempfile.mkdtemp(prefix="steer-prof-")) / "profile.raw"
    command = ["py-spy", "record", "--format", "raw", "--rate", str(args.rate), "--output", str(raw),
               *(["--native"] if args.native else []), "--", sys.executable, str(HERE / "bench_step.py"),
               "--warmup", "1", "--steps", str(args.steps), *args.overrides]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in [str(REPO / "src"), os.environ.get("PYTHONPATH", "")] if p))
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    lines = done.stdout.splitlines()
    first = next((i for i, line in enumerate(lines) if " parameters, threads=" in line), max(len(lines) - 14, 0))
    table = [line for line in lines[first:] if line and not line.startswith(("py-spy>", "┏", "┃", "┡", "│", "└"))]
    if done.returncode != 0 or not raw.exists():
        sys.exit(f"py-spy failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    summary = "\n".join(["bench_step: " + " ".join(args.overrides), *table, "", summarise(raw, args.top)])
    print(summary)
    if args.out:
        args.out.write_text(summary + "\n")


if __name__ == "__main__":
    main()
