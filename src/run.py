"""Entry point: ``python src/run.py [overrides]`` (see README). Composition lives in steer.app;
start-up errors are one line on stderr, exit status 2, and leave no run folder (steer.cli)."""

import sys
from pathlib import Path

# Run from a clone without installing: make src/ importable.
sys.path.insert(0, str(Path(__file__).resolve().parent))

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from steer.cli import fail_early, resume_or_exit, run_task  # noqa: E402  (light: torch is imported by the task)

CONFIG_DIR = Path(__file__).resolve().parents[1] / "conf"


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run_task(cfg)


if __name__ == "__main__":
    # resume=<run folder or .ckpt> becomes the saved run's own overrides and folder (docs/configuration.md).
    sys.argv[1:] = resume_or_exit(sys.argv[1:])
    fail_early(sys.argv[1:], str(CONFIG_DIR))  # bad overrides or run folder: exit before Hydra creates anything
    import steer.app  # noqa: F401  registers the config resolvers before Hydra composes

    main()
