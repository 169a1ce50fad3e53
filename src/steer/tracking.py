"""Where a run's MLflow data lives and how its run ends: one place for the store, its artifacts, the
run's final status and the ``mlflow ui`` line.

**Artifacts live with their store.** A run (or a sweep) writes ``mlflow.db`` and, next to it,
``artifacts/`` (figures, probe data, evaluation results). MLflow records an *absolute* artifact URI
per experiment and per run (a relative ``artifact_location`` is made absolute at creation), so a
copied or moved folder would still point at the original. The experiment therefore carries the tag
``steer.artifact_root`` (the artifact folder relative to the store) and :func:`repoint_artifacts`
rewrites the recorded URIs to the store's current folder. It runs whenever our code opens a store
(the logger, ``experiments/compare.py``, ``experiments/plot_run.py``) and from the command line
before ``mlflow ui`` on a copied folder::

    python -m steer.tracking outputs/<date>/<time>_<run_name>        # re-point, print the ui line
    python -m steer.tracking outputs/<date>/<time>_<run_name> --ui   # ... and start the UI

**A run ends with an honest status.** Lightning marks a run ``FAILED`` when ``fit`` raises; anything
that fails after the run exists but outside ``fit`` (building callbacks or the trainer, the summary)
and a SIGTERM/SIGINT would otherwise leave it ``RUNNING`` forever. :func:`tracked_run` wraps
everything after the logger is built: an exception ends the run ``FAILED``, a SIGTERM or SIGINT
(Ctrl+C) ends it ``KILLED`` and the process exits with 128 + the signal number.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shlex
import signal
import socket
import sqlite3
import sys
import threading
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import unquote, urlparse

from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig

from steer.knobs import ConfigError, select, writable_folder

log = logging.getLogger(__name__)

ARTIFACT_ROOT_TAG = "steer.artifact_root"
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
"""MLflow 3's record of what an experiment is for."""
TRAINING_KIND = "custom_model_development"
"""The kind the UI calls "Machine learning" (model training: runs, parameters, metric charts), as
opposed to ``genai_development`` (traces, evaluation runs). MLflow 3.17's UI does not pick its view
from the tag, though: it opens the GenAI view unless the URL says ``workflowType=machine_learning``
or the browser remembers the "Model training" switch (checked in a headless browser:
experiments/check_mlflow_ui.py), so :func:`ui_url` gives that URL."""
UI_ADDRESS = "http://127.0.0.1:5000"
"""Where :func:`ui_command`'s server listens."""
ARTIFACT_FOLDER = "artifacts"
STORE_FILE = "mlflow.db"


def store_path(tracking_uri: str) -> Path | None:
    """The sqlite file of a ``sqlite:///...`` tracking URI (None for any other kind of store)."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    return Path(tracking_uri[len("sqlite:///"):])


def ui_command(tracking_uri: str) -> str:
    """The one-line ``mlflow ui`` command that opens ``tracking_uri`` (a sqlite store) locally."""
    return f"mlflow ui --backend-store-uri {shlex.quote(tracking_uri)} --host 127.0.0.1 --port 5000 --workers 1"


def ui_url(tracking_uri: str, experiment_name: str = "steer-lab", address: str = UI_ADDRESS) -> str:
    """The UI address of the experiment's runs in the model-training view (MLflow 3 opens its GenAI
    view otherwise); the experiments list when the store has no such experiment."""
    import mlflow

    experiment = mlflow.MlflowClient(tracking_uri=tracking_uri).get_experiment_by_name(experiment_name)
    if experiment is None:
        return f"{address}/#/experiments?workflowType=machine_learning"
    return f"{address}/#/experiments/{experiment.experiment_id}?workflowType=machine_learning"


def _local_path(uri: str) -> str:
    """``file:///a/b`` or ``/a/b`` -> ``/a/b`` (MLflow writes local artifact URIs either way)."""
    return unquote(urlparse(uri).path) if uri.startswith("file:") else uri


