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

What the run gets **as a whole**, where the machine allows (:func:`containment`, probed and logged
once per process, at start-up: ``CodeReward`` asks for it when it is built):

- a **cgroup of its own** (:class:`RunCgroup`, cgroup v2 with the ``memory`` and ``pids``
  controllers where writable, else v1 ``memory`` plus ``pids``; made under the trainer's own
  cgroup, or beside its leaf in v2) with a **total memory cap** (``total_memory_mb``: every
  process, tmpfs file and kernel page the run touches, no swap) and a **process cap**
  (``pids.max``: ``max_processes``, plus the supervisor). The first process of the run joins it
  before any code runs (the supervisor writes itself into it; at the ``process-group`` level the
  child waits on a pipe until we have moved it). When the kernel kills a process of the run for
  memory, we end the whole run at once (status ``failed``; stderr says so), and after every run
  we kill whatever is left in the group and remove it. Needs root, or a delegated v2 subtree;
- a **disk cap** at the namespace levels: the working directory is a tmpfs of ``disk_mb``
  (default ``max(DEFAULT_DISK_MB, 2 x max_output_bytes + 16 MB)``) and ``WORKDIR_INODES`` files,
  mounted inside the run's own mount namespace, so it lives in (capped) memory, disappears with the
  namespace and nothing the code writes reaches the disk.

Where no cgroup can be made (not root, no delegation), the per-process limits above are all there
is, and :func:`containment` logs a warning: then one run may hold up to ``max_processes`` x
``memory_mb`` (64 x 1 GB for the code reward), more than a 24 GB machine. At the ``process-group``
level the working directory is on disk: each file is capped (``RLIMIT_FSIZE``), their number is not.

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

Enforced, per level, with the code reward's defaults (``memory_mb`` 1024, ``max_processes`` 64,
``max_output_bytes`` 64 MB, so ``disk_mb`` 144 and ``total_memory_mb`` 1232):

========================  ============================  ==============================  ====================
limit                     namespaces (root)             user-namespaces                 process-group
========================  ============================  ==============================  ====================
memory of one process     RLIMIT_AS 1024 MB             RLIMIT_AS                       RLIMIT_AS
memory of the run         cgroup 1232 MB                cgroup if writable, else none   cgroup if root, else none
processes of the run      RLIMIT_NPROC 64 + pids.max    pids.max if writable, else      pids.max if root, else
                                                        none (root of the namespace)    RLIMIT_NPROC (non-root uid)
disk                      tmpfs 144 MB, 8192 files      tmpfs 144 MB, 8192 files        64 MB per file only
========================  ============================  ==============================  ====================

