#!/usr/bin/env bash
# The first hour of a new user, as a CI step: clone this repository's HEAD into a temporary folder
# (beside a link to the shared data folder, as a clone next to shared/ has it), make a fresh virtual
# environment there, run the README's two commands in order: `make test` (installs torch, the
# package and what the suite needs, then runs it: an install step that exists only on a developer's
# machine fails here) and `make run` with tiny overrides; then check the printed summary, the install
# log and the MLflow store. Not part of pytest (it would recurse into a second install).
#   .ci/newcomer.sh            # KEEP=1 keeps the temporary folder for a look afterwards; SKIP_TESTS=1 skips make test
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
work="$(mktemp -d "${TMPDIR:-/tmp}/steer-newcomer.XXXXXX")"
[[ "${KEEP:-0}" == 1 ]] || trap 'rm -rf "$work"' EXIT
start=$SECONDS

git clone --quiet "$repo" "$work/steer-lab"
[[ -d "$repo/../shared" ]] && ln -s "$(cd "$repo/../shared" && pwd)" "$work/shared"  # data_dir: ../shared/data
cd "$work/steer-lab"
python3 -m venv "$work/venv"
# shellcheck disable=SC1091
source "$work/venv/bin/activate"
export STEER_CACHE="$work/cache"   # a new user has no warm-up cache either

# The README's test command, as written, in the fresh venv.
if [[ "${SKIP_TESTS:-0}" != 1 ]]; then
  make test 2>&1 | tee "$work/test.log"
  tested=$SECONDS
  grep -Eq "^[0-9]+ passed" "$work/test.log" || { echo "newcomer: no pytest summary"; exit 1; }
fi
tested=${tested:-$SECONDS}

# The README's run command, as written, plus overrides that make it take seconds, not minutes.
tiny="algorithm.steps=3 algorithm.n=4 algorithm.prompts_per_step=4 algorithm.minibatch_prompts=2 \
rollout.max_new_tokens=24 model.tiny.hidden_size=32 model.tiny.num_layers=1 model.warmup.max_steps=4 \
model.warmup.eval_every=2 model.warmup.eval_prompts=8 model.warmup.batch_size=8 eval.every_n_steps=1 \
eval.benchmarks.arithmetic.samples_per_prompt=1 data.task.num_heldout=8 threads=1"
make run ARGS="$tiny" 2>&1 | tee "$work/run.log"
installed=$SECONDS

python - "$work/run.log" <<'PY'
import re, sys
from importlib.metadata import version
from pathlib import Path

import mlflow

log = Path(sys.argv[1]).read_text()
assert "does not provide the extra" not in log, "pip dropped an extra (see the install log above)"
assert version("antlr4-python3-runtime") == "4.9.3", version("antlr4-python3-runtime")
assert "Run summary after 3 RL steps" in log, "no run summary"
assert "Epoch" not in log, "the progress bar shows an epoch counter"
for noise in ("litlogger", "GPU available", "TPU available", "LeafSpec", "Writing model shards"):
    assert noise not in log, f"dependency output in the run's console: {noise}"
assert re.search(r"^RL step 3/3  reward \S+  entropy \S+  eval acc \S+ @3  s/step \S+$", log, re.M), "no final progress line"
ui = [line for line in log.splitlines() if line.startswith("mlflow ui --backend-store-uri sqlite:///")]
assert len(ui) == 1 and ui[0].endswith("--host 127.0.0.1 --port 5000 --workers 1"), ui
uri = ui[0].split()[3]
store = Path(uri[len("sqlite:///"):])
assert store.is_file() and store.parent.parent.parent.name == "outputs", store
client = mlflow.MlflowClient(tracking_uri=uri)
(run,) = client.search_runs([client.get_experiment_by_name("steer-lab").experiment_id])
assert run.info.status == "FINISHED", run.info.status
steps = [m.step for m in client.get_metric_history(run.info.run_id, "reward/accuracy")]
assert steps == [0, 1, 2], steps
assert "eval/arithmetic/mean_at_1" in run.data.metrics
figures = [f.path for f in client.list_artifacts(run.info.run_id, "figures")]
assert figures, "no figures logged"
assert run.info.artifact_uri.startswith((store.parent / "artifacts").as_uri()), run.info.artifact_uri
assert not Path("mlruns").exists(), "artifacts went to ./mlruns"
print(f"newcomer check: OK ({len(figures)} figures, store {store})")
PY
tests_note=$([[ "${SKIP_TESTS:-0}" == 1 ]] && echo "clone + venv (make test skipped)" || echo "clone + venv + install + make test")
echo "newcomer step: ${tested}s for $tests_note, $((installed - tested))s for make run," \
  "$((SECONDS - start))s in all (load average $(cut -d' ' -f1-3 /proc/loadavg))"
