"""Containment of one sample's run as a whole (issue 26): a total memory cap and a process cap per
run through a cgroup, a size-limited working directory, the start-up report of what is active,
and the fallback to per-process limits where no cgroup can be made.

The hostile programs (tests/rewards/hostile_programs.py, ``CONTAINMENT_PROGRAMS``) run with the
code reward's config limits (1024 MB per process, 64 processes). Each stops by itself at a bounded
size should containment fail; the memory hog, which would need 51 GB uncontained, runs in a
"trainer" subprocess inside an outer cgroup capped at ``OUTER_CAP`` and only when the machine has
``OUTER_CAP + MEMORY_MARGIN`` available, so even a broken cap cannot bring the machine below
``MEMORY_MARGIN``.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from steer.rewards import code as code_module
from steer.rewards import sandbox
from steer.rewards.code import CodeReward
from tests.rewards.hostile_programs import (
    ADD_REFERENCE,
    EMPTY_FILES,
    HONEST_ADD,
    MEMORY_HOG,
    PIDS_BOMB,
    PIDS_BOMB_LIMIT,
    SMALL_FILES,
)

SRC = Path(__file__).resolve().parents[2] / "src"
OUTER_CAP = 3 << 30
"""Memory cap of the cgroup the memory-hog test's trainer runs in (the bound if the run's cap failed)."""
MEMORY_MARGIN = 2 << 30
"""The machine's available memory (MemAvailable) must never fall below this during the memory hog."""
CONFIG_LIMITS = {"memory_mb": 1024, "max_processes": 64}  # conf/reward/code.yaml


def _mem_available() -> int:
    with open("/proc/meminfo") as file:
        for line in file:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) << 10
    raise RuntimeError("no MemAvailable in /proc/meminfo")


def _mounts_left() -> list[str]:
    return [line for line in Path("/proc/self/mountinfo").read_text().splitlines() if "steer-sandbox-" in line]


@pytest.fixture
def sandbox_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Where run_python makes its temporary folders during the test (checked empty afterwards)."""
    root = tmp_path / "sandbox-root"
    root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(root))
    return root


@pytest.fixture
def recorded_runs(monkeypatch: pytest.MonkeyPatch) -> list[sandbox.SandboxResult]:
    """The SandboxResult of every run the code reward makes."""
    runs: list[sandbox.SandboxResult] = []
    real = code_module.run_python

    def recording(*args, **kwargs):
        runs.append(real(*args, **kwargs))
        return runs[-1]

    monkeypatch.setattr(code_module, "run_python", recording)
    return runs


def _needs_cgroup() -> sandbox.CgroupHierarchy:
    hierarchy = sandbox.containment().cgroup
    if hierarchy is None:
        pytest.skip(f"no cgroup here: {sandbox.containment().describe()}")
    return hierarchy


def test_containment_is_probed_and_reported_once(caplog: pytest.LogCaptureFixture) -> None:
    sandbox.containment.cache_clear()
    with caplog.at_level(logging.INFO, logger="steer.rewards.sandbox"):
        first = sandbox.containment()
        sandbox.run_python("pass", site_packages=False)
        CodeReward(num_workers=1)
        assert sandbox.containment() is first
    reports = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Sandbox: ")]
    assert reports == [f"Sandbox: {first.describe()}"]
    assert first.isolation == sandbox.isolation_level()
    hierarchy, why = sandbox.find_cgroup_hierarchy()
    if os.geteuid() == 0 and hierarchy is not None:  # root on this machine kind (and in CI): a cgroup
        assert first.cgroup == hierarchy, why
        assert f"by {hierarchy.describe()}" in reports[0]


def test_each_run_gets_its_own_capped_cgroup_and_it_is_removed(sandbox_root: Path) -> None:
    hierarchy = _needs_cgroup()
    limits = {"v1": ("memory.limit_in_bytes", "pids.max"), "v2": ("memory.max", "pids.max")}[hierarchy.version]
    parents = dict(hierarchy.directories)
    code = (
        "import json\n"
        "lines = [line.split(':', 2) for line in open('/proc/self/cgroup').read().split()]\n"
        "groups = {controllers or 'unified': path for _, controllers, path in lines}\n"
        f"parents = {parents!r}\n"
        "def read(controller, name):\n"
        "    own = parents[controller] + '/' + groups[controller].rsplit('/', 1)[-1]\n"
        "    return open(own + '/' + name).read().strip(), own\n"
        f"memory = read({'memory' if hierarchy.version == 'v1' else 'unified'!r}, {limits[0]!r})\n"
        f"pids = read({'pids' if hierarchy.version == 'v1' else 'unified'!r}, {limits[1]!r})\n"
        "print(json.dumps([memory, pids]))"
    )
    result = sandbox.run_python(code, site_packages=False, memory_mb=300, total_memory_mb=500, max_processes=10)
    assert result.status == "ok", result.stderr
    (memory, memory_dir), (pids, pids_dir) = json.loads(result.stdout)
    assert int(memory) == 500 << 20
    supervisor = sandbox.isolation_level() != "process-group"  # PID 1 of the namespace is in the group
    assert int(pids) == 10 + supervisor
    assert result.cgroup == hierarchy.version
    assert 0 < result.memory_peak_bytes < 100 << 20 and result.oom_kills == 0
    assert os.path.basename(memory_dir).startswith(f"{sandbox.CGROUP_PREFIX}{os.getpid()}-")
    assert not os.path.exists(memory_dir) and not os.path.exists(pids_dir)
    assert list(sandbox_root.iterdir()) == []


_TRAINER = r"""
import json, os, sys, tempfile
cfg = json.loads(sys.argv[1])
for procs in cfg["procs"]:  # into the outer, capped cgroup before anything else
    with open(procs, "w") as file:
        file.write("0")
