"""``reuse_freed_memory``: glibc keeps freed CPU memory for reuse, so a loop that allocates and frees
tensors of growing size (as decoding widens its key/value buffers) stops page-faulting."""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

# Decoding's allocation pattern: per step and layer a float32 copy of a bf16 buffer's first `end`
# columns (up to 2.5 MB), for growing `end`. Prints the minor page faults of the second pass.
LOOP = """
import json, resource, sys
sys.path.insert(0, {src!r})
import torch
torch.set_num_threads(2)
applied = None
if {reuse}:
    from steer.allocator import reuse_freed_memory
    applied = reuse_freed_memory()
buffers = [torch.randn(56, 4, 72, 48).bfloat16() for _ in range(4)]
def run():
    kept = None  # each copy is freed after the next one is allocated, as a loop variable's would be
    for end in range(25, 73):
        for buffer in buffers:
            kept = buffer[:, :, :end].float()
run()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
run()
print(json.dumps({{"faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before, "applied": applied}}))
"""


def faults(reuse: bool) -> dict:
    done = subprocess.run([sys.executable, "-c", LOOP.format(src=str(SRC), reuse=reuse)], capture_output=True, text=True,
                          timeout=300, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_reusing_freed_memory_removes_the_page_faults_of_growing_allocations():
    default, reused = faults(False), faults(True)
    assert reused["applied"] is True
    # glibc's defaults fault in fresh pages for most of these copies (~2,000 faults measured);
    # with the thresholds fixed the heap serves them from memory it already holds.
    assert default["faults"] > 500, default
    assert reused["faults"] < default["faults"] / 10, (default, reused)


def test_not_glibc_leaves_malloc_alone(monkeypatch):
    from steer import allocator

    monkeypatch.setattr(allocator.platform, "libc_ver", lambda: ("musl", "1.2"))
    assert allocator.reuse_freed_memory() is False
