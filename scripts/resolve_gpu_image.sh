#!/usr/bin/env bash
# What can be checked of the GPU image without building it (its CUDA base cannot be pulled here, and
# no GPU runs it): pip's resolution of its two install lines, `pip install "vllm==$VLLM_VERSION"`
# then `pip install -e ".[vllm,dev,data]"`, as one dry run (`--dry-run --report`) in a throwaway
# venv of Python 3.12 (Ubuntu 24.04's, the base image's python3) when there is one. Nothing is
# installed; pip reads only the packages' metadata. Prints the versions that matter and fails when
# the line does not resolve or vLLM's pick falls outside the project's own ranges (README, "Build the images").
#   bash scripts/resolve_gpu_image.sh          # PYTHON=python3.12 VLLM_VERSION=<the Dockerfile's ARG>
set -euo pipefail
cd "$(dirname "$0")/.."
VLLM_VERSION="${VLLM_VERSION:-$(sed -n 's/^ARG VLLM_VERSION=//p' Dockerfile)}"
if [[ -z "${PYTHON:-}" ]]; then  # the first that runs: python3.12, pyenv's 3.12, else python3
  for candidate in python3.12 $(command -v pyenv >/dev/null && ls -d "$(pyenv root)"/versions/3.12*/bin/python3.12 2>/dev/null) python3; do
    "$candidate" -c "" 2>/dev/null && { PYTHON="$candidate"; break; }
  done
fi
work="$(mktemp -d "${TMPDIR:-/tmp}/steer-resolve.XXXXXX")"
trap 'rm -rf "$work"' EXIT
"$PYTHON" -m venv "$work/venv"
start=$SECONDS
# The image's pip sees PyPI only: no host pip configuration (local wheels, constraints) in this run.
PIP_CONFIG_FILE=/dev/null PIP_FIND_LINKS='' "$work/venv/bin/python" -m pip install --quiet --dry-run --ignore-installed \
  --report "$work/report.json" "vllm==$VLLM_VERSION" -e ".[vllm,dev,data]" \
  || { echo "resolve_gpu_image: vllm==$VLLM_VERSION with the project's pins does not resolve (pip's error above)"; exit 1; }
"$work/venv/bin/python" - "$work/report.json" "$VLLM_VERSION" "$((SECONDS - start))" <<'PY'
import json, sys, tomllib
from pathlib import Path

from pip._vendor.packaging.requirements import Requirement  # the venv has pip, not packaging

report = json.loads(Path(sys.argv[1]).read_text())
picked = {item["metadata"]["name"].lower().replace("_", "-"): item["metadata"] for item in report["install"]}
vllm = picked["vllm"]
assert vllm["version"] == sys.argv[2], vllm["version"]
ours = [Requirement(r) for r in tomllib.loads(Path("pyproject.toml").read_text())["project"]["dependencies"]]
for requirement in ours:  # every pin of the project holds for what pip picked with vLLM
    name = requirement.name.lower()
    assert requirement.specifier.contains(picked[name]["version"], prereleases=True), (str(requirement), picked[name]["version"])
theirs = [r for r in vllm.get("requires_dist", []) if r.split(";")[0].split("<")[0].split(">")[0].split("=")[0].strip() in ("torch", "transformers")]
show = ", ".join(f"{n} {picked[n]['version']}" for n in ("vllm", "torch", "transformers", "tokenizers", "lightning", "mlflow") if n in picked)
print(f"resolve_gpu_image: resolves on Python {report['environment']['python_version']} in {sys.argv[3]} s: {show}"
      f" ({len(picked)} packages); vllm {sys.argv[2]} requires {'; '.join(theirs)}")
PY
