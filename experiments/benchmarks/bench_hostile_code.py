"""Per-program timings of the hostile-code suite (tests/rewards/hostile_programs.py).

For every program that the chosen isolation level protects against, run it through
``CodeReward`` with the suite's limits (2 s per sample, 0.4 s per test, 256 MB, 32 processes) and
print: wall seconds (median of ``--repeats``), the score and the expected score, whether the sample
timed out, and how many processes of the run were left afterwards (must be 0). Also the sandbox's
fixed cost (an honest ``add``) and the load average, since timings on a shared machine drift.

Usage: ``PYTHONPATH=src python experiments/benchmarks/bench_hostile_code.py [--level namespaces]
[--repeats 3]``
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))  # for tests.rewards.hostile_programs

from steer.rewards import sandbox  # noqa: E402
from steer.rewards.code import CodeReward  # noqa: E402
from tests.rewards.hostile_programs import ADD_REFERENCE, HONEST_ADD, PROGRAMS, PROTECTIONS, render  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--level", choices=sandbox.ISOLATION_LEVELS, default=None)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    level = args.level or sandbox.isolation_level()
    if not sandbox.level_works(level):
        raise SystemExit(f"isolation level {level} does not work here")
    sandbox.isolation_level = lambda: level  # the reward asks the module for its level

    with tempfile.TemporaryDirectory() as scratch:
        outside = Path(scratch) / "outside"
        outside.mkdir(mode=0o777)
        outside.chmod(0o777)
        canary = outside / "canary.txt"
        canary.write_text("alive")
        server = socket.create_server(("127.0.0.1", 0))
        bystander = subprocess.Popen(["sleep", "600"])
        os.environ["STEER_HOSTILE_TEST_SECRET"] = "hunter2"
        values = {
            "outside": str(outside), "canary": str(canary), "port": server.getsockname()[1],
            "secret_name": "STEER_HOSTILE_TEST_SECRET", "repo_file": str(REPO / "README.md"),
            "data_file": str(REPO.parent / "shared" / "data" / "README.md"),
            "home_file": str(Path.home() / ".bashrc"),
        }
        reward = CodeReward(
            mode="fraction", timeout_s=2.0, test_timeout_s=0.4, memory_mb=256, num_workers=1, max_processes=32
        )
        print(f"isolation level: {level}; load average before: {os.getloadavg()}")
        print(f"{'program':34s} {'wall_s':>7s} {'score':>6s} {'expect':>6s} {'timeout':>7s} {'left':>4s}")
        rows = [("(honest add: sandbox cost)", HONEST_ADD, ADD_REFERENCE, 1.0)]
        rows += [(p.name, render(p, values), p.reference, p.score) for p in PROGRAMS if p.needs <= PROTECTIONS[level]]
        mismatches = 0
        total = 0.0
        for name, code, reference, expected in rows:
            times = []
            for _ in range(args.repeats):
                started = time.monotonic()
                output = reward([code], [reference])
                times.append(time.monotonic() - started)
                left = len(sandbox.processes_of_runs())
            wall = statistics.median(times)
            total += wall
            mismatches += output.scores[0] != expected or left > 0
            print(f"{name:34s} {wall:7.2f} {output.scores[0]:6.2f} {expected:6.2f} {output.num_timeouts:7d} {left:4d}")
        print(f"programs: {len(rows) - 1}; total median wall {total:.1f} s; mismatches {mismatches}; "
              f"bystander alive: {bystander.poll() is None}; canary intact: {canary.read_text() == 'alive'}")
        print(f"load average after: {os.getloadavg()}")
        bystander.kill()
        server.close()


if __name__ == "__main__":
    main()
