"""Run untrusted Python (model-generated code) in a separate, resource-limited process.

What every :func:`run_python` call gives the code, whatever the isolation level:

- a fresh interpreter (``sys.executable``) with a **minimal environment** (``PATH``, ``HOME``,
  ``TMPDIR``, locale and a few ``PYTHON*`` settings, plus the caller's ``env``): none of the
  trainer's variables (tokens, credentials, ``MLFLOW_*``) reach it;
- a **wall-clock limit** (we wait on the process with a timeout) and a **CPU-time limit**
  (``RLIMIT_CPU``; the hard limit one second later ends a program that ignores ``SIGXCPU``);
- an **address-space limit** per process (``RLIMIT_AS``): a large allocation raises ``MemoryError``;
- a **process-count limit** (``RLIMIT_NPROC``, ``max_processes``): a fork bomb gets ``EAGAIN``;
- **capped output**: stdout/stderr go to files whose size is capped by ``RLIMIT_FSIZE``; writes past
  the cap fail with ``EFBIG`` (Python ignores SIGXFSZ); the same cap applies to every file it writes;
- its **own temporary working directory** (also ``HOME`` and ``TMPDIR``), deleted afterwards;
- at the end, **every descendant is killed** and reaped before :func:`run_python` returns, and the
  temporary folder is removed.

How strongly the code is fenced in depends on what the machine allows. :func:`isolation_level`
probes once per process, strongest first, and every run uses the first level that works:

``"namespaces"`` (we run as root, e.g. in CI and on the lab machines)
    ``unshare --pid --fork --mount --mount-proc --net`` starts a small supervisor (``_SUPERVISOR``)
    as PID 1 of a new PID namespace, in new mount and network namespaces. The supervisor

    - covers the sensitive directories (:func:`hidden_paths`: ``/root``, ``/home``, the top
      directories holding the trainer's working directory and this repository, and the
      world-writable ``/tmp``, ``/var/tmp``, ``/dev/shm``, ``/run``, ...) with small empty
      ``tmpfs`` mounts, then binds back, read-only, only the Python installation (``sys.prefix``)
      and, writable, the run's working directory; every other mount is remounted read-only;
    - runs the code under a **fresh unprivileged uid/gid** (a random id in ``SANDBOX_UID_RANGE``,
      no supplementary groups, ``no_new_privs``), so the kernel enforces ``RLIMIT_NPROC`` (root
      bypasses it), the code cannot signal anything outside, nor read files that are not
      world-readable (``/etc/shadow``, ``/root``'s contents, 0600 files), nor write anywhere except
      its folder and throw-away tmpfs covers;
    - waits for the code and reports its exit status through a pipe. When PID 1 exits, or is
      killed by us at the deadline, the kernel kills every process of the namespace: a
      grandchild that calls ``setsid`` and daemonises dies too. The supervisor also arms its own
      deadline (``timeout_s`` + 2 s), so nothing outlives a trainer that died mid-run.

    The network namespace holds only a downed loopback device: every connection fails. The new
    ``/proc`` shows only the sandbox's own processes (not the trainer and its environment).

``"user-namespaces"`` (not root, but unprivileged user namespaces are allowed)
    The same with ``--user --map-root-user``: the code runs as root *of its namespace* mapped to
    our own uid, with every capability dropped (bounding set, ``SECBIT_NOROOT``, ``no_new_privs``)
    so that it cannot undo the covers. It keeps our uid outside, so it can read and write what we
    can outside the covered directories (they are read-only mounts, except its folder). It
    counts against our own ``RLIMIT_NPROC``, which the kernel enforces for non-root users.

``"process-group"`` (no usable ``unshare``)
    A plain child in its own session. If we are root and the interpreter is reachable by any uid
    (not under a 0700 home such as ``/root/.pyenv``), the child still gets a fresh unprivileged
    uid (so ``RLIMIT_NPROC`` applies, the trainer cannot be signalled, root-only files cannot be
    read) and at the end every process with that uid is killed, however it detached. Otherwise
    the child has our uid: at the end we kill its process group and every process
    carrying the run's marker variable (``STEER_SANDBOX_TOKEN``) in its environment; a grandchild
    that clears its environment *and* leaves the session escapes, and the code can read our files
    and signal our processes. The network is cut only by replacing ``socket.socket`` before the
    code runs (``_socket`` or a child interpreter gets around it). This level is a guard against
    accidents, not a boundary.

What the code can read and write at the ``namespaces`` level, precisely: it reads what any
unprivileged user may read outside the covered directories (``/usr``, ``/etc`` without
``shadow``, ``/proc`` of its own namespace, ``/sys``) plus the Python installation; it writes
only its working directory and the covers over ``/tmp``, ``/var/tmp``, ``/dev/shm``, ``/run``
(tmpfs, 16 MB each, gone with the namespace); everything else is a read-only mount. It cannot see
the trainer's processes, environment, repository, data or home. Tested by
``tests/rewards/test_hostile_code.py``.

Known limits: per-process limits (``RLIMIT_AS``) do not bound the total memory of
``max_processes`` processes, and the working directory is on disk, so many files each under the
size cap can fill it within the time limit; a memory/IO cgroup would close both (not used:
cgroups are not writable on every machine we run on). Starting the supervisor costs about 0.1 s
per run on top of the interpreter's start-up.
"""