Known limits: the caps bound what one run takes; ``CodeReward.num_workers`` runs go at once, so the
machine must hold ``num_workers`` x ``total_memory_mb`` (8 x 1232 MB in ``steer_code``). IO
bandwidth and CPU share are not capped (only CPU time). The cgroup costs 5-10 ms per run (moving
the first process into it waits for the kernel's cgroup lock; making and removing it, 0.3 ms):
measured, a code-reward sample of ~100 ms took 4-11 ms longer. Starting the supervisor costs
about 0.1 s on top of the interpreter's start-up.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import random
import re
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
log = logging.getLogger(__name__)

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
CGROUP_PREFIX = "steer-sandbox-"
"""Name prefix of the per-run cgroups (``steer-sandbox-<trainer pid>-<token>``)."""
DEFAULT_DISK_MB = 64
"""Least size of the working directory's tmpfs (:func:`run_python`'s ``disk_mb``)."""
WORKDIR_INODES = 8192
"""Files and directories the working directory's tmpfs holds at most (empty files included)."""
TOTAL_MEMORY_HEADROOM_MB = 64
"""Default total memory cap of a run: ``memory_mb + disk_mb`` plus this (harness, supervisor)."""
OOM_POLL_S = 0.025
"""How often a run with a memory cgroup is checked for an out-of-memory kill while it runs."""
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
    for procs in cfg["cgroup_procs"]:  # join the run's cgroups first: /sys is read-only further down
        with open(procs, "w") as file:
            file.write("0")  # 0: the writing process
    try:  # the cgroup's OOM killer must pick the code, never its reporter (needs a real root)
        with open("/proc/self/oom_score_adj", "w") as file:
            file.write("-1000")
    except OSError:
        pass
    if cfg["workdir_tmpfs"]:  # a size-limited tmpfs over the working directory: the disk cap
        with open(os.path.join(cfg["workdir"], "main.py"), "rb") as file:
            main_py = file.read()
        owner = "" if cfg["uid"] is None else f",uid={cfg['uid']},gid={cfg['uid']}"
        mount("tmpfs", cfg["workdir"], "tmpfs", MS_NOSUID | MS_NODEV, cfg["workdir_tmpfs"] + ",mode=700" + owner)
        fd = os.open(os.path.join(cfg["workdir"], "main.py"), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        os.write(fd, main_py)
        if cfg["uid"] is not None:
            os.fchown(fd, cfg["uid"], cfg["uid"])
        os.close(fd)
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
        if under(point, ["/proc", "/dev"] + covers) or point == cfg["workdir"] or "ro" in options.split(","):
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
        try:  # back to the default (and, as root, no way down again for the code)
            with open("/proc/self/oom_score_adj", "w") as file:
                file.write("0")
        except OSError:
            pass
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
if _cfg["gate"] is not None:  # the parent moves us into the run's cgroup, then lets us go on
    import os
    os.read(_cfg["gate"], 1)
    os.close(_cfg["gate"])
    del os
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
    cgroup: str | None = None
    """The cgroup that capped the run's total memory and processes (``"v1"``, ``"v2"``), or None."""
    memory_peak_bytes: int | None = None
    """Peak memory of the whole run as the cgroup counted it (None without a cgroup)."""
    oom_kills: int | None = None
    """Processes of the run the cgroup's out-of-memory killer ended (None without a cgroup)."""


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


# --------------------------------------------------------------------------------------------------
# cgroups: a total memory cap and a process cap per run
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CgroupHierarchy:
    """Where the runs' cgroups are made: ``version`` ``"v2"`` (one directory, both controllers) or
    ``"v1"`` (one directory per controller); each directory is the trainer's own cgroup (v1, v2 at
    the root of its hierarchy) or the parent of its leaf (v2, whose leaves may not have children)."""

    version: Literal["v2", "v1"]
    directories: tuple[tuple[str, str], ...]
    """``(controller, directory)``: ``("memory", ...)``, ``("pids", ...)`` for v1, ``("unified", ...)`` for v2."""

    @property
    def controllers(self) -> tuple[str, ...]:
        return ("memory", "pids") if self.version == "v2" else tuple(c for c, _ in self.directories)

    def describe(self) -> str:
        return f"cgroup {self.version} ({', '.join(self.controllers)})"


class RunCgroup:
    """The cgroup(s) of one run: made with its limits, then emptied (every task killed) and removed.

    v1: ``memory.limit_in_bytes`` (and ``memory.memsw.limit_in_bytes``: no swap either) in the
    memory hierarchy, ``pids.max`` in the pids hierarchy; v2: ``memory.max``, ``memory.swap.max``
    0, ``pids.max``. The kernel charges every page a task of the group touches (anonymous memory,
    tmpfs files, page cache, kernel memory) and kills a task of the group when the total would pass
    the cap; a fork past ``pids.max`` fails with ``EAGAIN``.
    """

    def __init__(self, hierarchy: CgroupHierarchy, name: str, memory_bytes: int, max_tasks: int) -> None:
        self.hierarchy = hierarchy
        self.directories: dict[str, str] = {}
        try:
            for controller, parent in hierarchy.directories:
                directory = os.path.join(parent, name)
                os.mkdir(directory)
                self.directories[controller] = directory
                if hierarchy.version == "v2":
                    _write(directory, "memory.max", memory_bytes)
                    _write(directory, "memory.swap.max", 0, optional=True)
                    _write(directory, "pids.max", max_tasks)
                elif controller == "memory":
                    _write(directory, "memory.limit_in_bytes", memory_bytes)
                    _write(directory, "memory.memsw.limit_in_bytes", memory_bytes, optional=True)
                else:
                    _write(directory, "pids.max", max_tasks)
        except OSError:
            self.remove()
            raise

    @property
    def procs_files(self) -> list[str]:
        return [os.path.join(directory, "cgroup.procs") for directory in self.directories.values()]

    def tasks(self) -> list[int]:
        """Pids (in our PID namespace) of the processes in the run's cgroup(s)."""
        found: set[int] = set()
        for procs in self.procs_files:
            try:
                with open(procs) as file:
                    found.update(int(line) for line in file if line.strip())
            except (OSError, ValueError):
                pass
        return sorted(found)

    def oom_kills(self) -> int:
        """Processes of the run the kernel has killed for the memory cap so far."""
        return self.stats()[1] or 0

    def stats(self) -> tuple[int | None, int | None]:
        """``(peak memory in bytes, OOM kills)`` of the run so far (None where the kernel says nothing)."""
        directory = self.directories.get("unified" if self.hierarchy.version == "v2" else "memory")
        if directory is None:
            return None, None
        peak_file, events_file = (
            ("memory.peak", "memory.events") if self.hierarchy.version == "v2"
            else ("memory.max_usage_in_bytes", "memory.oom_control")
        )
        peak = oom_kills = None
        try:
            with open(os.path.join(directory, peak_file)) as file:
                peak = int(file.read())
        except (OSError, ValueError):
            pass
        try:
            with open(os.path.join(directory, events_file)) as file:
                for line in file:
                    key, _, value = line.partition(" ")
                    if key == "oom_kill":
                        oom_kills = int(value)
        except (OSError, ValueError):
            pass
        return peak, oom_kills

    def remove(self, timeout_s: float = 5.0) -> bool:
        """Kill every task still in the group, then remove its directories; True once all are gone."""
        deadline = time.monotonic() + timeout_s
        kill = os.path.join(self.directories.get("unified", ""), "cgroup.kill")
        if self.hierarchy.version == "v2" and os.path.exists(kill):
            try:
                _write(os.path.dirname(kill), "cgroup.kill", 1)
            except OSError:
                pass
        while self.directories:
            for pid in self.tasks():
                _signal(pid)
            for controller, directory in list(self.directories.items()):
                try:
                    os.rmdir(directory)
                except FileNotFoundError:
                    pass
                except OSError:  # EBUSY: a task is still exiting
                    continue
                del self.directories[controller]
            if not self.directories or time.monotonic() > deadline:
                break
            time.sleep(0.005)
        return not self.directories


def _write(directory: str, name: str, value: object, optional: bool = False) -> None:
    path = os.path.join(directory, name)
    if optional and not os.path.exists(path):
        return
    with open(path, "w") as file:
        file.write(str(value))


def _read(path: str) -> str:
    try:
        with open(path) as file:
            return file.read()
    except OSError:
        return ""


def _cgroup_mounts() -> dict[str, tuple[str, str]]:
    """``{"unified" | controller: (mount point, root of the mount)}`` from ``/proc/self/mountinfo``."""
    mounts: dict[str, tuple[str, str]] = {}
    for line in _read("/proc/self/mountinfo").splitlines():
        fields = line.split()
        try:
            separator = fields.index("-")
        except ValueError:
            continue
        fstype, super_options = fields[separator + 1], fields[separator + 3] if len(fields) > separator + 3 else ""
        point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4])
        if fstype == "cgroup2":
            mounts.setdefault("unified", (point, fields[3]))
        elif fstype == "cgroup":
            for option in super_options.split(","):
                if option in ("memory", "pids"):
                    mounts.setdefault(option, (point, fields[3]))
    return mounts