tempfile.tempdir = cfg["tmp"]
from steer.rewards import code, sandbox
runs = []
real = code.run_python
def recording(*args, **kwargs):
    runs.append(real(*args, **kwargs))
    return runs[-1]
code.run_python = recording
reward = code.CodeReward(mode="fraction", timeout_s=10.0, test_timeout_s=1.0, num_workers=1, **cfg["limits"])
hog = reward([cfg["hog"]], [cfg["reference"]])
honest = reward([cfg["honest"]], [cfg["reference"]])  # the reward still works afterwards
print(json.dumps({
    "hog": hog.scores, "errors": hog.num_errors, "honest": honest.scores, "status": runs[0].status,
    "peak": runs[0].memory_peak_bytes, "oom_kills": runs[0].oom_kills, "elapsed": runs[0].elapsed_s,
    "stderr": runs[0].stderr[-400:], "cgroup": open("/proc/self/cgroup").read(),
}))
"""


def test_memory_hog_64_processes_of_800mb_is_contained(tmp_path: Path) -> None:
    """64 processes each touching 800 MB (51 GB; the machine has 24): the sample scores 0, the
    trainer lives, the run never holds more than its cap, MemAvailable stays over MEMORY_MARGIN."""
    hierarchy = _needs_cgroup()
    start_available = _mem_available()
    if start_available < OUTER_CAP + MEMORY_MARGIN:
        pytest.skip(f"only {start_available >> 20} MB available: not safe to run")
    root = tmp_path / "sandbox-root"
    root.mkdir()
    outer = sandbox.RunCgroup(hierarchy, f"steer-test-outer-{os.getpid()}", OUTER_CAP, 512)
    lowest = [start_available]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            lowest[0] = min(lowest[0], _mem_available())
            time.sleep(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        config = {
            "procs": outer.procs_files, "tmp": str(root), "limits": CONFIG_LIMITS, "hog": MEMORY_HOG.code,
            "honest": HONEST_ADD, "reference": ADD_REFERENCE,
        }
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), *filter(None, [os.environ.get("PYTHONPATH")])])}
        trainer = subprocess.run(
            [sys.executable, "-c", _TRAINER, json.dumps(config)], capture_output=True, text=True, timeout=120, env=env
        )
        outer_peak, outer_oom_kills = outer.stats()
        left_in_outer = [name for _, parent in outer.directories.items() for name in os.listdir(parent)
                         if name.startswith(sandbox.CGROUP_PREFIX)]
    finally:
        done.set()
        sampler.join()
        assert outer.remove(), "the test's outer cgroup could not be removed"
    assert trainer.returncode == 0, trainer.stderr[-2000:]  # the trainer process lived
    report = json.loads(trainer.stdout.strip().splitlines()[-1])
    assert "steer-test-outer-" in report["cgroup"], "the trainer was not in the outer cgroup"
    cap = 1024 + 144 + 64  # MB: memory_mb + disk_mb (2 x 64 MB of output + 16) + headroom, the default cap
    assert report["hog"] == [0.0] and report["errors"] == 0, report
    assert report["honest"] == [1.0], report
    assert report["status"] == "failed" and report["oom_kills"] >= 1, report
    assert "memory cap (%d MB in all) was reached" % cap in report["stderr"], report
    assert report["peak"] <= cap << 20, report
    # the trainer, its reward and the sandbox together, as the kernel counted them: far under the
    # outer cap, which never had to act
    assert outer_peak < (cap + 256) << 20 and outer_oom_kills == 0, (outer_peak, outer_oom_kills)
    assert lowest[0] >= MEMORY_MARGIN, f"MemAvailable fell to {lowest[0] >> 20} MB"
    assert left_in_outer == []
    assert sandbox.processes_of_runs() == [] and sandbox.cgroups_of_runs() == []
    assert list(root.iterdir()) == []


@pytest.mark.parametrize("program", [SMALL_FILES, EMPTY_FILES], ids=lambda p: p.name)
def test_many_files_fill_only_the_working_directory(program, sandbox_root: Path, recorded_runs) -> None:
    """Files far under the per-file cap, 1 GB or 100,000 of them: the working directory's tmpfs
    stops them at its size (2 x 64 MB + 16 MB for the code reward) or inode count, in memory, and
    nothing is left afterwards."""
    if not sandbox.containment().workdir_tmpfs:
        pytest.skip("the working directory is on disk at this isolation level")
    reward = CodeReward(mode="fraction", timeout_s=10.0, test_timeout_s=1.0, num_workers=1, **CONFIG_LIMITS)
    output = reward([program.code], [ADD_REFERENCE])
    assert output.scores == [0.0] and output.num_errors == 0
    records, _ = code_module.run_tests(program.code, ADD_REFERENCE, timeout_s=10.0, **CONFIG_LIMITS)
    files = int(records[0].output.split()[-2])
    if program is SMALL_FILES:  # 64 kB each: the size cap binds
        assert (144 << 20) - (64 << 10) * 2 <= files * (64 << 10) <= 144 << 20, files
    else:  # empty: the inode cap binds (the root and main.py take two)
        assert files == sandbox.WORKDIR_INODES - 2, files
    assert all(run.status == "ok" for run in recorded_runs)
    assert list(sandbox_root.iterdir()) == []
    assert _mounts_left() == []
    assert sandbox.processes_of_runs() == [] and sandbox.cgroups_of_runs() == []


def test_pids_bomb_is_stopped_by_the_cgroup_alone(sandbox_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A root ``process-group`` run (no namespaces, our own uid: RLIMIT_NPROC does not bind root)
    where only the cgroup's pids.max can stop a fork bomb; the bomb stops itself at 400."""
    if os.geteuid() != 0:
        pytest.skip("needs root: the case where RLIMIT_NPROC does not bind")
    if sandbox.cgroups_work("process-group") is None:
        pytest.skip("no cgroup for a process-group run here")
    monkeypatch.setattr(sandbox, "_others_can_run_python", lambda: False)  # the code keeps uid 0
    monkeypatch.setattr(sandbox, "isolation_level", lambda: "process-group")
    code = PIDS_BOMB.code + "\nimport os\nprint(children, os.getuid())"
    result = sandbox.run_python(code, site_packages=False, max_processes=20, timeout_s=10.0)
    assert result.status == "ok", result.stderr
    assert result.stdout.split() == ["19", "0"]  # the code itself is the 20th; it ran as root
    assert result.cgroup is not None
    reward = CodeReward(mode="fraction", timeout_s=10.0, num_workers=1, **CONFIG_LIMITS)
    output = reward([PIDS_BOMB.code], [ADD_REFERENCE])
    assert output.scores == [0.0] and PIDS_BOMB_LIMIT > CONFIG_LIMITS["max_processes"]
    assert sandbox.processes_of_runs() == [] and sandbox.cgroups_of_runs() == []
    assert list(sandbox_root.iterdir()) == []


