#!/usr/bin/env bash
# A virtual environment with TRL for experiments/benchmarks/bench_vs_trl.py only: TRL is never a
# dependency of the project. --system-site-packages reuses the installed torch and transformers, so
# both systems run on the very same torch/transformers build (the comparison is of the trainers).
# Idempotent: does nothing when the venv already imports trl at the pinned version.
set -euo pipefail
VENV=${VENV:-.venv-trl}
PYTHON=${PYTHON:-python}
TRL=${TRL:-trl==1.16.0}
want=${TRL#trl==}
if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "import trl, sys; sys.exit(trl.__version__ != '$want')" 2>/dev/null; then
    exit 0
fi
"$PYTHON" -m venv --system-site-packages "$VENV"
# Keep the system torch/transformers: pip would otherwise upgrade or replace them (and pull CUDA torch).
constraints=$(mktemp)
"$PYTHON" - > "$constraints" <<'PY'
import importlib.metadata as md
for name in ("torch", "transformers", "accelerate", "numpy"):
    try:
        print(f"{name}=={md.version(name)}")
    except md.PackageNotFoundError:
        pass
PY
"$VENV/bin/python" -m pip install --quiet -c "$constraints" "$TRL"
rm -f "$constraints"
"$VENV/bin/python" -c "import torch, transformers, trl; from trl import GRPOConfig, GRPOTrainer; print('trl', trl.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__)"
