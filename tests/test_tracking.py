"""The MLflow store of a run: artifacts next to it (and still found after a copy), honest final
statuses (FINISHED / FAILED / KILLED), and the one-line ``mlflow ui`` command."""

from __future__ import annotations

import os
import re
import shutil
import signal

import lightning as L
import mlflow
import pytest

from steer.app import run, train
from steer.tracking import RunFolderMLFlowLogger, open_store, repoint_artifacts, tracked_run, ui_command, ui_url
from tests.conftest import TINY_RUN, compose


def runs_of(db) -> dict:
    client = mlflow.MlflowClient(tracking_uri=open_store(db))
    runs = client.search_runs([client.get_experiment_by_name("steer-lab").experiment_id])
    return {run.info.run_name: run for run in runs}


def test_a_run_folder_copied_elsewhere_still_opens_with_its_figures(tmp_path, monkeypatch, capsys):
    elsewhere = tmp_path / "started-from-here"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # artifacts must not land in ./mlruns of the working directory
    run_dir = tmp_path / "outputs" / "run"
    with_progress_bar = [o for o in TINY_RUN if "progress" not in o]
    cfg = compose([*with_progress_bar, "logger=mlflow", "callbacks.entropy_probe.figures=[entropy]"], run_dir)
    train(cfg)
    assert list(elsewhere.iterdir()) == []
    # Output is not a terminal here (80 columns): the ui command must still be one whole line, the
    # last one, after the progress lines (plain, one per step here, RL steps, no epoch counter).
    out = capsys.readouterr().out.splitlines()
    uri = f"sqlite:///{run_dir.resolve()}/mlflow.db"
    assert out[-2:] == [ui_command(uri), f"then the runs, in the model-training view: {ui_url(uri)}"]
    assert ui_url(uri).endswith("?workflowType=machine_learning") and "/#/experiments/" in ui_url(uri)
    bar = [i for i, line in enumerate(out) if line.startswith("RL step")]
    assert [out[i].split("  ")[0] for i in bar] == ["RL step 1/2", "RL step 2/2"]
    # the last line after the final evaluation (@2, not the step-0 one), on one line
    assert re.fullmatch(r"RL step 2/2  reward -?[\d.]+  entropy [\d.]+  eval acc [\d.]+ @2  s/step [\d.]+", out[bar[-1]]), out[bar[-1]]
    assert not any("Epoch" in line for line in out)
    assert bar[-1] < next(i for i, line in enumerate(out) if "Run summary" in line)
    assert (run_dir / "artifacts").is_dir()
    # A store holding someone else's experiment too: theirs must not be re-pointed.
    theirs = (tmp_path / "their-artifacts").as_uri()
    mlflow.MlflowClient(f"sqlite:///{run_dir}/mlflow.db").create_experiment("theirs", artifact_location=theirs)

    copy = tmp_path / "moved" / "copy-of-run"
    shutil.copytree(run_dir, copy)
    shutil.rmtree(run_dir)  # the original is gone: the copy must stand on its own
    (run,) = runs_of(copy / "mlflow.db").values()
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{copy}/mlflow.db")
    assert run.info.status == "FINISHED"
    assert run.info.artifact_uri == (copy / "artifacts").as_uri() + f"/{run.info.run_id}/artifacts"
    assert [f.path for f in client.list_artifacts(run.info.run_id, "figures")] == ["figures/entropy.png"]
    downloaded = client.download_artifacts(run.info.run_id, "figures/entropy.png", str(tmp_path / "dl"))
    with open(downloaded, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert client.get_experiment_by_name("theirs").artifact_location == theirs
    assert repoint_artifacts(copy / "mlflow.db") == 0  # already re-pointed: nothing to do

    # Resuming (a run_id) from the moved folder finds the run and logs next to the copy.
    resumed = RunFolderMLFlowLogger(experiment_name="steer-lab", tracking_uri=f"sqlite:///{copy}/mlflow.db",
                                    run_id=run.info.run_id)
    assert resumed.run_id == run.info.run_id
    (copy / "note.txt").write_text("after resume")
    resumed.experiment.log_artifact(resumed.run_id, str(copy / "note.txt"))
    assert (copy / "artifacts" / run.info.run_id / "artifacts" / "note.txt").read_text() == "after resume"


class FailOnTrainStart(L.Callback):
    def on_train_start(self, trainer, module):
        raise RuntimeError("boom")


class SignalOnFirstBatch(L.Callback):
    def __init__(self, signum: int) -> None:
        self.signum = signum

    def on_train_batch_end(self, trainer, module, *args):
        os.kill(os.getpid(), self.signum)


def test_failed_and_killed_runs_end_failed_and_killed(tmp_path):
    """One store, five runs: an exception in fit, a config error after the logger exists, SIGTERM, SIGINT, an eval."""
    base = [*TINY_RUN, "logger=mlflow", "callbacks.entropy_probe=null", "~eval.benchmarks.arithmetic"]
    with pytest.raises(RuntimeError, match="boom"):
        train(compose([*base, "run_name=exception", "+callbacks.boom._target_=tests.test_tracking.FailOnTrainStart"],
                      tmp_path))
    with pytest.raises(Exception, match="no_such_trainer_argument"):
        train(compose([*base, "run_name=config_error", "+trainer.no_such_trainer_argument=1"], tmp_path))
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    for signum in (signal.SIGTERM, signal.SIGINT):
        with pytest.raises(SystemExit) as exit_info:
            train(compose([*base, f"run_name={signum.name}", "+callbacks.kill._target_=tests.test_tracking.SignalOnFirstBatch",
                           f"+callbacks.kill.signum={int(signum)}"], tmp_path))
        assert exit_info.value.code == 128 + signum
        assert {s: signal.getsignal(s) for s in handlers} == handlers  # our handlers are gone again
    # ... and a fifth, mode=eval, that finishes: its results are an artifact next to the store.
    run(compose([*TINY_RUN, "logger=mlflow", "mode=eval", "run_name=eval"], tmp_path))
    runs = runs_of(tmp_path / "mlflow.db")
    statuses = {name: run.info.status for name, run in runs.items()}
    assert statuses == {"exception": "FAILED", "config_error": "FAILED", "SIGTERM": "KILLED", "SIGINT": "KILLED",
                        "eval": "FINISHED"}
    assert (tmp_path / "artifacts" / runs["eval"].info.run_id / "artifacts" / "eval_results.json").is_file()


def test_tracked_run_without_mlflow_changes_nothing(tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    def handlers():
        return {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}

    before, ran = handlers(), []
    for logger in (False, None, CSVLogger(tmp_path)):
        with tracked_run(logger):
            assert handlers() == before  # no signal handlers of its own (an MLflow logger gets them)
            ran.append(logger)
        assert handlers() == before
    assert len(ran) == 3  # each body ran once, through to its end
    error = ValueError("passes through")
    with pytest.raises(ValueError) as raised:
        with tracked_run(None):
            raise error
    assert raised.value is error and handlers() == before


def test_the_experiment_is_marked_as_model_training(tmp_path):
    """MLflow 3's UI opens an untagged experiment in its GenAI view; ours opens in the training view
    (tag mlflow.experimentKind; the browser check: experiments/check_mlflow_ui.py)."""
    from steer.tracking import EXPERIMENT_KIND_TAG, TRAINING_KIND

    uri = f"sqlite:///{tmp_path}/new/mlflow.db"
    logger = RunFolderMLFlowLogger(experiment_name="steer-lab", tracking_uri=uri)
    client = logger.experiment
    assert client.get_experiment_by_name("steer-lab").tags[EXPERIMENT_KIND_TAG] == TRAINING_KIND == "custom_model_development"
    # a store written before the tag gets it; an experiment someone gave another kind keeps it
    old = mlflow.MlflowClient(f"sqlite:///{tmp_path}/old/mlflow.db")
    old.create_experiment("steer-lab")
    old.create_experiment("theirs", tags={EXPERIMENT_KIND_TAG: "genai_development"})
    RunFolderMLFlowLogger(experiment_name="steer-lab", tracking_uri=f"sqlite:///{tmp_path}/old/mlflow.db").experiment
    RunFolderMLFlowLogger(experiment_name="theirs", tracking_uri=f"sqlite:///{tmp_path}/old/mlflow.db").experiment
    assert old.get_experiment_by_name("steer-lab").tags[EXPERIMENT_KIND_TAG] == TRAINING_KIND
    assert old.get_experiment_by_name("theirs").tags[EXPERIMENT_KIND_TAG] == "genai_development"


def test_the_ui_url_opens_the_training_view(tmp_path):
    from steer.tracking import ui_url

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    assert ui_url(uri) == "http://127.0.0.1:5000/#/experiments?workflowType=machine_learning"  # no experiment yet
    experiment_id = RunFolderMLFlowLogger(experiment_name="steer-lab", tracking_uri=uri).experiment.get_experiment_by_name(
        "steer-lab").experiment_id
    assert ui_url(uri) == f"http://127.0.0.1:5000/#/experiments/{experiment_id}?workflowType=machine_learning"