from __future__ import annotations

import functools
import json
import math
import os
import random
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

Status = Literal["ok", "failed", "timeout", "error"]
Isolation = Literal["namespaces", "user-namespaces", "process-group"]
ISOLATION_LEVELS: tuple[Isolation, ...] = ("namespaces", "user-namespaces", "process-group")

SANDBOX_UID_RANGE = range(1_600_000_000, 1_601_000_000)
"""Unprivileged uids (and gids) the code runs as when we are root: a fresh one per run, owned by
no file and no other process, so that the kernel's per-uid process count starts at zero and every
process of the run can be found by its uid."""
ENV_MARKER = "STEER_SANDBOX_TOKEN"
"""Environment variable carrying a per-run token, to find the run's processes without namespaces."""
SUPERVISOR_GRACE_S = 2.0
"""The supervisor's own deadline is ``timeout_s`` plus this (ours comes first)."""
COVER_SIZE = "size=16m,nr_inodes=4096"
"""tmpfs options of the empty directories laid over hidden paths (they live in memory)."""
_SYSTEM_TOP_DIRS = frozenset(
    {"", "bin", "boot", "dev", "etc", "lib", "lib32", "lib64", "libx32", "proc", "sbin", "sys", "usr", "var"}
)
_WORLD_WRITABLE = ("/tmp", "/var/tmp", "/dev/shm", "/run", "/var/lock", "/var/crash")
_SENSITIVE = ("/root", "/home", "/mnt", "/media", "/srv", "/opt")

_NAMESPACE_FLAGS: dict[str, tuple[str, ...]] = {
    "namespaces": ("unshare", "--pid", "--fork", "--kill-child", "--mount", "--mount-proc"),
    "user-namespaces": (
        "unshare", "--user", "--map-root-user", "--pid", "--fork", "--kill-child", "--mount", "--mount-proc",
    ),
}

