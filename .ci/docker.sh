#!/usr/bin/env bash
# CI: build the CPU image with a real container engine and run it (README, "Build the images").
# Installs podman from the package archive when no Docker daemon answers (apt-get: podman runc
# debootstrap catatonit, without recommends), builds steer-lab:cpu with `make image-cpu` (scripts/build_image.sh:
# it says which base and which package sources it took), then runs in the image:
#   1. `--cfg job` (the composed config, no run);
#   2. a 2-step training run into a mounted runs/ folder, whose MLflow store is then read from the
#      host (sqlite3 of the standard library: no MLflow needed here);
#   3. the README's in-image test command, word for word (docker -> the engine used);
# and then pip's resolution of the GPU image's install lines (scripts/resolve_gpu_image.sh).
# Needs root (apt-get, rootful podman, debootstrap). Prints the seconds of each step and the load.
#   .ci/docker.sh      # KEEP=1 keeps the temporary runs folder; ENGINE=docker|podman to choose
set -euo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS
say() { echo "docker step: $*"; }
TAG=steer-lab:cpu

if [[ -z "${ENGINE:-}" ]]; then
  if command -v docker >/dev/null && docker info >/dev/null 2>&1; then ENGINE=docker; else ENGINE=podman; fi
fi
# catatonit: podman's --init (the README's test-suite line); a recommended package, so named here
if [[ "$ENGINE" == podman ]] && ! { command -v podman && command -v runc && command -v debootstrap &&
                                    [[ -x /usr/libexec/podman/catatonit ]]; } >/dev/null; then
  say "installing podman runc debootstrap catatonit from the package archive"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends podman runc debootstrap catatonit >/dev/null
fi
export ENGINE
installed=$SECONDS

make image-cpu
built=$SECONDS
# podman as installed here cannot start a container (the build script said so and used this file)
if [[ "$ENGINE" == podman && -z "${CONTAINERS_CONF:-}" ]] && ! podman run --rm --entrypoint true "$TAG" 2>/dev/null; then
  export CONTAINERS_CONF="$PWD/scripts/containers.conf"
fi

# The README's commands, word for word (its "docker" made the engine used): the one line that matches.
readme_line() {
  local found
  found="$(grep -E "$1" README.md)"
  [[ -n "$found" && "$(wc -l <<<"$found")" == 1 ]] || { echo "docker step: README.md has no single line matching $1" >&2; exit 1; }
  echo "$ENGINE ${found#docker }"
}
runs="$(mktemp -d "${TMPDIR:-/tmp}/steer-docker.XXXXXX")"
[[ "${KEEP:-0}" == 1 ]] || trap 'rm -rf "$runs"' EXIT
mkdir "$runs/runs" && chown 1000:1000 "$runs/runs"  # the image runs as uid 1000

# 1. The composed config: `--cfg job` prints it and runs nothing.
command="$(readme_line '^docker run .* steer-lab:cpu --cfg job')"
say "$command"
(cd "$runs" && bash -c "$command") >"$runs/cfg.txt"
grep -q "^algorithm:" "$runs/cfg.txt" || { echo "docker step: --cfg job printed no config"; exit 1; }

# 2. Two RL steps of the embedded task into $PWD/runs (a temporary folder), read back from the host.
command="$(readme_line '^docker run .* steer-lab:cpu algorithm.steps=2 ')"
say "$command"
(cd "$runs" && bash -c "$command") 2>&1 | tee "$runs/run.log"
python3 - "$runs" <<'PY'
import sqlite3, sys
from pathlib import Path

folder = Path(sys.argv[1])
log = (folder / "run.log").read_text()
assert "Run summary after 2 RL steps" in log, "no run summary"
assert "WARNING" not in log, "a warning in the run's console"
(store,) = folder.glob("runs/outputs/*/*/mlflow.db")  # one run: runs/outputs/<date>/<time>_<name>/mlflow.db
db = sqlite3.connect(store)
(run_id, status, artifacts), = db.execute(
    "SELECT run_uuid, status, artifact_uri FROM runs JOIN experiments USING (experiment_id) WHERE experiments.name = 'steer-lab'")
assert status == "FINISHED", status
steps = [s for (s,) in db.execute("SELECT step FROM metrics WHERE run_uuid = ? AND key = 'reward/accuracy' ORDER BY step", (run_id,))]
assert steps == [0, 1], steps
keys = {k for (k,) in db.execute("SELECT DISTINCT key FROM metrics WHERE run_uuid = ?", (run_id,))}
assert "actor/entropy" in keys and any(k.startswith("eval/arithmetic/mean_at_") for k in keys), sorted(keys)
# the image wrote under /runs: the same files are on the host, in the mounted folder
assert artifacts.startswith("file:///runs/outputs/"), artifacts
figures = list((folder / artifacts[len("file:///"):] / "figures").glob("*.png"))
assert figures, f"no figures under {artifacts}"
print(f"docker step: the MLflow store on the host: {store.relative_to(folder)}, FINISHED, steps {steps},"
      f" {len(keys)} metric keys, {len(figures)} figures")
PY
trained=$SECONDS

# 3. The README's in-image test command, from the clone ($PWD/runs, $PWD/../shared/data).
command="$(readme_line '^docker run .*--entrypoint python steer-lab:cpu -m pytest')"
mkdir -p runs && chown 1000:1000 runs
say "$command"
bash -c "$command" 2>&1 | tee "$runs/tests.log"
grep -Eq "^[0-9]+ passed" "$runs/tests.log" || { echo "docker step: no pytest summary from the image"; exit 1; }
tested=$SECONDS

# 4. The GPU image cannot be built here (its CUDA base cannot be pulled): pip's resolution of its
#    install lines, a dry run (PyPI metadata only).
bash scripts/resolve_gpu_image.sh

say "$((installed - start)) s to install the engine, $((built - installed)) s to build the image," \
  "$((trained - built)) s for --cfg job and the 2-step run, $((tested - trained)) s for the test suite in the image," \
  "$((SECONDS - tested)) s to resolve the GPU image; $((SECONDS - start)) s in all (load average $(cut -d' ' -f1-3 /proc/loadavg))"
