"""The README's test numbers, measured instead of typed: runs the default suite (``pytest -q``,
what ``make test`` and CI run) and prints one line with the counts, the time and the load.

    python experiments/benchmarks/test_suite_numbers.py            # the default suite
    python experiments/benchmarks/test_suite_numbers.py -m slow    # any pytest arguments

Prints e.g. ``default suite: 447 passed, 3 skipped in 171 s (pytest's time; wall 180 s; load average
3.1 -> 4.0 on 2 CPUs; Python 3.11.7)``. pytest's own summary line is kept verbatim in the output.
"""

from __future__ import annotations

import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SUMMARY = re.compile(r"^=*\s*(?P<counts>\d+ \w+.*?) in (?P<seconds>[\d.]+)s")


def summarise(output: str) -> tuple[str, float]:
    """(counts, seconds) of pytest's final summary line, e.g. ("447 passed, 3 skipped", 171.2)."""
    for line in reversed(output.splitlines()):
        match = SUMMARY.match(line.strip())
        if match:
            return match["counts"], float(match["seconds"])
    raise ValueError("no pytest summary line in the output")


def main(argv: list[str]) -> str:
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", *argv], cwd=REPO,
                            capture_output=True, text=True)
    wall = time.perf_counter() - start
    sys.stdout.write(result.stdout[-3000:])
    counts, seconds = summarise(result.stdout)
    line = (f"{'default suite' if not argv else 'pytest ' + ' '.join(argv)}: {counts} in {seconds:.0f} s "
            f"(pytest's time; wall {wall:.0f} s; load average {load_before:.1f} -> {os.getloadavg()[0]:.1f} "
            f"on {os.cpu_count()} CPUs; Python {platform.python_version()})")
    print(line)
    if result.returncode not in (0, 5):
        raise SystemExit(result.returncode)
    return line


if __name__ == "__main__":
    main(sys.argv[1:])
