"""Run untrusted Python (model-generated code) in a separate, resource-limited process.

What one :func:`run_python` call gives the code:

- a fresh interpreter (``sys.executable``) in its **own session / process group**; at the end the
  whole group gets SIGKILL, so forked children and grandchildren die with it;
- a **wall-clock limit** (enforced here: we wait on the process with a timeout, no threads) and a
  **CPU-time limit** (``RLIMIT_CPU``, enforced by the kernel);
- an **address-space limit** (``RLIMIT_AS``): a large allocation raises ``MemoryError``;
- **capped output**: stdout/stderr go to files whose size is capped by ``RLIMIT_FSIZE``; writes past
  the cap fail with ``EFBIG`` (Python ignores SIGXFSZ), so a program that floods its output fails
  instead of filling memory or disk; the same cap applies to every file the code writes;
- its **own temporary working directory** (also ``HOME`` and ``TMPDIR``), deleted afterwards;
- **no network**, by the first method that works on this machine (see :func:`network_isolation`):
  ``"namespace"``: run under ``unshare --user --map-root-user --net``, a fresh network namespace
  holding only a downed loopback device, so every connection fails at the kernel (needs util-linux
  ``unshare`` and unprivileged user namespaces, or root); in the new user namespace the code also
  cannot raise its resource limits back, even when we run as root;
  ``"socket-patch"``: otherwise ``socket.socket`` is replaced before the code runs by a class that
  refuses to be created. This is best effort only: ``_socket`` or a child interpreter gets around it.

It is a guard against accidents (infinite loops, memory blow-ups, stray downloads, leftover
processes), not a security boundary against a determined attacker: the code still runs as our user
and sees our file system. A grandchild that starts its own session (``setsid``) escapes the process
group kill. We use no PID namespace on purpose: the code would run as the namespace's init process,
which ignores signals without a handler (SIGXCPU included) and loses its exit status.
"""

from __future__ import annotations

import functools
import json
import math
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

Status = Literal["ok", "failed", "timeout", "error"]

_UNSHARE_NET = ("unshare", "--user", "--map-root-user", "--net")

# Runs first in the child: sets the limits, optionally disables sockets, then runs the user's
# main.py as __main__. Settings arrive as JSON in argv[1] so the text never needs formatting.
_BOOTSTRAP = """\
import json, resource, sys
_cfg = json.loads(sys.argv[1])
resource.setrlimit(resource.RLIMIT_CPU, (_cfg["cpu_s"], _cfg["cpu_s"] + 1))
resource.setrlimit(resource.RLIMIT_AS, (_cfg["memory_bytes"], _cfg["memory_bytes"]))
resource.setrlimit(resource.RLIMIT_FSIZE, (_cfg["max_file_bytes"], _cfg["max_file_bytes"]))
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
if _cfg["patch_socket"]:
    import _socket, socket
    class _NoNetwork(socket.socket):
        def __init__(self, *args, **kwargs):
            raise PermissionError("network access is disabled in the sandbox")
    socket.socket = _socket.socket = _NoNetwork
del json, resource, _cfg
sys.argv = ["main.py"]
with open("main.py", encoding="utf-8") as _f:
    _code = compile(_f.read(), "main.py", "exec")
del _f
exec(_code, {"__name__": "__main__", "__builtins__": __builtins__})
"""


@dataclass
class SandboxResult:
    """Outcome of one sandboxed run."""

    status: Status
    """``ok``: exit code 0; ``failed``: non-zero exit or killed by a signal (an exception, a
    ``MemoryError``, output over the cap); ``timeout``: wall-clock or CPU-time limit hit;
    ``error``: the sandbox itself could not run the code."""
    stdout: str
    stderr: str
    returncode: int | None
    """Exit code; negative means killed by that signal (subprocess convention); None if never run."""
    elapsed_s: float


