"""How many metric keys a run logs, by namespace: the number the README and docs/metrics.md quote.

Without ``--store`` it trains the given config as it is (the embedded default unless overrides say
otherwise: warm-up, 250 RL steps, ~5 min on 2 cores) with MLflow logging on, in a temporary folder,
and counts the keys in its store. Sizes matter: some keys exist only at some sizes or events (the
probe's per-predictor groups, diversity keys of the evaluation, keys logged only when something
happens), so the number quoted is that of the whole default run; ``--steps`` shortens it for a look.

    python experiments/benchmarks/count_metric_keys.py                       # the embedded default
    python experiments/benchmarks/count_metric_keys.py intervention=steer    # any overrides
    python experiments/benchmarks/count_metric_keys.py --store outputs/<run>/mlflow.db

Prints e.g. ``164 metric keys: actor 20, batch 9, ...`` (the namespace is the part before the first
``/``).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

QUIET = ["callbacks.progress=null", "+trainer.enable_progress_bar=false"]


def metric_keys(store: Path) -> list[str]:
    """Every metric key of every run in the MLflow store ``store`` (a ``mlflow.db`` file)."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{Path(store).resolve()}")
    keys: set[str] = set()
    for experiment in client.search_experiments():
        for run in client.search_runs([experiment.experiment_id]):
            if run.data.tags.get("steer.kind") != "comparison":
                keys |= set(run.data.metrics)
    return sorted(keys)


def count_line(keys: list[str]) -> str:
    by_namespace = Counter(key.split("/", 1)[0] for key in keys)
    return f"{len(keys)} metric keys: " + ", ".join(f"{name} {count}" for name, count in sorted(by_namespace.items()))


def train_and_count(overrides: list[str], steps: int | None = None) -> list[str]:
    """Train the config (for ``steps`` RL steps if given) in a temporary folder; its metric keys."""
    from hydra import compose, initialize_config_dir

    from steer.app import run

    with tempfile.TemporaryDirectory() as folder, initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[
            *QUIET, *([f"algorithm.steps={steps}"] if steps else []), "logger=mlflow", *overrides,
            f"output_dir={folder}", f"store_dir={folder}"])
        run(cfg)
        return metric_keys(Path(folder) / "mlflow.db")


def main(argv: list[str]) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of the trained config")
    parser.add_argument("--store", type=Path, help="count the keys of an existing store instead of training")
    parser.add_argument("--steps", type=int, help="RL steps to train (default: the config's, 250 for the default)")
    args = parser.parse_args(argv)
    keys = metric_keys(args.store) if args.store else train_and_count(args.overrides, args.steps)
    line = count_line(keys)
    print(line)
    return line


if __name__ == "__main__":
    main(sys.argv[1:])
