"""The MLflow UI in a headless browser (experiments/check_mlflow_ui.py): the address a run prints
opens its runs in the model-training view. Slow (~40 s: the UI starts, two pages load) and skipped
without a Chromium (Debian: apt-get install chromium)."""

from __future__ import annotations

import pytest

from experiments.check_mlflow_ui import check, find_browser


@pytest.mark.slow
@pytest.mark.skipif(find_browser() is None, reason="needs a Chromium: apt-get install chromium")
def test_the_training_view_url_shows_the_runs(tmp_path):
    pages = check(tmp_path)
    training = pages["model-training URL"]
    assert training.url.endswith("?workflowType=machine_learning")
    assert training.shows_run_table and not training.shows_genai_overview
    assert training.screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # What the tag alone gives in MLflow 3.17: the plain address still opens the GenAI overview. If
    # a later MLflow honours mlflow.experimentKind here, this fails: drop workflowType from ui_url then.
    plain = pages["plain experiment URL"]
    assert plain.shows_genai_overview and not plain.shows_run_table