def _own_cgroups() -> dict[str, str]:
    """``{"unified" | controller: our cgroup's path}`` from ``/proc/self/cgroup``."""
    own: dict[str, str] = {}
    for line in _read("/proc/self/cgroup").splitlines():
        if line.count(":") < 2:
            continue
        _, controllers, path = line.split(":", 2)
        if controllers == "" and line.startswith("0:"):
            own["unified"] = path
        for controller in controllers.split(","):
            if controller in ("memory", "pids"):
                own[controller] = path
    return own


def _cgroup_directory(mount: tuple[str, str], path: str) -> str | None:
    """Our cgroup's directory under ``mount`` (None when the mount shows another part of the tree)."""
    point, root = mount
    if root != "/":
        if path != root and not path.startswith(root.rstrip("/") + "/"):
            return None
        path = path[len(root):] or "/"
    return os.path.normpath(point + "/" + path.lstrip("/"))


def _try_group(parent: str, limits: dict[str, int]) -> bool:
    """Whether a child of ``parent`` can be made, limited by ``limits`` and removed again."""
    probe = os.path.join(parent, f"{CGROUP_PREFIX}probe-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        os.mkdir(probe)
    except OSError:
        return False
    try:
        for name, value in limits.items():
            _write(probe, name, value)
        return True
    except OSError:
        return False
    finally:
        try:
            os.rmdir(probe)
        except OSError:
            pass


def _remove_stale_groups(parent: str) -> None:
    """Remove empty run cgroups left by a trainer that died mid-run (its pid is in the name).
    A group younger than a minute may be one another trainer is about to join: left alone."""
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return
    for entry in entries:
        match = re.fullmatch(re.escape(CGROUP_PREFIX) + r"(\d+)-[0-9a-f]+", entry.name)
        if not match or not entry.is_dir() or os.path.exists(f"/proc/{match.group(1)}"):
            continue
        try:
            if time.time() - entry.stat().st_mtime > 60:
                os.rmdir(entry.path)  # fails (EBUSY) while a task is in it
        except OSError:
            pass


def find_cgroup_hierarchy() -> tuple[CgroupHierarchy | None, str]:
    """The cgroup hierarchy where this process may make per-run groups with a memory and a process
    cap, strongest first: v2 with the ``memory`` and ``pids`` controllers, else v1 ``memory`` (plus
    ``pids`` where mounted); ``(None, why)`` when neither is writable (not root, no delegation).
    Each candidate is tried for real: make a child group, set its limits, remove it. Never raises."""
    try:
        return _find_cgroup_hierarchy()
    except Exception as error:  # noqa: BLE001 - an odd /proc must not stop the trainer: no cgroup then
        return None, f"cgroup probe failed: {error!r}"


def _find_cgroup_hierarchy() -> tuple[CgroupHierarchy | None, str]:
    mounts, own = _cgroup_mounts(), _own_cgroups()
    reasons = []
    if "unified" in mounts and "unified" in own:
        directory = _cgroup_directory(mounts["unified"], own["unified"])
        # a v2 cgroup with tasks cannot have children with controllers (except the root): try our
        # own group at the root of the hierarchy, else the parent of our leaf
        candidates = []
        if directory is not None:
            at_root = directory == os.path.normpath(mounts["unified"][0])
            candidates = [directory] if at_root else [os.path.dirname(directory)]
        for parent in candidates:
            if not {"memory", "pids"} <= set(_read(os.path.join(parent, "cgroup.controllers")).split()):
                reasons.append(f"v2: {parent} lacks the memory or pids controller")
                continue
            if not {"memory", "pids"} <= set(_read(os.path.join(parent, "cgroup.subtree_control")).split()):
                try:
                    _write(parent, "cgroup.subtree_control", "+memory +pids")
                except OSError as error:
                    reasons.append(f"v2: cannot enable memory and pids below {parent}: {error.strerror}")
                    continue
            if _try_group(parent, {"memory.max": 1 << 30, "pids.max": 64}):
                _remove_stale_groups(parent)
                return CgroupHierarchy("v2", (("unified", parent),)), ""
            reasons.append(f"v2: cannot make a limited group under {parent}")
    else:
        reasons.append("v2: not mounted")
    directories = []
    for controller, limits in (("memory", {"memory.limit_in_bytes": 1 << 30}), ("pids", {"pids.max": 64})):
        if controller not in mounts or controller not in own:
            reasons.append(f"v1 {controller}: not mounted")
            continue
        parent = _cgroup_directory(mounts[controller], own[controller])
        if parent is not None and _try_group(parent, limits):
            _remove_stale_groups(parent)
            directories.append((controller, parent))
        else:
            reasons.append(f"v1 {controller}: cannot make a limited group under {parent}")
    if directories and directories[0][0] == "memory":
        return CgroupHierarchy("v1", tuple(directories)), "; ".join(reasons)
    return None, "; ".join(reasons)


@dataclass(frozen=True)
class Containment:
    """What this machine gives every run (see the module docstring): the isolation level, the
    cgroup hierarchy of the total caps (None: per-process rlimits only) and the working
    directory's disk cap (a tmpfs at the namespace levels)."""

    isolation: Isolation
    cgroup: CgroupHierarchy | None
    why_no_cgroup: str = ""

    @property
    def workdir_tmpfs(self) -> bool:
        return self.isolation != "process-group"

    def describe(self) -> str:
        caps = (
            f"total memory and process caps per run by {self.cgroup.describe()}" if self.cgroup is not None
            else f"per-process limits only, no total memory cap ({self.why_no_cgroup or 'no cgroup'})"
        )
        disk = "a size-limited tmpfs" if self.workdir_tmpfs else "on disk, per-file cap only"
        return f"isolation {self.isolation}; {caps}; working directory {disk}"


def _probe(code: str, level: Isolation, cgroup: "CgroupHierarchy | None"):
    """One short run of ``code`` at ``level`` (a start-up probe: generous time, default caps)."""
    return _run(code, b"", level=level, timeout_s=20.0, cpu_time_s=20.0, memory_mb=1024, total_memory_mb=1024,
                disk_mb=16, max_output_bytes=1 << 16, max_processes=64, block_network=True, site_packages=False,
                env=None, cgroup=cgroup)


@functools.cache
def cgroups_work(level: Isolation) -> CgroupHierarchy | None:
    """The cgroup hierarchy runs at ``level`` use: :func:`find_cgroup_hierarchy`'s, if a probe run
    at that level lands in its group (the first process of the run joins it), else None."""
    hierarchy, _ = find_cgroup_hierarchy()
    if hierarchy is None:
        return None
    try:
        probe = _probe("print(open('/proc/self/cgroup').read())", level, hierarchy)
    except OSError:
        return None
    joined = {controller for controller in ("unified", "memory", "pids") if any(
        line.split(":", 2)[-1].rsplit("/", 1)[-1].startswith(CGROUP_PREFIX)
        and (controller in line.split(":", 2)[1].split(",") or (controller == "unified" and line.startswith("0::")))
        for line in probe.stdout.splitlines() if line.count(":") >= 2
    )}
    return hierarchy if probe.status == "ok" and {c for c, _ in hierarchy.directories} <= joined else None


@functools.cache
def containment() -> Containment:
    """The isolation level and the caps every run gets here; probed once per process and logged
    once (INFO; a WARNING when no cgroup can be made, as the total memory is then unbounded)."""
    level = isolation_level()
    hierarchy, why = find_cgroup_hierarchy()
    if hierarchy is not None and cgroups_work(level) is None:
        hierarchy, why = None, f"a run at level {level} could not join {hierarchy.describe()}"
    result = Containment(level, hierarchy, why)
    log.log(logging.INFO if hierarchy is not None else logging.WARNING, "Sandbox: %s", result.describe())
    return result


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
        probe = _probe("import os; print(os.getuid())", level, None)
    except OSError:
        return False
    return probe.status == "ok" and bool(probe.stdout.strip())


@functools.cache
def isolation_level() -> Isolation:
    """The strongest isolation level that works on this machine (see the module docstring)."""
    return next(level for level in ISOLATION_LEVELS if level_works(level))


def run_python(
    code: str,
    stdin: str | bytes = b"",
    *,
    timeout_s: float = 10.0,
    cpu_time_s: float | None = None,
    memory_mb: int = 1024,
    total_memory_mb: int | None = None,
    disk_mb: int | None = None,
    max_output_bytes: int = 1 << 20,
    max_processes: int = 64,
    block_network: bool = True,
    site_packages: bool = True,
    env: Mapping[str, str] | None = None,
    isolation: Isolation | None = None,
    use_cgroup: bool = True,
) -> SandboxResult:
    """Run ``code`` as ``__main__`` in a fresh, limited interpreter; never raises for bad code.

    Args:
        code: Python source, written to ``main.py`` in the temporary working directory.
        stdin: data the program reads on standard input.
        timeout_s: wall-clock limit; every process of the run is killed when it is reached.
        cpu_time_s: CPU-time limit (``RLIMIT_CPU``, whole seconds, rounded up); default ``timeout_s``.
        memory_mb: address-space limit (``RLIMIT_AS``) of each process. Leave room for the
            interpreter itself (~30 MB, more if the code imports numpy).
        total_memory_mb: memory of all the run's processes together, their tmpfs files included,
            where a cgroup can be made (:func:`containment`); default ``memory_mb + disk_mb +
            TOTAL_MEMORY_HEADROOM_MB`` (one process at its own cap with a full working directory
            fits). When the kernel kills a process of the run for it, the whole run is ended at
            once (status ``failed``, a line on stderr says why).
        disk_mb: size of the working directory (a tmpfs at the namespace levels; its files count
            towards ``total_memory_mb`` too); default ``max(DEFAULT_DISK_MB, 2 * max_output_bytes
            + 16 MB)``. Writes past it fail with ``ENOSPC``, as do files past ``WORKDIR_INODES``.
        max_output_bytes: cap of stdout, of stderr and of any file the code writes.
        max_processes: processes (threads included) the code may have at once: ``RLIMIT_NPROC``,
            which the kernel enforces only for a non-root uid (every level but a root
            ``process-group`` run, see the module docstring), and the cgroup's ``pids.max``, which
            binds every uid, root included.
        block_network: cut network access (a network namespace, else the socket patch).
        site_packages: False starts the interpreter with ``-S``: only the standard library is
            importable, and start-up is several times faster (no ``site`` / ``.pth`` processing).
        env: extra environment variables; the child otherwise gets a small clean environment with
            ``PYTHONHASHSEED=0`` so that set/dict ordering of str is reproducible across runs.
        isolation: force a level (tests); default :func:`isolation_level`.
        use_cgroup: False runs without the cgroup caps even where they work (tests of the fallback).
    """
    containment()  # probed and logged once per process
    level = isolation or isolation_level()
    return _run(
        code, stdin, level=level, timeout_s=timeout_s, cpu_time_s=cpu_time_s, memory_mb=memory_mb,
        total_memory_mb=total_memory_mb, disk_mb=disk_mb,
        max_output_bytes=max_output_bytes, max_processes=max_processes, block_network=block_network,
        site_packages=site_packages, env=env, cgroup=cgroups_work(level) if use_cgroup else None,
    )


def _run(
    code: str,
    stdin: str | bytes,
    *,
    level: Isolation,
    timeout_s: float,
    cpu_time_s: float | None,
    memory_mb: int,
    total_memory_mb: int | None,
    disk_mb: int | None,
    max_output_bytes: int,
    max_processes: int,
    block_network: bool,
    site_packages: bool,
    env: Mapping[str, str] | None,
    cgroup: CgroupHierarchy | None,
) -> SandboxResult:
    start = time.monotonic()
    root = Path(os.path.realpath(tempfile.mkdtemp(prefix="steer-sandbox-")))
    workdir = root / "work"  # the code's cwd; its stdin/stdout/stderr files live beside it
    workdir.mkdir()
    token = uuid.uuid4().hex
    # a fresh unprivileged identity whenever we may take one (root): see the module docstring
    uid = None
    if os.geteuid() == 0 and (level == "namespaces" or (level == "process-group" and _others_can_run_python())):
        uid = random.choice(SANDBOX_UID_RANGE)
    status_read = status_write = gate_read = gate_write = -1
    run_cgroup: RunCgroup | None = None
    if disk_mb is None:
        disk_mb = max(DEFAULT_DISK_MB, math.ceil(2 * max_output_bytes / (1 << 20)) + 16)
    if total_memory_mb is None:
        total_memory_mb = memory_mb + disk_mb + TOTAL_MEMORY_HEADROOM_MB
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
        if cgroup is not None:
            # the supervisor (PID 1 of the namespaces) is in the group too: one task more
            run_cgroup = RunCgroup(
                cgroup, f"{CGROUP_PREFIX}{os.getpid()}-{token[:16]}", total_memory_mb << 20,
                max_processes + (level != "process-group"),
            )
        if run_cgroup is not None and level == "process-group":
            gate_read, gate_write = os.pipe()  # the child waits on it until we moved it into the group
        config = {
            "rlimits": rlimits,
            "patch_socket": block_network and level == "process-group",
            "gate": gate_read if gate_read >= 0 else None,
        }
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
            if gate_read >= 0:
                popen_options["pass_fds"] = (gate_read,)
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
                "cgroup_procs": run_cgroup.procs_files if run_cgroup is not None else [],
                "workdir_tmpfs": f"size={disk_mb}m,nr_inodes={WORKDIR_INODES}",
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
            if gate_write >= 0:
                os.close(gate_read)
                gate_read = -1
                try:
                    for procs in run_cgroup.procs_files:
                        with open(procs, "w") as file:
                            file.write(str(process.pid))
                except OSError as error:
                    _kill_all(process, level, uid, token)
                    return SandboxResult("error", "", f"sandbox could not join its cgroup: {error}", None, 0.0, level)
                os.write(gate_write, b"1")
                os.close(gate_write)
                gate_write = -1
            ended = _wait(process, timeout_s, run_cgroup)
            timed_out, memory_capped = ended == "timeout", ended == "memory"
            _kill_all(process, level, uid, token)
            if run_cgroup is not None:
                peak, oom_kills = run_cgroup.stats()
                if not run_cgroup.remove():
                    log.warning("sandbox cgroup %s could not be removed", run_cgroup.directories)
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
            elif returncode is None and not (timed_out or memory_capped):
                error = f"the sandbox ended without a status (exit code {process.returncode}): {stderr[-300:]}"
        elapsed = time.monotonic() - start
        caps = {} if run_cgroup is None else {
            "cgroup": run_cgroup.hierarchy.version, "memory_peak_bytes": peak, "oom_kills": oom_kills,
        }
        if error is not None:
            return SandboxResult("error", stdout, f"{stderr}{error}", None, elapsed, level, **caps)
        if memory_capped:
            status: Status = "failed"
            returncode = -signal.SIGKILL if returncode is None else returncode
            stderr += f"sandbox: the run's memory cap ({total_memory_mb} MB in all) was reached: the run was ended\n"
        elif timed_out or returncode == -signal.SIGXCPU:  # SIGXCPU: the CPU-time limit
            status = "timeout"
        else:
            status = "ok" if returncode == 0 else "failed"
        return SandboxResult(status, stdout, stderr, returncode, elapsed, level, **caps)
    finally:
        for fd in (status_read, status_write, gate_read, gate_write):
            if fd >= 0:
                os.close(fd)
        if run_cgroup is not None and run_cgroup.directories:  # an exception on the way
            run_cgroup.remove()
        shutil.rmtree(root, ignore_errors=True)


def _wait(
    process: subprocess.Popen, timeout_s: float, run_cgroup: RunCgroup | None = None
) -> Literal["exit", "timeout", "memory"]:
    """Wait for ``process`` to exit within ``timeout_s``: ``"exit"`` if it did, ``"timeout"`` if
    not, ``"memory"`` as soon as the run's cgroup has killed a process for memory (checked every
    ``OOM_POLL_S``): the whole run then ends at once, like ``memory.oom.group`` in cgroup v2.
    Under a memory cap, a run of many processes that each take memory is otherwise killed one
    process at a time, each kill after the kernel's reclaim retries: measured, 64 processes
    touching 800 MB under a 1 GB cap went on for over 10 s.

    Uses a pidfd where the OS has one: it wakes up exactly on exit and leaves the process unreaped,
    so its process group id cannot be reused before :func:`_kill_all`. ``Popen.wait`` (the
    fallback) polls with sleeps of up to 50 ms, a large share of a typical 50 ms run.
    """
    deadline = time.monotonic() + timeout_s
    poll_s = OOM_POLL_S if run_cgroup is not None else timeout_s
    try:
        pidfd = os.pidfd_open(process.pid)
    except (AttributeError, OSError):
        pidfd = None
    try:
        while (remaining := deadline - time.monotonic()) > 0:
            if pidfd is not None:
                if select.select([pidfd], [], [], min(remaining, poll_s))[0]:
                    return "exit"
            else:
                try:
                    process.wait(timeout=min(remaining, poll_s))
                    return "exit"
                except subprocess.TimeoutExpired:
                    pass
            if run_cgroup is not None and run_cgroup.oom_kills():
                return "memory"
        return "timeout"
    finally:
        if pidfd is not None:
            os.close(pidfd)


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


def cgroups_of_runs() -> list[str]:
    """Cgroups of this process's runs that still exist: for tests and leak checks; empty when
    every run removed its group."""
    hierarchy = containment().cgroup
    if hierarchy is None:
        return []
    prefix = f"{CGROUP_PREFIX}{os.getpid()}-"
    return [
        os.path.join(parent, name) for _, parent in hierarchy.directories
        for name in (os.listdir(parent) if os.path.isdir(parent) else []) if name.startswith(prefix)
    ]


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

