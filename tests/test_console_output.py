"""What `python src/run.py` prints when its output is not a terminal (a log, CI): our progress lines
and our summary, no dependency chatter; Lightning's routine lines land in run.log, warnings still show."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import warnings

from steer.cli import LIGHTNING_ROUTINE, quiet_dependencies
from tests.conftest import REPO, TINY_RUN

NOISE = ("Tip:", "litlogger", "GPU available", "TPU available", "LeafSpec", "Writing model shards",
         "Creating initial MLflow database tables", "Updating database tables")


def test_a_default_run_prints_progress_and_summary_only(tmp_path):
    overrides = [o for o in TINY_RUN if "progress" not in o and not o.startswith("eval.every_n_steps")]
    overrides += ["algorithm.steps=3", "eval.every_n_steps=50"]  # the final evaluation only after training
    env = {**os.environ, "STEER_CACHE": str(tmp_path / "cache"), "COLUMNS": "80"}
    result = subprocess.run([sys.executable, str(REPO / "src" / "run.py"), *overrides], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    for noise in NOISE:
        assert noise not in result.stdout and noise not in result.stderr, noise
    assert result.stderr == ""
    out = result.stdout.splitlines()
    progress = [line for line in out if line.startswith("RL step")]
    assert [line.split("  ")[0] for line in progress] == ["RL step 1/3", "RL step 2/3", "RL step 3/3"]
    line = r"RL step {}/3  reward -?[\d.]+  entropy [\d.]+  eval acc [\d.]+ @{}  s/step [\d.]+"
    assert all(re.fullmatch(line.format(i + 1, 0), text) for i, text in enumerate(progress[:2])), progress
    assert re.fullmatch(line.format(3, 3), progress[-1]), progress[-1]  # the final evaluation, not step 0's
    assert out.index(progress[-1]) < next(i for i, text in enumerate(out) if "Run summary after 3 RL steps" in text)
    assert out[-2].startswith("mlflow ui --backend-store-uri sqlite:///")
    assert re.fullmatch(r"then the runs, in the model-training view: http://127\.0\.0\.1:5000/#/experiments/\d+\?workflowType=machine_learning",
                        out[-1]), out[-1]
    (run_log,) = (tmp_path / "outputs").glob("*/*/run.log")
    assert "GPU available: False" in run_log.read_text()  # routed, not lost


def test_quieting_keeps_warnings():
    quiet_dependencies()
    quiet_dependencies()  # idempotent: one filter
    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    assert len(logger.filters) == 1
    (routing,) = logger.filters
    info = logger.makeRecord(logger.name, logging.INFO, __file__, 1, f"{LIGHTNING_ROUTINE[0]} True", (), None)
    warning = logger.makeRecord(logger.name, logging.WARNING, __file__, 1, f"{LIGHTNING_ROUTINE[0]} True", (), None)
    other = logger.makeRecord(logger.name, logging.INFO, __file__, 1, "Restoring states from the checkpoint", (), None)
    assert (routing.filter(info), routing.filter(warning), routing.filter(other)) == (False, True, True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        quiet_dependencies()
        warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use ...", FutureWarning)
        warnings.warn("a real one", FutureWarning)
    assert [str(w.message) for w in caught] == ["a real one"]
