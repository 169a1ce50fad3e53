"""The sandbox enforces its limits and leaves nothing behind."""

from __future__ import annotations

import socket
import textwrap
import time
from pathlib import Path

import pytest

from steer.rewards import sandbox
from steer.rewards.sandbox import run_python


def _alive(pid: int) -> bool:
    """True if ``pid`` runs (a zombie waiting for its reaper counts as dead)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state not in ("Z", "X")


def test_runs_code_with_stdin_and_captures_output():
    result = run_python(
        "import sys\nprint(sys.stdin.read().upper())\nprint('oops', file=sys.stderr)", "hello"
    )
    assert result.status == "ok"
    assert result.returncode == 0
    assert result.stdout == "HELLO\n"
    assert result.stderr == "oops\n"
    assert result.elapsed_s > 0


def test_exception_is_a_failure_with_traceback():
    result = run_python("raise ValueError('bad input')")
    assert result.status == "failed"
    assert result.returncode == 1
    assert "ValueError: bad input" in result.stderr


def test_timeout_kills_the_loop_and_its_forked_children():
    code = textwrap.dedent(
        """
        import os, sys, time
        if os.fork() == 0:  # the grandchild keeps beating until it is killed
            while True:
                print("beat", flush=True)
                time.sleep(0.02)
        while True:
            pass
        """
    )
    started = time.monotonic()
    result = run_python(code, timeout_s=2.0, site_packages=False)
    assert result.status == "timeout"
    assert time.monotonic() - started < 6
    assert "beat" in result.stdout, "the grandchild never ran"
    assert sandbox.processes_of_runs() == [], "a process of the run outlived it"


def test_cpu_time_limit_stops_a_busy_loop_before_the_wall_clock():
    result = run_python("while True:\n    pass", timeout_s=20.0, cpu_time_s=1.0)
    assert result.status == "timeout"
    assert result.elapsed_s < 10


def test_memory_limit_stops_a_big_allocation():
    result = run_python("block = bytearray(2 * 1024**3)\nprint('allocated')", memory_mb=256)
    assert result.status == "failed"
    assert "MemoryError" in result.stderr
    assert "allocated" not in result.stdout


def test_output_is_capped():
    result = run_python("while True:\n    print('x' * 1000)", max_output_bytes=10_000, timeout_s=10.0)
    assert len(result.stdout) <= 10_000
    assert result.stdout.startswith("x" * 1000)
    assert result.status == "failed"  # writing past the cap raises "File too large"
    assert "File too large" in result.stderr


def test_working_directory_is_private_and_removed():
    result = run_python(
        "import os\nopen('scratch.txt', 'w').write('data')\nprint(os.getcwd())\nprint(sorted(os.listdir('.')))"
    )
    workdir = Path(result.stdout.splitlines()[0])
    assert result.stdout.splitlines()[1] == "['main.py', 'scratch.txt']"
    assert not workdir.exists()
    assert not workdir.parent.exists()


def test_string_hashing_is_reproducible():
    code = "print(hash('steer'), list({'a', 'b', 'c', 'd'}))"
    assert run_python(code).stdout == run_python(code).stdout


@pytest.mark.parametrize("level", sandbox.ISOLATION_LEVELS)
def test_network_is_blocked(level: str):
    if not sandbox.level_works(level):
        pytest.skip(f"isolation level {level} does not work here")
    with socket.create_server(("127.0.0.1", 0)) as server:  # reachable from this process
        port = server.getsockname()[1]
        code = textwrap.dedent(
            f"""
            import socket
            try:
                socket.create_connection(("127.0.0.1", {port}), timeout=2).close()
                print("connected")
            except OSError as error:
                print("blocked", type(error).__name__)
            """
        )
        blocked = run_python(code, isolation=level)
        allowed = run_python(code, block_network=False, isolation=level)
    assert blocked.stdout.startswith("blocked"), blocked
    assert allowed.stdout.startswith("connected"), allowed
    assert blocked.isolation == level


def test_a_sandbox_that_cannot_start_the_code_is_an_error(monkeypatch: pytest.MonkeyPatch):
    if sandbox.isolation_level() == "process-group":
        pytest.skip("no namespaces here")
    level = sandbox.isolation_level()
    monkeypatch.setitem(sandbox._NAMESPACE_FLAGS, level, ("unshare", "--no-such-option"))
    result = run_python("print('hi')")
    assert result.status == "error"
    assert result.stdout == ""
