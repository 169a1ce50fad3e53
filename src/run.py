"""Entry point: ``python src/run.py [overrides]`` (see README). Composition lives in steer.app."""

import sys
from pathlib import Path

# Run from a clone without installing: make src/ importable.
sys.path.insert(0, str(Path(__file__).resolve().parent))

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from steer.app import run  # noqa: E402  (also registers the config resolvers)


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
