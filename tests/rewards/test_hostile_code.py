"""The code reward against hostile generated code (tests/rewards/hostile_programs.py): each program
gets its exact score, the trainer and its other processes survive, and afterwards no process of
the run, no temporary folder and no file it wrote outside its folder is left.

The default suite runs every program at this machine's isolation level in one concurrent batch;
the slow suite runs each program alone at every level that works here (weaker levels forced),
limited to the programs whose protections that level provides.
"""

from __future__ import annotations

import os
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest

from steer.rewards import sandbox
from steer.rewards.code import CodeReward
from tests.rewards.hostile_programs import PROGRAMS, PROTECTIONS, Hostile, render

REPO_FILE = Path(__file__).resolve()
DATA_FILE = REPO_FILE.parents[2].parent / "shared" / "data" / "README.md"
SECRET_NAME = "STEER_HOSTILE_TEST_SECRET"
STRAY_PATHS = [Path("/steer-hostile.txt"), Path("/usr/steer-hostile.txt"), Path(f"{REPO_FILE}.hostile")]


def hostile_reward() -> CodeReward:
    """Short limits keep the suite fast: 2 s per sample, 0.4 s per test, 256 MB, 32 processes."""
    return CodeReward(mode="fraction", timeout_s=2.0, test_timeout_s=0.4, memory_mb=256, num_workers=1, max_processes=32)


@pytest.fixture(scope="module")
def trainer_side(tmp_path_factory: pytest.TempPathFactory):
    """What the programs attack: a world-writable folder with a canary, a listening socket, a
    secret in our environment, a bystander process, files they must not read."""
    outside = tmp_path_factory.mktemp("outside")
    outside.chmod(0o777)
    canary = outside / "canary.txt"
    canary.write_text("alive")
    canary.chmod(0o666)
    home_file = next((p for p in (Path.home() / ".bashrc", Path.home() / ".profile") if p.is_file()), REPO_FILE)
    bystander = subprocess.Popen(["sleep", "600"])
    server = socket.create_server(("127.0.0.1", 0))
    server.setblocking(False)
    os.environ[SECRET_NAME] = "hunter2"
    values = {
        "outside": str(outside),
        "canary": str(canary),
        "port": server.getsockname()[1],
        "secret_name": SECRET_NAME,
        "repo_file": str(REPO_FILE),
        "data_file": str(DATA_FILE if DATA_FILE.is_file() else REPO_FILE),
        "home_file": str(home_file),
    }
    try:
        yield {"values": values, "outside": outside, "canary": canary, "bystander": bystander, "server": server}
    finally:
        os.environ.pop(SECRET_NAME, None)
        server.close()
        bystander.kill()
        bystander.wait()


def _cases() -> list:
    return [
        pytest.param(level, program, id=f"{level}-{program.name}")
        for level in sandbox.ISOLATION_LEVELS
        for program in PROGRAMS
        if program.needs <= PROTECTIONS[level]
    ]


def _assert_nothing_left(trainer_side, sandbox_root: Path) -> None:
    assert sandbox.processes_of_runs() == [], "a process of the run outlived it"
    assert sandbox.cgroups_of_runs() == [], "the run's cgroup is left"
    assert list(sandbox_root.iterdir()) == [], "the run's temporary folder is left"
    assert trainer_side["bystander"].poll() is None, "a bystander process was killed"
    assert sorted(p.name for p in trainer_side["outside"].iterdir()) == ["canary.txt"]
    assert trainer_side["canary"].read_text() == "alive"
    assert [p for p in STRAY_PATHS if p.exists()] == []
    with pytest.raises(BlockingIOError):  # nobody connected to the trainer's socket
        trainer_side["server"].accept()


