"""Keep freed CPU memory in the process for reuse (``reuse_freed_memory``, on by default).

A training step allocates and frees the same tensors again and again: every decoding step widens
the key/value buffers into fresh float32 copies, every update allocates activations of a few MB.
glibc's ``malloc`` serves blocks above its mmap threshold (128 KB at start, raised adaptively up
to the largest block freed so far) with fresh ``mmap`` pages and gives the top of its heap back to
the kernel once more than its trim threshold is free there; the next allocation of that size then
page-faults its memory in again, one fault and one page zeroing per 4 KB. Decoding the TRL
benchmark's fixed shape (2.38M policy, bf16) took 5,300-10,500 minor faults per call.

:func:`reuse_freed_memory` fixes both thresholds with ``mallopt``: blocks below 32 MB (glibc's
ceiling for the mmap threshold on 64-bit) come from the heap, and the heap keeps up to 64 MB of
free memory at its top. The same decoding then took 3-1,100 faults per call, and an RL step of
that benchmark was ~6% faster (``bench_step.py``, median of 4 interleaved pairs; see the
benchmarks README). The price: up to 64 MB of freed memory stays counted in the process's
resident size until it is reused; the peak (what decides an out-of-memory kill) is unchanged.
Larger tensors are mmapped as before. Only glibc has ``mallopt``; elsewhere (macOS, musl)
nothing changes.
"""

from __future__ import annotations

import ctypes
import logging
import platform

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's <malloc.h> parameter numbers
MMAP_THRESHOLD = 32 << 20  # glibc's largest accepted value on 64-bit (HEAP_MAX_SIZE / 2)
TRIM_THRESHOLD = 64 << 20


def reuse_freed_memory() -> bool:
    """Set glibc's mmap and trim thresholds for this process (see the module docstring). True if
    both were set; False where the C library is not glibc or refuses a value (then nothing is
    changed for that value). Process-wide and permanent; calling it again sets the same values
    (``steer.app.build_module`` calls it for every module it builds)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        log.debug("reuse_freed_memory: not glibc (%s), malloc left as is", platform.libc_ver())
        return False
    libc = ctypes.CDLL(None)  # the symbols already loaded into this process, glibc's among them
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is None:
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    done = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    log.debug("reuse_freed_memory: mallopt %s", "set" if done else "refused")
    return done
