"""Per-GPU memory estimate of a training config (steer.models.memory), without building the model.

    python experiments/memory_estimate.py +experiment=steer_math                      # one config
    python experiments/memory_estimate.py +experiment=steer_math_14b algorithm.micro_batch_size=4 --device-gib 80
    python experiments/memory_estimate.py --table                                     # every steer_* experiment

The config is composed as ``python src/run.py`` composes it (Hydra's compose API over ``conf/``, the
same overrides), read as if on GPUs (``model.compute_dtype: auto`` = bfloat16, ``trainer.devices:
auto`` = the GPUs visible, else 1). ``--device-gib`` sets the GPU memory the peak is compared with
(and vLLM's ``gpu_memory_utilization`` share is taken of); without it the estimate is printed
without a verdict. ``--table`` prints a markdown table for the README: every
``conf/experiment/steer_*.yaml``, resident and peak bytes per GPU, and whether the peak fits an
80 GB H100 and a 96 GB H20 (taken as 80 and 96 GiB; torch reports ~0.5% less for an H100). All
figures are estimates (formulas and what they leave out: ``src/steer/models/memory.py``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
sys.path.insert(0, str(REPO / "src"))

GiB = 2**30
TABLE_DEVICES = {"H100 80 GB": 80 * GiB, "H20 96 GB": 96 * GiB}
"""GPUs of the ``--table`` columns: the paper's released run used 8 H20s; H100s are the common rental."""


def compose(overrides: list[str]):
    """The real config, composed as ``src/run.py`` would (resolvers registered by ``steer.app``)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    import steer.app  # noqa: F401  registers the config's resolvers

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=overrides)


def steer_experiments() -> list[str]:
    return sorted(path.stem for path in (CONF / "experiment").glob("steer_*.yaml"))


def table(extra_overrides: list[str]) -> str:
    """The markdown table over every steer_* experiment (a row says so when a config fails to compose)."""
    from steer.models.memory import estimate_for_config

    header = ["experiment", "model", "layout", "resident / GPU", "peak / GPU (phase)"] + [f"fits {name}?" for name in TABLE_DEVICES]
    rows = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    empty_cells = " |" * (len(header) - 3)
    for name in steer_experiments():
        try:
            cfg = compose([f"+experiment={name}", *extra_overrides])
            estimates = [estimate_for_config(cfg, device_bytes=size, gpu=True) for size in TABLE_DEVICES.values()]
        except Exception as error:  # a config being edited: say so in its row, keep the others
            reason = f"{type(error).__name__}: {str(error).splitlines()[0][:120]}"
            rows.append(f"| `{name}` | ? | could not compose: {reason} |{empty_cells}")
            continue
        first = estimates[0]
        if first is None:
            rows.append(f"| `{name}` | ? | unknown architecture |{empty_cells}")
            continue
        peaks = sorted({f"{e.peak / GiB:.1f}" for e in estimates}, key=float)
        peak_cell = f"{' / '.join(peaks)} GiB ({first.peak_phase})"
        fits = " | ".join("yes" if e.fits else "**no**" for e in estimates)
        rows.append(f"| `{name}` | {first.label} | {first.layout.describe()} | {first.resident / GiB:.1f} GiB | {peak_cell} | {fits} |")
    devices = ", ".join(f"{name} = {size / GiB:.0f} GiB" for name, size in TABLE_DEVICES.items())
    rows.append("")
    rows.append(f"(estimate: steer.models.memory; {devices}; where the peak differs by device, vLLM's share does, "
                "and the cell lists both)")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for src/run.py (e.g. +experiment=steer_math)")
    parser.add_argument("--device-gib", type=float, default=None, help="GPU memory in GiB to compare the peak with")
    parser.add_argument("--table", action="store_true", help="markdown table over every conf/experiment/steer_*.yaml")
    args = parser.parse_args(argv)
    if args.table:
        print(table(args.overrides))
        return
    from steer.models.memory import estimate_for_config

    device_bytes = int(args.device_gib * GiB) if args.device_gib else None
    result = estimate_for_config(compose(args.overrides), device_bytes=device_bytes, gpu=True)
    if result is None:
        print("(estimate) unknown architecture: model.path has no config.json, no cached Hugging Face config and is "
              "not in steer.models.memory.KNOWN_ARCHITECTURES")
        return
    print(result.render())


if __name__ == "__main__":
    main()