def test_every_hostile_program_at_once(trainer_side, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The whole suite as one batch, three samples at a time, at this machine's isolation level:
    concurrent runs must not disturb each other either (each has its own namespaces and uid)."""
    level = sandbox.isolation_level()
    programs = [p for p in PROGRAMS if p.needs <= PROTECTIONS[level]]
    sandbox_root = tmp_path / "sandbox-root"
    sandbox_root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(sandbox_root))
    reward = hostile_reward()
    reward.num_workers = 3

    output = reward([render(p, trainer_side["values"]) for p in programs], [p.reference for p in programs])

    assert dict(zip([p.name for p in programs], output.scores)) == {p.name: p.score for p in programs}
    assert output.num_errors == 0
    _assert_nothing_left(trainer_side, sandbox_root)


def test_the_suite_is_large_enough() -> None:
    machine = sandbox.isolation_level()
    runnable = [p for p in PROGRAMS if p.needs <= PROTECTIONS[machine]]
    assert len(runnable) >= 25, f"only {len(runnable)} hostile programs run at level {machine}"
    assert len({p.name for p in PROGRAMS}) == len(PROGRAMS)


@pytest.mark.slow
@pytest.mark.parametrize(("level", "program"), _cases())
def test_hostile_program(level: str, program: Hostile, trainer_side, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    if not sandbox.level_works(level):
        pytest.skip(f"isolation level {level} does not work here")
    monkeypatch.setattr(sandbox, "isolation_level", lambda: level)
    sandbox_root = tmp_path / "sandbox-root"
    sandbox_root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(sandbox_root))  # where run_python makes its folder

    output = hostile_reward()([render(program, trainer_side["values"])], [program.reference])

    assert output.scores == [program.score], program.name
    assert output.num_errors == 0
    _assert_nothing_left(trainer_side, sandbox_root)


def test_the_process_limit_is_enforced_for_the_sandbox_uid() -> None:
    """RLIMIT_NPROC binds only a non-root uid: at the ``namespaces`` level the code has one."""
    if sandbox.isolation_level() != "namespaces":
        pytest.skip("the code runs under our own uid here")
    code = (
        "import os, time\ncount = 0\nfor _ in range(100):\n    try:\n        pid = os.fork()\n"
        "    except OSError:\n        break\n    if pid == 0:\n        time.sleep(60)\n        os._exit(0)\n"
        "    count += 1\nprint(count, os.getuid())"
    )
    result = sandbox.run_python(code, max_processes=10, site_packages=False, timeout_s=10.0)
    count, uid = map(int, result.stdout.split())
    assert count == 9  # the parent itself is the tenth
    assert uid in sandbox.SANDBOX_UID_RANGE
    assert sandbox.processes_of_runs() == []


def test_the_child_sees_a_minimal_environment_and_no_trainer_files(trainer_side) -> None:
    """What the code can and cannot read, precisely (the module docstring's list)."""
    if sandbox.isolation_level() == "process-group":
        pytest.skip("no namespaces here: the code sees our file system")
    code = (
        "import os, json\n"
        "def readable(path):\n    try:\n        open(path, 'rb').read(1)\n        return True\n"
        "    except OSError:\n        return False\n"
        "print(json.dumps({'env': sorted(os.environ), 'proc': sorted(p for p in os.listdir('/proc') if p.isdigit()),"
        f"'repo': readable({str(REPO_FILE)!r}), 'data': readable({str(DATA_FILE)!r}),"
        f"'home': readable({trainer_side['values']['home_file']!r}), 'tmp': os.listdir('/tmp'),"
        "'etc_passwd': readable('/etc/passwd'), 'python': readable(os.__file__)}))"
    )
    import json

    seen = json.loads(sandbox.run_python(code, site_packages=False).stdout)
    assert seen["env"] == sorted(
        ["HOME", "LANG", "OMP_NUM_THREADS", "PATH", "PYTHONDONTWRITEBYTECODE", "PYTHONHASHSEED",
         "PYTHONIOENCODING", sandbox.ENV_MARKER, "TMPDIR"]
    )
    assert seen["proc"] == ["1", "2"]  # the supervisor and the code itself: no trainer process
    assert not seen["repo"] and not seen["data"] and not seen["home"]
    # only its own folder, plus the Python installation where it lives under /tmp (a venv made in a
    # quick clone there): bound back read-only so the code can run, nothing else of /tmp
    own = [name for name in seen["tmp"] if name.startswith("steer-sandbox-")]
    python_in_tmp = {Path(p).relative_to("/tmp").parts[0] for p in sandbox._visible_paths() if p.startswith("/tmp/")}
    assert len(own) == 1 and set(seen["tmp"]) - set(own) == python_in_tmp, (seen["tmp"], python_in_tmp)
    assert seen["etc_passwd"] and seen["python"]  # the system and the interpreter stay readable
