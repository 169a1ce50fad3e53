"""The README's "Several GPUs and nodes" recipes: every command line composes and passes the
start-up checks with the rank layout its launcher gives; the CPU recipe runs (slow)."""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from steer.distributed import configured_ranks
from steer.startup import check_config
from tests.conftest import REPO, TINY_RUN, compose

SECTION = "## Several GPUs and nodes"


def readme_blocks() -> list[str]:
    text = (REPO / "README.md").read_text()
    section = text[text.index(SECTION):]
    section = section[: section.index("\n## ", len(SECTION))] if "\n## " in section[len(SECTION):] else section
    return re.findall(r"```bash\n(.*?)```", section, flags=re.S)


def recipes() -> list[tuple[str, list[str], dict[str, str], int | None]]:
    """(command line, run.py overrides, environment the launcher sets, ranks the launcher starts)."""
    found = []
    for block in readme_blocks():
        sbatch = dict(re.findall(r"#SBATCH --([a-z-]+)=(\S+)", block))
        for line in block.splitlines():
            if "src/run.py" not in line:
                continue
            words = shlex.split(line.split("#", 1)[0].replace("${SLURM_JOB_ID}", "123").replace("$", ""))
            overrides = words[words.index("src/run.py") + 1 :]
            env, ranks = {}, None
            if words[0] == "torchrun":
                ranks = int(words[words.index("--nnodes") + 1]) * int(words[words.index("--nproc_per_node") + 1])
                env = {"WORLD_SIZE": str(ranks)}
            elif words[0] == "srun":
                ranks = int(sbatch["nodes"]) * int(sbatch["ntasks-per-node"])
            found.append((line, overrides, env, ranks))
    return found


def test_the_readme_has_the_recipes():
    launchers = [line.split()[0] for line, *_ in recipes()]
    assert launchers.count("python") >= 3 and "torchrun" in launchers and "srun" in launchers
    assert any("trainer=fsdp" in line for line, *_ in recipes()) and any("trainer=ddp" in line for line, *_ in recipes())


@pytest.mark.parametrize("line, overrides, env, ranks", recipes(), ids=[r[0][:60] for r in recipes()])
def test_each_recipe_composes_and_passes_the_start_up_checks(line, overrides, env, ranks, monkeypatch):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    tiny = [] if any(o.startswith("+experiment") for o in overrides) else TINY_RUN
    cfg = compose([*tiny, *overrides])
    if cfg.rollout.engine._target_.endswith("VLLMRolloutEngine") and importlib.util.find_spec("vllm") is None:
        cfg = compose([*tiny, *overrides, "rollout=hf"])  # refused without vLLM (tests/test_app.py); the rest is checked
    check_config(cfg)
    if ranks is not None:  # the trainer expects exactly the processes the launcher starts
        assert configured_ranks(cfg.trainer) == ranks
    assert cfg.trainer.strategy is not None


@pytest.mark.slow
def test_the_cpu_recipe_runs_on_two_processes_into_one_output_folder(tmp_path):
    """`python src/run.py trainer=ddp trainer.devices=2 trainer.accelerator=cpu` with tiny overrides:
    Lightning re-runs the command for rank 1 in the same Hydra folder; one MLflow run, global counts."""
    line = next(line for line, *_ in recipes() if "trainer.accelerator=cpu" in line)
    overrides = shlex.split(line.split("#", 1)[0])[2:]
    env = {**os.environ, "STEER_CACHE": str(tmp_path / "cache")}
    env.pop("WORLD_SIZE", None)
    run = subprocess.run([sys.executable, str(REPO / "src/run.py"), *overrides, *TINY_RUN, "hydra.run.dir=run"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    folder = tmp_path / "run"
    assert (folder / "checkpoints" / "last.ckpt").is_file()
    assert len((folder / "eval_results.jsonl").read_text().splitlines()) == 3  # steps 0, 1, 2; not once per rank
    store = sqlite3.connect(folder / "mlflow.db")
    assert store.execute("select count(*) from runs").fetchone() == (1,)
    prompts = store.execute("select value from metrics where key = 'batch/prompts'").fetchall()
    assert prompts == [(4.0,), (4.0,)]  # algorithm.prompts_per_step=4 over both ranks
