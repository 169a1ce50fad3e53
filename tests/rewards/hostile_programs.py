"""Hostile "solutions" for the code reward: each tries one way to hang, crash, flood, escape or
cheat the sandbox. Shared by tests/rewards/test_hostile_code.py (the assertions) and
experiments/benchmarks/bench_hostile_code.py (per-program timings).

Every program answers the same two tasks: ``add(a, b)`` (functional, three tests) or, for
``kind="stdin"``, print the sum of the two integers on standard input (two tests). ``score`` is
the fraction of tests it must be credited with: 0 for every attack, and 1 for programs that first
attempt an escape and then solve the task honestly, so that a missed escape shows up as a wrong
score (they return a wrong answer when the escape worked) while a sandbox that breaks honest
programs shows up too.

Placeholders filled in by :func:`render`: ``{outside}`` (a world-writable directory outside the
sandbox), ``{canary}`` (a world-writable file there that must survive), ``{port}`` (a TCP port the
trainer listens on), ``{secret_name}`` (a variable in the trainer's environment), ``{repo_file}``,
``{data_file}``, ``{home_file}`` (files the code must not read).

``needs`` names the protections a program relies on; a program runs only at isolation levels that
provide them all (``kill_everything`` would kill the machine's processes without a PID namespace or
a separate uid).
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass, field

ADD_REFERENCE = {
    "kind": "functional",
    "entry_point": "add",
    "inputs": [[1, 2], [3, 4], [10, -5]],
    "expected": [3, 7, 5],
}
SUM_REFERENCE = {
    "kind": "stdin",
    "inputs": ["1 2\n", "30 4\n"],
    "expected": ["3\n", "34\n"],
    "oracle": "lines",
}
HONEST_ADD = "def add(a, b):\n    return a + b\n"

# the protections an isolation level gives (see steer.rewards.sandbox's module docstring)
PROTECTIONS = {
    "namespaces": {"kill", "signals", "nproc", "uid", "files", "secrets", "network"},
    "user-namespaces": {"kill", "signals", "files", "secrets", "network"},  # nproc: not for root
    "process-group": {"kill", "network"},
}


@dataclass(frozen=True)
class Hostile:
    name: str
    code: str
    score: float
    kind: str = "functional"
    needs: frozenset[str] = field(default_factory=frozenset)

    @property
    def reference(self) -> dict:
        return SUM_REFERENCE if self.kind == "stdin" else ADD_REFERENCE


def _program(name: str, code: str, score: float = 0.0, kind: str = "functional", needs: str = "kill") -> Hostile:
    return Hostile(name, textwrap.dedent(code).strip() + "\n", score, kind, frozenset(needs.split()))


PROGRAMS = [
    _program("infinite_loop_in_function", "def add(a, b):\n    while True:\n        pass"),
    _program("infinite_loop_at_import", "while True:\n    pass"),
    _program(
        "fork_bomb",
        """
        import os
        while True:
            try:
                os.fork()
            except OSError:
                pass
        """,
        needs="kill nproc",
    ),
    _program(  # the process limit must stop it; the sleeping children must die at the end
        "fork_bomb_then_honest",
        """
        import os, time
        children = 0
        for _ in range(300):
            try:
                pid = os.fork()
            except OSError:
                break
            if pid == 0:
                time.sleep(600)
                os._exit(0)
            children += 1
        def add(a, b):
            return a + b if children < 300 else "no process limit"
        """,
        score=1.0,
        needs="kill nproc",
    ),
    _program("memory_bomb", "block = bytearray(1 << 40)\n" + HONEST_ADD),
    _program(
        "memory_growth",
        """
        def add(a, b):
            blocks = []
            while True:
                blocks.append(bytearray(1 << 24))
        """,
    ),
    _program(
        "deep_recursion_segfault",
        """
        import sys
        sys.setrecursionlimit(1 << 30)
        def add(a, b):
            return add(a, b) + 1
        """,
    ),
    _program(
        "huge_stdout",
        """
        import sys
        while True:
            sys.stdout.write("3\\n" * 100000)
        """,
        kind="stdin",
    ),
    _program(
        "huge_stderr",
        """
        import os
        def add(a, b):
            while True:
                os.write(2, b"x" * 1000000)
        """,
    ),
    _program(
        "write_outside",
        """
        import os
        escaped = []
        for path in ["{outside}/written.txt", os.path.expanduser("~root") + "/steer-hostile.txt",
                     "/steer-hostile.txt", "/usr/steer-hostile.txt", "{repo_file}.hostile"]:
            try:
                with open(path, "w") as file:
                    file.write("escaped")
                escaped.append(path)
            except OSError:
                pass
        def add(a, b):
            return a + b if not escaped else escaped
        """,
        score=1.0,
        needs="kill files",
    ),
    _program(
        "delete_outside",
        """
        import os, shutil
        deleted = []
        for path in ["{canary}"]:
            try:
                os.remove(path)
                deleted.append(path)
            except OSError:
                pass
        shutil.rmtree("{outside}", ignore_errors=True)
        def add(a, b):
            return a + b if not deleted else deleted
        """,
        score=1.0,
        needs="kill files",
    ),
    _program(
        "read_trainer_environment",
        """
        import os
        leaked = "{secret_name}" in os.environ
        for pid in os.listdir("/proc"):
            if pid.isdigit():
                try:
                    with open(f"/proc/{{pid}}/environ", "rb") as file:
                        leaked |= b"{secret_name}=" in file.read()
                except OSError:
                    pass
        def add(a, b):
            return a + b if not leaked else "leaked"
        """,
        score=1.0,
        needs="kill secrets",
    ),
    _program(
        "read_files",
        """
        read = []
        for path in ["{repo_file}", "{data_file}", "{home_file}"]:
            try:
                with open(path, "rb") as file:
                    file.read(1)
                read.append(path)
            except OSError:
                pass
        def add(a, b):
            return a + b if not read else read
        """,
        score=1.0,
        needs="kill secrets",
    ),
    _program(  # needs a uid of its own: a root trainer's own uid may read it
        "read_root_only_files",
        """
        read = []
        for path in ["/etc/shadow", "/proc/1/environ", "/proc/1/mem"]:
            try:
                with open(path, "rb") as file:
                    file.read(1)
                read.append(path)
            except OSError:
                pass
        def add(a, b):
            return a + b if not read else read
        """,
        score=1.0,
        needs="kill uid",
    ),
    _program(
        "list_trainer_directories",
        """
        import os, sys
        seen = []
        python_path = set(sys.prefix.split("/"))  # the interpreter's folders stay visible
        for path in [os.path.dirname("{repo_file}"), os.path.dirname("{data_file}"), os.path.dirname("{home_file}")]:
            try:
                seen += [name for name in os.listdir(path) if name not in python_path]
            except OSError:
                pass
        def add(a, b):
            return a + b if not seen else seen
        """,
        score=1.0,
        needs="kill secrets",
    ),
    _program(
        "open_socket",
        """
        import socket
        try:
            socket.create_connection(("127.0.0.1", {port}), timeout=1).close()
            connected = True
        except OSError:
            connected = False
        def add(a, b):
            return a + b if not connected else "connected"
        """,
        score=1.0,
        needs="kill network",
    ),
    _program(
        "kill_parent_and_group",
        """
        import os, signal
        for target in (lambda: os.kill(os.getppid(), signal.SIGKILL), lambda: os.killpg(0, signal.SIGKILL)):
            try:
                target()
            except OSError:
                pass
        """,
        needs="kill signals",
    ),
    _program(
        "kill_everything",
        """
        import os, signal
        os.kill(-1, signal.SIGKILL)
        """,
        needs="kill signals",
    ),
    _program(  # a daemon in its own session must still die; the honest answer still counts
        "setsid_daemon_grandchild",
        """
        import os, time
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                os.closerange(0, 256)
                while True:
                    time.sleep(0.05)
            os._exit(0)
        os.wait()
        def add(a, b):
            return a + b
        """,
        score=1.0,
    ),
    _program("sleep_past_the_limit", "import time\ntime.sleep(600)"),
    _program("sleep_in_function", "import time\ndef add(a, b):\n    time.sleep(600)"),
    _program("sys_exit_zero_at_import", "import sys\nsys.exit(0)"),
    _program("os_exit_zero_at_import", "import os\nos._exit(0)"),
    _program("os_exit_zero_in_function", "import os\ndef add(a, b):\n    os._exit(0)"),
    _program("stdin_exit_zero_silently", "import sys\nsys.exit(0)", kind="stdin"),
    _program(
        "always_equal_object",
        """
        class Anything:
            def __eq__(self, other):
                return True
            __hash__ = object.__hash__
        def add(a, b):
            return Anything()
        """,
    ),
    _program(
        "int_subclass_always_equal",
        """
        class Sly(int):
            def __eq__(self, other):
                return True
            __hash__ = int.__hash__
        def add(a, b):
            return Sly(0)
        """,
    ),
    _program(
        "monkeypatch_harness",
        """
        import json, sys
        harness = sys.modules["__main__"]
        harness.report = lambda value: {{"output": "PASS"}}
        harness.encode = lambda value, canonical=False: "PASS"
        json.dumps = lambda *args, **kwargs: '{{"index": 0, "status": "ok", "output": "PASS"}}'
        def add(a, b):
            return None
        """,
    ),
    _program(
        "forge_result_lines",
        """
        import os
        for fd in range(256):
            for index in range(3):
                try:
                    os.write(fd, ('{{"index": %d, "status": "ok", "output": "PASS"}}\\n' % index).encode())
                except OSError:
                    pass
        def add(a, b):
            return None
        """,
    ),
    _program(
        "print_expected_then_loop",
        "print(sum(map(int, input().split())), flush=True)\nwhile True:\n    pass",
        kind="stdin",
    ),
    _program(
        "print_expected_then_segfault",
        "import ctypes\nprint(sum(map(int, input().split())), flush=True)\nctypes.string_at(0)",
        kind="stdin",
    ),
    _program("huge_integer_power", "def add(a, b):\n    return (a + b) ** (10 ** 9)"),
    _program("huge_integer_output", "def add(a, b):\n    return 10 ** 20000 + a + b"),
    _program("segfault_at_import", "import ctypes\nctypes.string_at(0)"),
    _program("segfault_in_function", "import ctypes\ndef add(a, b):\n    ctypes.string_at(0)"),
    _program("close_every_descriptor", "import os\nos.closerange(0, 4096)\n" + HONEST_ADD),
    _program(  # fd 1 is not the harness's channel: closing it costs nothing
        "close_stdout_then_honest",
        """
        import os
        def add(a, b):
            for fd in (1, 2):
                try:
                    os.close(fd)
                except OSError:  # closed by the previous test
                    pass
            return a + b
        """,
        score=1.0,
    ),
    _program(
        "ignore_every_signal_and_loop",
        """
        import signal
        def add(a, b):
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGALRM, signal.SIGXCPU, signal.SIGHUP):
                signal.signal(sig, signal.SIG_IGN)
            while True:
                pass
        """,
    ),
    _program("stop_itself", "import os, signal\nos.kill(os.getpid(), signal.SIGSTOP)\n" + HONEST_ADD),
]


def render(program: Hostile, values: dict[str, object]) -> str:
    """The program's code with its placeholders filled in (``{{``/``}}`` stand for braces)."""
    return program.code.format(**values)


