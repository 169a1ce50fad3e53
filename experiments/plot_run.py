"""Figures of a finished run from its MLflow store: entropy and accuracy curves, predicted-vs-measured
scatter per predictor, quadrant bars over time, STEER weight histogram.

    python experiments/plot_run.py --tracking-uri sqlite:///multirun/.../mlflow.db --run-id RUN_ID [--out DIR]

The curves come from the run's metric histories; the scatter and the weight histogram need the
probe's per-token data, which the entropy probe saves as the artifact entropy_probe/probe_data.npz.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import mlflow
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from steer.probe.callback import FIGURES, History, write_figures  # noqa: E402
from steer.tracking import open_store  # noqa: E402


def load_history(client: mlflow.MlflowClient, run_id: str) -> History:
    """Every metric of the run as ``{name: [(step, value), ...]}``."""
    run = client.get_run(run_id)
    return {
        key: [(m.step, m.value) for m in client.get_metric_history(run_id, key)]
        for key in run.data.metrics
    }


def load_probe_data(client: mlflow.MlflowClient, run_id: str) -> dict[str, np.ndarray]:
    """The probe's per-token arrays, or ``{}`` when the run has none."""
    with tempfile.TemporaryDirectory() as folder:
        try:
            path = client.download_artifacts(run_id, "entropy_probe/probe_data.npz", folder)
        except Exception:  # no probe in this run (probe disabled, or an older run)
            return {}
        with np.load(path) as data:
            return {key: data[key] for key in data.files}


def main(argv: list[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tracking-uri", required=True, help="e.g. sqlite:///multirun/DATE/TIME/mlflow.db")
    parser.add_argument("--run-id", required=True)
    parser.add_argument("--out", default=None, help="output folder (default: figures_<run id>)")
    parser.add_argument("--figures", nargs="*", default=list(FIGURES), choices=FIGURES)
    parser.add_argument("--log-artifacts", action="store_true", help="also log the PNGs to the run under figures/")
    args = parser.parse_args(argv)
    client = mlflow.MlflowClient(tracking_uri=open_store(args.tracking_uri))  # a moved folder finds its artifacts
    out = Path(args.out or f"figures_{args.run_id}")
    paths = write_figures(load_history(client, args.run_id), load_probe_data(client, args.run_id), out, args.figures)
    if args.log_artifacts:
        for path in paths:
            client.log_artifact(args.run_id, str(path), "figures")
    for path in paths:
        print(path)
    return paths


if __name__ == "__main__":
    main()