# PID 1 of the sandbox's namespaces (run with -S: standard library only). Settings arrive as JSON in
# argv[1]. It lays the covers, starts the code under the sandbox identity, reaps every orphan (init's
# job), writes {"returncode": n} or {"error": text} to the status pipe and exits, which makes the
# kernel kill whatever is left in the namespace.
_SUPERVISOR = r"""
import ctypes, json, os, re, resource, signal, sys
cfg = json.loads(sys.argv[1])
libc = ctypes.CDLL(None, use_errno=True)
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_BIND, MS_REC = 1, 2, 4, 8, 32, 4096, 16384
FLAG_BITS = {"ro": MS_RDONLY, "nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC}

def report(**status):
    os.write(cfg["status_fd"], json.dumps(status).encode())
    os._exit(0)

def mount(source, target, fstype, flags, data=None):
    if libc.mount(source and source.encode(), target.encode(), fstype and fstype.encode(), flags,
                  data and data.encode()) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"mount {source} on {target}: {os.strerror(errno)}")

def under(path, roots):
    return any(path == root or path.startswith(root.rstrip("/") + "/") for root in roots)

def on_deadline(signum, frame):
    report(timeout=True)

signal.signal(signal.SIGALRM, on_deadline)
signal.setitimer(signal.ITIMER_REAL, cfg["deadline_s"])
try:
    keep = {path: os.open(path, os.O_PATH | os.O_DIRECTORY) for path in cfg["visible"] + [cfg["workdir"]]}
    covers = [path for path in cfg["hidden"] if os.path.isdir(path) and not os.path.islink(path)]
    for path in covers:
        mode = "1777" if path in cfg["world_writable"] else "555"  # 555: not even for root-of-namespace
        mount("tmpfs", path, "tmpfs", MS_NOSUID | MS_NODEV, f"{cfg['cover_size']},mode={mode}")
    # everything else read-only (a bind remount must repeat the flags a user namespace locked)
    with open("/proc/self/mountinfo") as file:
        mounts = [(line.split()[4], line.split()[5]) for line in file]
    for point, options in mounts:
        point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), point)
        if under(point, ["/proc", "/dev"] + covers) or "ro" in options.split(","):
            continue
        flags = MS_REMOUNT | MS_BIND | MS_RDONLY
        for option in options.split(","):
            flags |= FLAG_BITS.get(option, 0)
        try:
            mount(None, point, None, flags)
        except OSError:
            pass  # e.g. a mount we may not touch; the uid change still protects it
    for path, fd in keep.items():  # bind the kept directories back at their own paths
        if under(path, covers):
            os.makedirs(path, exist_ok=True)
            mount(f"/proc/self/fd/{fd}", path, None, MS_BIND | MS_REC)
            # a bind copies the flags of its source, which is read-only by now
            writable = 0 if path == cfg["workdir"] else MS_RDONLY
            mount(None, path, None, MS_REMOUNT | MS_BIND | MS_NOSUID | MS_NODEV | writable)
        os.close(fd)
except Exception as error:
    report(error=f"sandbox setup failed: {error!r}")

read_end, write_end = os.pipe()  # the child reports a failed exec here
pid = os.fork()
if pid == 0:
    try:
        os.close(read_end)
        os.set_inheritable(write_end, False)
        os.close(cfg["status_fd"])
        os.setsid()  # its own process group: a killpg(0) must not reach unshare outside
        for name, value in cfg["rlimits"].items():
            resource.setrlimit(getattr(resource, name), (value, value))
        libc.prctl(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS
        if cfg["uid"] is not None:
            os.setgroups([])
            os.setresgid(cfg["uid"], cfg["uid"], cfg["uid"])
            os.setresuid(cfg["uid"], cfg["uid"], cfg["uid"])
        else:  # root of a user namespace: give up every capability for good
            libc.prctl(28, 0x2F, 0, 0, 0)  # PR_SET_SECUREBITS: NOROOT, NO_SETUID_FIXUP, KEEP_CAPS_LOCKED...
            for cap in range(64):
                libc.prctl(24, cap, 0, 0, 0)  # PR_CAPBSET_DROP
            header = (ctypes.c_uint32 * 2)(0x20080522, 0)
            data = (ctypes.c_uint32 * 6)()
            if libc.capset(header, data) != 0:
                raise OSError(ctypes.get_errno(), "capset failed")
        os.chdir(cfg["workdir"])
        signal.signal(signal.SIGALRM, signal.SIG_DFL)
        os.execve(cfg["argv"][0], cfg["argv"], cfg["env"])
    except BaseException as error:
        os.write(write_end, f"sandbox could not start the code: {error!r}".encode())
    os._exit(127)
os.close(write_end)
exec_error = b""
while chunk := os.read(read_end, 4096):
    exec_error += chunk
if exec_error:
    report(error=exec_error.decode(errors="replace"))
while True:
    try:
        done, wait_status = os.wait()
    except ChildProcessError:
        report(error="lost the code's process")
    if done == pid:
        report(returncode=os.waitstatus_to_exitcode(wait_status))
"""