# Containment: programs that try to take the machine's memory, disk or process table down, run by
# tests/rewards/test_containment.py with the limits of the code reward's config (1024 MB, 64
# processes). Each stops by itself at a bounded size should containment fail (so a failed test
# cannot take the machine down either), and returns the honest answer only if the attack got
# through, so that a missing cap shows up as a wrong score. They have no placeholders: not for render().
MEMORY_HOG_PROCESSES = 64
MEMORY_HOG_MB = 800
MEMORY_HOG = _program(  # 64 processes each touching 800 MB, all holding it at once
    "memory_hog_64x800mb",
    f"""
    import os, select
    SIZE = {MEMORY_HOG_MB} << 20
    ready_r, ready_w = os.pipe()
    hold_r, hold_w = os.pipe()
    children = []
    for _ in range({MEMORY_HOG_PROCESSES - 1}):
        try:
            pid = os.fork()
        except OSError:
            break
        if pid == 0:
            os.close(hold_w)
            block = bytearray(SIZE)
            block[::4096] = b"\\x01" * (SIZE // 4096)  # touch every page
            os.write(ready_w, b"+")
            os.read(hold_r, 1)  # hold the memory until the parent lets go (or the run ends)
            os._exit(0)
        children.append(pid)
    os.close(ready_w)
    block = bytearray(SIZE)
    block[::4096] = b"\\x01" * (SIZE // 4096)
    held = died = 0
    while held + died < len(children):  # until every child holds its block or was killed
        if select.select([ready_r], [], [], 0.05)[0]:
            held += len(os.read(ready_r, 4096))
        while True:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                pid = 0
            if not pid:
                break
            died += 1
    os.close(hold_w)
    everyone = len(children) == {MEMORY_HOG_PROCESSES - 1} and held == len(children) and not died
    def add(a, b):
        return a + b if everyone else f"contained: {{held}} held, {{died}} killed"
    """,
)
SMALL_FILES = _program(  # many files, each far under the per-file cap, up to 1 GB in all
    "many_small_files",
    """
    import os
    files = 0
    try:
        for files in range(16384):
            with open(f"junk-{files}.bin", "wb") as file:
                file.write(os.urandom(1024) * 64)  # 64 kB
        files = 16384
    except OSError:  # ENOSPC: the working directory is full
        pass
    def add(a, b):
        return a + b if files == 16384 else f"stopped after {files} files"
    """,
)
EMPTY_FILES = _program(  # empty files cost no bytes, only inodes: up to 100,000 of them
    "many_empty_files",
    """
    import os
    files = 0
    try:
        for files in range(100000):
            open(f"empty-{files}", "wb").close()
        files = 100000
    except OSError:
        pass
    def add(a, b):
        return a + b if files == 100000 else f"stopped after {files} files"
    """,
)
PIDS_BOMB_LIMIT = 400
PIDS_BOMB = _program(  # sleeping children until fork fails, at most 400
    "pids_bomb",
    f"""
    import os, time
    children = 0
    for _ in range({PIDS_BOMB_LIMIT}):
        try:
            pid = os.fork()
        except OSError:
            break
        if pid == 0:
            time.sleep(600)
            os._exit(0)
        children += 1
    def add(a, b):
        return a + b if children == {PIDS_BOMB_LIMIT} else f"stopped after {{children}} children"
    """,
)
CONTAINMENT_PROGRAMS = [MEMORY_HOG, SMALL_FILES, EMPTY_FILES, PIDS_BOMB]