def test_pids_bomb_at_this_machines_level(sandbox_root: Path) -> None:
    """The same bomb at the machine's own level, with the config's 64 processes: it scores 0 and
    leaves nothing (the supervisor of a namespace level is the group's 65th task)."""
    reward = CodeReward(mode="fraction", timeout_s=10.0, num_workers=1, **CONFIG_LIMITS)
    output = reward([PIDS_BOMB.code], [ADD_REFERENCE])
    assert output.scores == [0.0] and output.num_errors == 0
    assert sandbox.processes_of_runs() == [] and sandbox.cgroups_of_runs() == []
    assert list(sandbox_root.iterdir()) == []


def test_without_a_cgroup_the_per_process_limits_remain(monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    """Where no cgroup can be made (simulated: no cgroup mounts), the probe says so, with a
    warning, and runs keep RLIMIT_AS and RLIMIT_NPROC."""
    monkeypatch.setattr(sandbox, "_cgroup_mounts", lambda: {})
    sandbox.containment.cache_clear()
    sandbox.cgroups_work.cache_clear()
    try:
        with caplog.at_level(logging.INFO, logger="steer.rewards.sandbox"):
            found = sandbox.containment()
        assert found.cgroup is None
        assert [r.levelno for r in caplog.records if r.getMessage().startswith("Sandbox: ")] == [logging.WARNING]
        assert "per-process limits only" in found.describe() and "v1 memory: not mounted" in found.describe()
        result = sandbox.run_python("block = bytearray(2 * 1024**3)", memory_mb=256, site_packages=False)
        assert result.status == "failed" and "MemoryError" in result.stderr and result.cgroup is None
    finally:
        monkeypatch.undo()
        sandbox.containment.cache_clear()
        sandbox.cgroups_work.cache_clear()


def test_cgroup_mounts_and_own_groups_are_read_from_proc(monkeypatch: pytest.MonkeyPatch) -> None:
    """The hybrid layout of this machine kind: v1 memory and pids beside an empty v2 hierarchy."""
    files = {
        "/proc/self/mountinfo": (
            "30 25 0:26 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755\n"
            "31 30 0:27 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory\n"
            "32 30 0:28 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids\n"
            "33 30 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct\n"
            "34 30 0:30 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n"
        ),
        "/proc/self/cgroup": "8:pids:/\n4:memory:/process_api/abc\n2:cpu,cpuacct:/\n0::/\n",
    }
    real_read = sandbox._read
    monkeypatch.setattr(sandbox, "_read", lambda path: files.get(path) or real_read(path))
    mounts, own = sandbox._cgroup_mounts(), sandbox._own_cgroups()
    assert mounts == {"memory": ("/sys/fs/cgroup/memory", "/"), "pids": ("/sys/fs/cgroup/pids", "/"),
                      "unified": ("/sys/fs/cgroup/unified", "/")}
    assert own == {"pids": "/", "memory": "/process_api/abc", "unified": "/"}
    assert sandbox._cgroup_directory(mounts["memory"], own["memory"]) == "/sys/fs/cgroup/memory/process_api/abc"
    assert sandbox._cgroup_directory(mounts["pids"], own["pids"]) == "/sys/fs/cgroup/pids"
    # a mount of part of the tree (a container without a cgroup namespace): paths below its root only
    assert sandbox._cgroup_directory(("/sys/fs/cgroup", "/docker/x"), "/docker/x/leaf") == "/sys/fs/cgroup/leaf"
    assert sandbox._cgroup_directory(("/sys/fs/cgroup", "/docker/x"), "/other") is None


def test_v2_groups_are_made_beside_our_leaf_with_both_controllers(tmp_path: Path, monkeypatch) -> None:
    """cgroup v2 (not on this machine kind: its v2 hierarchy has no controllers) on a fake tree: a
    leaf with tasks may not have children, so runs go beside it, under its parent, once memory
    and pids are enabled there; each run writes memory.max, memory.swap.max 0 and pids.max."""
    parent = tmp_path / "system.slice"
    (parent / "trainer.service").mkdir(parents=True)
    (parent / "cgroup.controllers").write_text("cpu io memory pids\n")
    (parent / "cgroup.subtree_control").write_text("cpu\n")
    monkeypatch.setattr(sandbox, "_cgroup_mounts", lambda: {"unified": (str(tmp_path), "/")})
    monkeypatch.setattr(sandbox, "_own_cgroups", lambda: {"unified": "/system.slice/trainer.service"})
    hierarchy, why = sandbox.find_cgroup_hierarchy()
    assert hierarchy == sandbox.CgroupHierarchy("v2", (("unified", str(parent)),)), why
    assert (parent / "cgroup.subtree_control").read_text() == "+memory +pids"  # what we asked the kernel
    assert hierarchy.describe() == "cgroup v2 (memory, pids)"
    run = sandbox.RunCgroup(hierarchy, "steer-sandbox-1-ab", 500 << 20, 11)
    group = parent / "steer-sandbox-1-ab"
    assert (group / "memory.max").read_text() == str(500 << 20) and (group / "pids.max").read_text() == "11"
    assert run.procs_files == [str(group / "cgroup.procs")]
    # without the controllers the v2 candidate is refused with a reason, and v1 is not mounted
    (parent / "cgroup.controllers").write_text("cpu io\n")
    hierarchy, why = sandbox.find_cgroup_hierarchy()
    assert hierarchy is None and "lacks the memory or pids controller" in why and "v1 memory: not mounted" in why