def repoint_artifacts(db: str | Path) -> int:
    """Point the artifact URIs recorded in the sqlite store ``db`` at the folder ``db`` is in now.

    Only experiments tagged ``steer.artifact_root`` (created by :class:`RunFolderMLFlowLogger`) are
    touched: their ``artifact_location`` becomes ``<folder of db>/<tag value>`` and every run's
    ``artifact_uri`` keeps its part below the old location. Returns the number of rewritten
    experiments (0 when the folder has not moved, or for a store we did not create).
    """
    db = Path(db).resolve()
    if not db.is_file():
        return 0
    changed = 0
    with contextlib.closing(sqlite3.connect(db)) as connection, connection:
        try:
            rows = connection.execute(
                "SELECT e.experiment_id, e.artifact_location, t.value FROM experiments e "
                "JOIN experiment_tags t ON t.experiment_id = e.experiment_id WHERE t.key = ?",
                (ARTIFACT_ROOT_TAG,),
            ).fetchall()
        except sqlite3.OperationalError:  # not (yet) an MLflow store
            return 0
        for experiment_id, old_location, relative in rows:
            new_location = (db.parent / relative).as_uri()
            if old_location == new_location:
                continue
            old_prefix = _local_path(old_location).rstrip("/")
            for run_uuid, uri in connection.execute(
                "SELECT run_uuid, artifact_uri FROM runs WHERE experiment_id = ?", (experiment_id,)
            ).fetchall():
                path = _local_path(uri or "")
                if path == old_prefix or path.startswith(old_prefix + "/"):
                    connection.execute("UPDATE runs SET artifact_uri = ? WHERE run_uuid = ?",
                                       (new_location + path[len(old_prefix):], run_uuid))
                    _forget_artifact_repository(run_uuid)
            connection.execute("UPDATE experiments SET artifact_location = ? WHERE experiment_id = ?",
                               (new_location, experiment_id))
            changed += 1
    if changed:
        log.info("re-pointed the artifacts of %s to %s", db, db.parent)
    return changed


def _forget_artifact_repository(run_id: str) -> None:
    """MLflow caches each run's artifact repository in the process: drop the stale one."""
    try:
        from mlflow.tracking._tracking_service import utils

        utils._artifact_repos_cache.pop(run_id, None)
    except (ImportError, AttributeError):  # another MLflow version: nothing cached that way
        pass


def open_store(location: str | Path) -> str:
    """The tracking URI of a run or sweep folder, an ``mlflow.db`` path or a ``sqlite:///`` URI,
    after re-pointing its artifacts to where the store is now (see :func:`repoint_artifacts`).
    Any other URI (an MLflow server) is returned unchanged."""
    location = str(location)
    if "://" in location and not location.startswith("sqlite:///"):
        return location
    db = store_path(location) if location.startswith("sqlite:///") else Path(location)
    if db.is_dir():
        db = db / STORE_FILE
    db = db.expanduser().resolve()
    repoint_artifacts(db)
    return f"sqlite:///{db}"


class RunFolderMLFlowLogger(MLFlowLogger):
    """Lightning's MLflow logger whose artifacts live next to a sqlite store (``artifacts/`` beside
    ``mlflow.db``) and follow it when the folder is copied or moved.

    Takes every :class:`~lightning.pytorch.loggers.MLFlowLogger` argument (``run_id`` resumes an
    existing run). ``artifact_location=None`` (the default) means ``<store folder>/artifacts``; an
    explicit location, or a store that is not sqlite, is used as given and not re-pointed.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        db = store_path(self._tracking_uri or "")
        self._store_db = db.resolve() if db is not None else None
        self._relocatable = self._artifact_location is None and self._store_db is not None
        if self._relocatable:
            self._artifact_location = (self._store_db.parent / ARTIFACT_FOLDER).as_uri()

    @property
    def experiment(self):  # noqa: D102  (see MLFlowLogger.experiment)
        first = not self._initialized and rank_zero_only.rank == 0
        if first and self._relocatable:
            self._prepare_store()
        client = super().experiment
        if first and not self._relocatable and self._experiment_id is not None:  # a server: MLflow created it
            mark_training(client, client.get_experiment(self._experiment_id))
        return client

    def _prepare_store(self) -> None:
        """Re-point a moved store; create our experiment with its artifact root tag and the training
        kind (or give an existing one the kind)."""
        repoint_artifacts(self._store_db)
        if self._run_id is not None:  # resuming: the run's experiment already exists
            return
        found = self._mlflow_client.get_experiment_by_name(self._experiment_name)
        if found is None:
            self._experiment_id = self._mlflow_client.create_experiment(
                self._experiment_name, artifact_location=self._artifact_location,
                tags={ARTIFACT_ROOT_TAG: ARTIFACT_FOLDER, EXPERIMENT_KIND_TAG: TRAINING_KIND})
        else:  # a store written before the tag (or by someone else)
            mark_training(self._mlflow_client, found)


def mark_training(client: Any, experiment: Any) -> None:
    """Tag ``experiment`` as model training (:data:`TRAINING_KIND`) unless it has a kind already."""
    if EXPERIMENT_KIND_TAG not in experiment.tags:
        client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, TRAINING_KIND)


class RunKilled(BaseException):
    """Raised in the main thread by SIGTERM/SIGINT while a tracked run is in progress."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"received {signal.Signals(signum).name}")
        self.signum = signum