@functools.cache
def network_isolation() -> Literal["namespace", "socket-patch"]:
    """Which network block :func:`run_python` uses on this machine (probed once per process)."""
    if shutil.which("unshare") is None:
        return "socket-patch"
    try:
        probe = subprocess.run([*_UNSHARE_NET, "true"], capture_output=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "socket-patch"
    return "namespace" if probe.returncode == 0 else "socket-patch"


def run_python(
    code: str,
    stdin: str | bytes = b"",
    *,
    timeout_s: float = 10.0,
    cpu_time_s: float | None = None,
    memory_mb: int = 1024,
    max_output_bytes: int = 1 << 20,
    block_network: bool = True,
    site_packages: bool = True,
    env: Mapping[str, str] | None = None,
) -> SandboxResult:
    """Run ``code`` as ``__main__`` in a fresh, limited interpreter; never raises for bad code.

    Args:
        code: Python source, written to ``main.py`` in the temporary working directory.
        stdin: data the program reads on standard input.
        timeout_s: wall-clock limit; the process group is killed when it is reached.
        cpu_time_s: CPU-time limit (``RLIMIT_CPU``, whole seconds, rounded up); default ``timeout_s``.
        memory_mb: address-space limit (``RLIMIT_AS``) of each process. Leave room for the
            interpreter itself (~30 MB, more if the code imports numpy).
        max_output_bytes: cap of stdout, of stderr and of any file the code writes.
        block_network: cut network access (see :func:`network_isolation`).
        site_packages: False starts the interpreter with ``-S``: only the standard library is
            importable, and start-up is several times faster (no ``site`` / ``.pth`` processing).
        env: extra environment variables; the child otherwise gets a small clean environment with
            ``PYTHONHASHSEED=0`` so that set/dict ordering of str is reproducible across runs.
    """
    start = time.monotonic()
    root = Path(tempfile.mkdtemp(prefix="steer-sandbox-"))
    workdir = root / "work"  # the code's cwd; its stdin/stdout/stderr files live beside it
    workdir.mkdir()
    try:
        isolation = network_isolation() if block_network else None
        config = {
            "cpu_s": max(1, math.ceil(cpu_time_s if cpu_time_s is not None else timeout_s)),
            "memory_bytes": memory_mb * 1024 * 1024,
            "max_file_bytes": max_output_bytes,
            "patch_socket": isolation == "socket-patch",
        }
        (workdir / "main.py").write_text(code, encoding="utf-8")
        (root / "stdin").write_bytes(stdin.encode() if isinstance(stdin, str) else stdin)
        command = [sys.executable, *([] if site_packages else ["-S"]), "-c", _BOOTSTRAP, json.dumps(config)]
        if isolation == "namespace":
            command = [*_UNSHARE_NET, *command]
        child_env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(workdir),
            "TMPDIR": str(workdir),
            "LANG": "C.UTF-8",
            "PYTHONHASHSEED": "0",
            "PYTHONDONTWRITEBYTECODE": "1",
            "PYTHONIOENCODING": "utf-8",
            "OMP_NUM_THREADS": "1",
            **(env or {}),
        }
        with (
            open(root / "stdin", "rb") as stdin_file,
            open(root / "stdout", "wb") as stdout_file,
            open(root / "stderr", "wb") as stderr_file,
        ):
            try:
                process = subprocess.Popen(
                    command,
                    stdin=stdin_file,
                    stdout=stdout_file,
                    stderr=stderr_file,
                    cwd=workdir,
                    env=child_env,
                    start_new_session=True,
                )
            except OSError as error:
                return SandboxResult("error", "", f"sandbox could not start: {error}", None, 0.0)
            timed_out = not _wait(process, timeout_s)
            _kill_group(process)
        returncode = process.returncode
        stderr = _read_capped(root / "stderr", max_output_bytes)
        if timed_out or returncode == -signal.SIGXCPU:  # SIGXCPU: the CPU-time limit
            status: Status = "timeout"
        elif isolation == "namespace" and returncode == 1 and stderr.startswith("unshare: "):
            status = "error"  # e.g. out of user namespaces: the code never ran
        else:
            status = "ok" if returncode == 0 else "failed"
        stdout = _read_capped(root / "stdout", max_output_bytes)
        return SandboxResult(status, stdout, stderr, returncode, time.monotonic() - start)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _wait(process: subprocess.Popen, timeout_s: float) -> bool:
    """Wait for ``process`` to exit within ``timeout_s``; True if it did.

    Uses a pidfd where the OS has one: it wakes up exactly on exit and leaves the process unreaped,
    so its process group id cannot be reused before :func:`_kill_group`. ``Popen.wait`` (the
    fallback) polls with sleeps of up to 50 ms, a large share of a typical 50 ms run.
    """
    try:
        pidfd = os.pidfd_open(process.pid)
    except (AttributeError, OSError):
        try:
            process.wait(timeout=timeout_s)
            return True
        except subprocess.TimeoutExpired:
            return False
    try:
        ready, _, _ = select.select([pidfd], [], [], timeout_s)
    finally:
        os.close(pidfd)
    return bool(ready)


def _kill_group(process: subprocess.Popen) -> None:
    """SIGKILL the child's whole process group (it may have left children behind) and reap it."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()


def _read_capped(path: Path, limit: int) -> str:
    with open(path, "rb") as file:
        return file.read(limit).decode("utf-8", errors="replace")