# Runs first in the child, in every level: sets the limits (again: the process-group level has no
# supervisor), optionally disables sockets, then runs the user's main.py as __main__.
_BOOTSTRAP = """\
import json, resource, sys
_cfg = json.loads(sys.argv[1])
for _name, _value in _cfg["rlimits"].items():
    _soft, _hard = resource.getrlimit(getattr(resource, _name))
    if _hard == resource.RLIM_INFINITY or _value[1] <= _hard:
        resource.setrlimit(getattr(resource, _name), tuple(_value))
if _cfg["patch_socket"]:
    import _socket, socket
    class _NoNetwork(socket.socket):
        def __init__(self, *args, **kwargs):
            raise PermissionError("network access is disabled in the sandbox")
    socket.socket = _socket.socket = _NoNetwork
del json, resource, _cfg, _name, _value, _soft, _hard
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
    isolation: Isolation | None = None
    """The isolation level the run used (see the module docstring)."""


def hidden_paths() -> list[str]:
    """Directories the ``namespaces`` levels cover with an empty tmpfs (the code cannot see them).

    The usual places of secrets and of other people's files, the world-writable directories (so
    nothing the code writes there outlives the run), and, for the trainer's working directory, its
    ``HOME`` and this repository: the directory itself and its top-level directory unless that is a
    system one (a clone at ``/srv/steer-lab`` hides ``/srv``; ``/usr/src/app`` hides only itself).
    """
    paths = set(_WORLD_WRITABLE) | set(_SENSITIVE)
    for place in (os.getcwd(), os.environ.get("HOME", ""), str(Path(__file__).resolve().parents[3])):
        place = os.path.realpath(place) if place else ""
        if not place or place == "/":
            continue
        paths.add(place)
        top = "/" + place.strip("/").split("/")[0]
        if top.strip("/") not in _SYSTEM_TOP_DIRS:
            paths.add(top)
    # an inner path is already hidden by its parent; mounting over it too would only cost time
    ordered = sorted(paths, key=len)
    return [p for i, p in enumerate(ordered) if not any(p.startswith(q.rstrip("/") + "/") for q in ordered[:i])]


def _visible_paths() -> list[str]:
    """The Python installation the code runs on (read-only inside the sandbox)."""
    paths = {os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix)}
    paths.add(os.path.dirname(os.path.realpath(sys.executable)))
    ordered = sorted(paths, key=len)
    return [p for i, p in enumerate(ordered) if not any(p.startswith(q.rstrip("/") + "/") for q in ordered[:i])]


@functools.cache
def _others_can_run_python() -> bool:
    """Whether a uid that owns nothing can start ``sys.executable`` and read its library (every
    directory on the way searchable by others): without namespaces to bind it back, an interpreter
    under a private home (``/root/.pyenv``) rules out the uid change of the process-group level."""
    for target in {os.path.realpath(sys.executable), os.path.realpath(sys.prefix)}:
        path = Path(target)
        for part in [path, *path.parents]:
            try:
                if not part.stat().st_mode & 0o001:
                    return False
            except OSError:
                return False
    return True


def _run_supervised(level: Isolation, *, block_network: bool) -> list[str]:
    """The command prefix that starts the supervisor for ``level``."""
    return [*_NAMESPACE_FLAGS[level], *(["--net"] if block_network else []), sys.executable, "-S", "-c", _SUPERVISOR]


@functools.cache
def level_works(level: Isolation) -> bool:
    """Whether ``level`` can run code on this machine (a probe run, ~0.2 s, once per process)."""
    if level == "process-group":
        return True
    if shutil.which("unshare") is None or (level == "namespaces" and os.geteuid() != 0):
        return False
    try:
        probe = _run(
            "import os; print(os.getuid())", b"", level=level, timeout_s=20.0, cpu_time_s=20.0,
            memory_mb=1024, max_output_bytes=1 << 16, max_processes=64, block_network=True,
            site_packages=False, env=None,
        )
    except OSError:
        return False
    return probe.status == "ok" and bool(probe.stdout.strip())


@functools.cache
def isolation_level() -> Isolation:
    """The strongest isolation level that works on this machine (see the module docstring)."""
    return next(level for level in ISOLATION_LEVELS if level_works(level))


def network_isolation() -> Literal["namespace", "socket-patch"]:
    """How :func:`run_python` cuts the network on this machine: a network namespace when an
    ``unshare`` level works, else the ``socket.socket`` patch."""
    return "socket-patch" if isolation_level() == "process-group" else "namespace"


def run_python(
    code: str,
    stdin: str | bytes = b"",
    *,
    timeout_s: float = 10.0,
    cpu_time_s: float | None = None,
    memory_mb: int = 1024,
    max_output_bytes: int = 1 << 20,
    max_processes: int = 64,
    block_network: bool = True,
    site_packages: bool = True,
    env: Mapping[str, str] | None = None,
    isolation: Isolation | None = None,
) -> SandboxResult:
    """Run ``code`` as ``__main__`` in a fresh, limited interpreter; never raises for bad code.

    Args:
        code: Python source, written to ``main.py`` in the temporary working directory.
        stdin: data the program reads on standard input.
        timeout_s: wall-clock limit; every process of the run is killed when it is reached.
        cpu_time_s: CPU-time limit (``RLIMIT_CPU``, whole seconds, rounded up); default ``timeout_s``.
        memory_mb: address-space limit (``RLIMIT_AS``) of each process. Leave room for the
            interpreter itself (~30 MB, more if the code imports numpy).
        max_output_bytes: cap of stdout, of stderr and of any file the code writes.
        max_processes: ``RLIMIT_NPROC``: processes (threads included) the code may have at once.
            Enforced by the kernel only for a non-root uid, which every level but a root
            ``process-group`` run has (see the module docstring).
        block_network: cut network access (a network namespace, else the socket patch).
        site_packages: False starts the interpreter with ``-S``: only the standard library is
            importable, and start-up is several times faster (no ``site`` / ``.pth`` processing).
        env: extra environment variables; the child otherwise gets a small clean environment with
            ``PYTHONHASHSEED=0`` so that set/dict ordering of str is reproducible across runs.
        isolation: force a level (tests); default :func:`isolation_level`.
    """
    level = isolation or isolation_level()
    return _run(
        code, stdin, level=level, timeout_s=timeout_s, cpu_time_s=cpu_time_s, memory_mb=memory_mb,
        max_output_bytes=max_output_bytes, max_processes=max_processes, block_network=block_network,
        site_packages=site_packages, env=env,
    )


def _run(
    code: str,
    stdin: str | bytes,
    *,
    level: Isolation,
    timeout_s: float,
    cpu_time_s: float | None,
    memory_mb: int,
    max_output_bytes: int,
    max_processes: int,
    block_network: bool,
    site_packages: bool,
    env: Mapping[str, str] | None,
) -> SandboxResult:
    start = time.monotonic()
    root = Path(tempfile.mkdtemp(prefix="steer-sandbox-"))
    workdir = root / "work"  # the code's cwd; its stdin/stdout/stderr files live beside it
    workdir.mkdir()
    token = uuid.uuid4().hex
    # a fresh unprivileged identity whenever we may take one (root): see the module docstring
    uid = None
    if os.geteuid() == 0 and (level == "namespaces" or (level == "process-group" and _others_can_run_python())):
        uid = random.choice(SANDBOX_UID_RANGE)
    status_read = status_write = -1
    try:
        cpu_s = max(1, math.ceil(cpu_time_s if cpu_time_s is not None else timeout_s))
        rlimits = {
            "RLIMIT_CPU": (cpu_s, cpu_s + 1),
            "RLIMIT_AS": (memory_mb << 20,) * 2,
            "RLIMIT_FSIZE": (max_output_bytes,) * 2,
            "RLIMIT_CORE": (0, 0),
            "RLIMIT_NPROC": (max_processes,) * 2,
        }
        (workdir / "main.py").write_text(code, encoding="utf-8")
        (root / "stdin").write_bytes(stdin.encode() if isinstance(stdin, str) else stdin)
        if uid is not None:
            os.chown(workdir, uid, uid)
        config = {"rlimits": rlimits, "patch_socket": block_network and level == "process-group"}
        python = [sys.executable, *([] if site_packages else ["-S"]), "-c", _BOOTSTRAP, json.dumps(config)]
        child_env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(workdir),
            "TMPDIR": str(workdir),
            "LANG": "C.UTF-8",
            "PYTHONHASHSEED": "0",
            "PYTHONDONTWRITEBYTECODE": "1",
            "PYTHONIOENCODING": "utf-8",
            "OMP_NUM_THREADS": "1",
            ENV_MARKER: token,
            **(env or {}),
        }
        popen_options: dict = {}
        if level == "process-group":
            command = python
            popen_options = {"env": child_env, "cwd": workdir}
            if uid is not None:
                popen_options.update(user=uid, group=uid, extra_groups=[])
        else:
            status_read, status_write = os.pipe()
            supervisor_config = {
                "workdir": str(workdir),
                "hidden": hidden_paths(),
                "visible": _visible_paths(),
                "world_writable": list(_WORLD_WRITABLE),
                "cover_size": COVER_SIZE,
                "status_fd": status_write,
                "deadline_s": timeout_s + SUPERVISOR_GRACE_S,
                "uid": uid,
                "rlimits": {name: value[1] for name, value in rlimits.items()},
                "argv": python,
                "env": child_env,
            }
            command = [*_run_supervised(level, block_network=block_network), json.dumps(supervisor_config)]
            popen_options = {"pass_fds": (status_write,), "env": {"PATH": child_env["PATH"]}}
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
                    start_new_session=True,
                    **popen_options,
                )
            except OSError as error:
                return SandboxResult("error", "", f"sandbox could not start: {error}", None, 0.0, level)
            if status_write >= 0:
                os.close(status_write)
                status_write = -1
            timed_out = not _wait(process, timeout_s)
            _kill_all(process, level, uid, token)
        stderr = _read_capped(root / "stderr", max_output_bytes)
        if level != "process-group":  # unshare's own complaint when its child was killed
            stderr = "".join(line for line in stderr.splitlines(True) if not line.startswith("unshare: sigprocmask"))
        stdout = _read_capped(root / "stdout", max_output_bytes)
        error = None
        if level == "process-group":
            returncode = process.returncode
        else:
            report = _read_status(status_read)
            returncode = report.get("returncode")
            timed_out = timed_out or bool(report.get("timeout"))
            if "error" in report:
                error = report["error"]
            elif returncode is None and not timed_out:
                error = f"the sandbox ended without a status (exit code {process.returncode}): {stderr[-300:]}"
        elapsed = time.monotonic() - start
        if error is not None:
            return SandboxResult("error", stdout, f"{stderr}{error}", None, elapsed, level)
        if timed_out or returncode == -signal.SIGXCPU:  # SIGXCPU: the CPU-time limit
            status: Status = "timeout"
        else:
            status = "ok" if returncode == 0 else "failed"
        return SandboxResult(status, stdout, stderr, returncode, elapsed, level)
    finally:
        for fd in (status_read, status_write):
            if fd >= 0:
                os.close(fd)
        shutil.rmtree(root, ignore_errors=True)


def _wait(process: subprocess.Popen, timeout_s: float) -> bool:
    """Wait for ``process`` to exit within ``timeout_s``; True if it did.

    Uses a pidfd where the OS has one: it wakes up exactly on exit and leaves the process unreaped,
    so its process group id cannot be reused before :func:`_kill_all`. ``Popen.wait`` (the
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


def _kill_all(process: subprocess.Popen, level: Isolation, uid: int | None, token: str) -> None:
    """Kill every process of the run and reap ``process``; returns once none is left.

    Namespaces: SIGKILL to the supervisor (PID 1 of the namespace) makes the kernel kill and reap
    the whole namespace before the supervisor's exit is reported to ``unshare`` (our child), which
    then exits by itself: once it is reaped, nothing of the run is left. Without namespaces (or if
    ``unshare`` had not started the supervisor yet) we kill the process group, then sweep
    ``/proc`` for the run's uid (when it has its own) or marker variable until nothing matches.
    """
    sweep = level == "process-group"
    if process.poll() is None and level != "process-group":
        supervisors = _processes(lambda info: info["ppid"] == process.pid)
        for pid in supervisors:
            _signal(pid)
        try:
            process.wait(timeout=10.0 if supervisors else 0.0)
        except subprocess.TimeoutExpired:
            sweep = True
    if process.poll() is None or sweep:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    process.wait()
    if not sweep:
        return
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline:
        if uid is not None:
            left = _processes(lambda info: info["uid"] == uid)
        else:
            left = _processes(lambda info: info["sid"] == process.pid or _has_marker(info["pid"], token))
        if not left:
            break
        for pid in left:
            _signal(pid)
        time.sleep(0.01)


def _signal(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _processes(predicate) -> list[int]:
    """Pids of live (non-zombie) processes whose ``{"pid", "ppid", "sid", "uid"}`` satisfy ``predicate``."""
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as file:
                fields = file.read().rsplit(b")", 1)[1].split()
            if fields[0] in (b"Z", b"X"):
                continue
            info = {"pid": int(entry.name), "ppid": int(fields[1]), "sid": int(fields[3]), "uid": entry.stat().st_uid}
        except (OSError, IndexError, ValueError):
            continue
        if predicate(info):
            found.append(info["pid"])
    return found


def _has_marker(pid: int, token: str) -> bool:
    try:
        with open(f"/proc/{pid}/environ", "rb") as file:
            return f"{ENV_MARKER}={token}".encode() in file.read().split(b"\0")
    except OSError:
        return False


def processes_of_runs() -> list[int]:
    """Live processes that belong to a sandbox run (a sandbox uid or the marker variable): for
    tests and leak checks; empty when every run cleaned up after itself."""
    def belongs(info: dict) -> bool:
        if info["uid"] in SANDBOX_UID_RANGE:
            return True
        try:
            with open(f"/proc/{info['pid']}/environ", "rb") as file:
                return f"{ENV_MARKER}=".encode() in file.read()
        except OSError:
            return False

    return _processes(belongs)


def _read_status(fd: int) -> dict:
    """The supervisor's JSON report (empty if it was killed before writing one)."""
    os.set_blocking(fd, False)
    data = b""
    try:
        while chunk := os.read(fd, 65536):
            data += chunk
    except BlockingIOError:
        pass
    try:
        return json.loads(data) if data else {}
    except ValueError:
        return {}


def _read_capped(path: Path, limit: int) -> str:
    with open(path, "rb") as file:
        return file.read(limit).decode("utf-8", errors="replace")