def _end_run(logger: Any, status: str) -> None:
    """Set the MLflow run's final status; never raises (we are already failing)."""
    try:
        if isinstance(logger, MLFlowLogger) and logger._initialized and logger.run_id:
            logger.experiment.set_terminated(logger.run_id, status)
    except Exception as error:  # noqa: BLE001  (the original failure matters more)
        log.warning("could not mark the MLflow run %s: %s", status, error)


@contextlib.contextmanager
def tracked_run(logger: Any) -> Iterator[None]:
    """Everything inside ends the logger's MLflow run honestly: ``FAILED`` on an exception,
    ``KILLED`` on SIGTERM/SIGINT (then ``SystemExit(128 + signum)``); a finished run is left to
    Lightning (``FINISHED``). The previous signal handlers are restored on the way out.

    Lightning's own handling keeps working: inside ``fit`` it chains the SIGTERM handler installed
    here, and the :class:`RunKilled` raised by it (or by Ctrl+C) goes through Lightning's exception
    path (callbacks' ``on_exception``, teardown, the logger marked ``FAILED``) before this context
    overrules that status with ``KILLED``. A second signal while shutting down is ignored.
    """
    if not isinstance(logger, MLFlowLogger):
        yield
        return
    received: list[int] = []

    def on_signal(signum, frame):  # noqa: ARG001
        if not received:
            received.append(signum)
            raise RunKilled(signum)

    # Signal handlers can only be installed from the main thread (a run started elsewhere keeps
    # Lightning's behaviour).
    main_thread = threading.current_thread() is threading.main_thread()
    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)} if main_thread else {}
    for signum in previous:
        signal.signal(signum, on_signal)
    try:
        yield
    except RunKilled as killed:
        _end_run(logger, "KILLED")
        raise SystemExit(128 + killed.signum) from None
    except BaseException:
        _end_run(logger, "KILLED" if received else "FAILED")
        if received:
            raise SystemExit(128 + received[0]) from None
        raise
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m steer.tracking",
        description="Re-point a (copied or moved) run or sweep folder's MLflow artifacts to where it is "
                    "now and print the mlflow ui command that opens it.")
    parser.add_argument("folder", help="run or sweep folder, its mlflow.db, or a sqlite:/// URI")
    parser.add_argument("--ui", action="store_true", help="start mlflow ui on the store afterwards")
    args = parser.parse_args(argv)
    uri = open_store(args.folder)
    command = ui_command(uri)
    print(f"runs in the model-training view, once the UI is up: {ui_url(uri)}", flush=True)
    print(command, flush=True)
    if args.ui:
        os.execvp("mlflow", shlex.split(command))


if __name__ == "__main__":
    main(sys.argv[1:])


TRACKING_TIMEOUT_S = 3.0
"""How long an http(s) ``logger.tracking_uri`` may take to accept a connection at start-up."""


def check_logger(cfg: DictConfig) -> None:
    """``logger.tracking_uri``: a sqlite store that can be written, or a server that answers."""
    if not select(cfg, "logger") or "tracking_uri" not in cfg.logger:
        return
    uri = str(select(cfg, "logger.tracking_uri"))
    parsed = urlparse(uri)
    if parsed.scheme == "sqlite":
        database = str(store_path(uri) or "")
        if not database or database in (".", ":memory:"):
            raise ConfigError(f"logger.tracking_uri={uri!r} names no database file; allowed: sqlite:///PATH/mlflow.db")
        writable_folder("logger.tracking_uri", Path(database).parent)
    elif parsed.scheme in ("http", "https"):
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
        try:
            with socket.create_connection((parsed.hostname, port), timeout=TRACKING_TIMEOUT_S):
                pass
        except OSError as error:
            raise ConfigError(f"logger.tracking_uri={uri!r}: no tracking server answers at {parsed.hostname}:{port} "
                              f"within {TRACKING_TIMEOUT_S:g} s ({error.strerror or error}); allowed: the URI of a running "
                              "MLflow server, a sqlite:///PATH/mlflow.db store, or logger=none") from None
