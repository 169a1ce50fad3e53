"""Entry point: ``python src/run.py [overrides]`` (see README). Composition lives in steer.app."""

import sys
from pathlib import Path

# Run from a clone without installing: make src/ importable.
sys.path.insert(0, str(Path(__file__).resolve().parent))

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from steer.app import run  # noqa: E402  (also registers the config resolvers)
from steer.checkpointing import resume_arguments  # noqa: E402
from steer.config import ConfigError  # noqa: E402


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    # resume=<run folder or .ckpt> becomes the saved run's own overrides and folder (docs/configuration.md).
    try:
        sys.argv[1:] = resume_arguments(sys.argv[1:])
    except ConfigError as error:
        sys.exit(f"Error: {error}")
    main()
