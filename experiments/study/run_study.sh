#!/usr/bin/env bash
# The small-scale entropy-intervention study on the embedded default task (issue 5, item 6).
#
#   bash experiments/study/run_study.sh                # everything, then the table and figures
#   STEPS=300 SEEDS=1,2 PARALLEL=2 bash experiments/study/run_study.sh
#
# Arms: the six paper methods, the paper's extreme clip setting (eps_low 0.99 / eps_high 5) for
# grpo / entropy_bonus / clip_cov / steer, and the two labelled STEER extensions (steer_quantile,
# steer_band). Each arm x seed is one run of `python src/run.py` (a Hydra multirun per part).
# PARALLEL parts run side by side, each with THREADS torch threads (2 x 1 thread uses 2 cores better
# than 1 x 2 threads for this tiny model). Every part writes its own MLflow store
# (OUT/partN/mlflow.db); experiments/compare.py merges them into OUT/comparison/.
set -euo pipefail
cd "$(dirname "$0")/../.."

ARMS=${ARMS:-grpo,clip_higher,entropy_bonus,clip_cov,kl_cov,steer,grpo_extreme,entropy_bonus_extreme,clip_cov_extreme,steer_extreme,steer_quantile,steer_band}
SEEDS=${SEEDS:-1,2,3}
STEPS=${STEPS:-}            # empty: the embedded default's algorithm.steps
THREADS=${THREADS:-1}
PARALLEL=${PARALLEL:-2}
OUT=${OUT:-multirun/study/$(date -u +%Y%m%d-%H%M%S)}   # multirun/ is git-ignored
EXTRA=${EXTRA:-}            # more Hydra overrides, space-separated

mkdir -p "$OUT"
IFS=',' read -r -a arm_list <<< "$ARMS"
overrides=("threads=$THREADS" "callbacks.progress=null" "+trainer.enable_progress_bar=false")
[ -n "$STEPS" ] && overrides+=("algorithm.steps=$STEPS")
# shellcheck disable=SC2206
[ -n "$EXTRA" ] && overrides+=($EXTRA)

# Warm the supervised warm-up cache once, so that the parallel parts do not each compute it.
# (the same overrides as the runs, so that the cache key matches; seed and steps do not enter it)
# shellcheck disable=SC2206
warm=(${EXTRA})
python src/run.py intervention=grpo "${warm[@]}" algorithm.steps=1 eval.every_n_steps=1000 logger=none \
  callbacks.entropy_probe=null callbacks.checkpoint=null threads="$THREADS" callbacks.progress=null \
  +trainer.enable_progress_bar=false hydra.run.dir="$OUT/warmup" > "$OUT/warmup.log" 2>&1

start=$(date +%s)
pids=()
for ((part = 0; part < PARALLEL; part++)); do
  mine=()
  for ((i = part; i < ${#arm_list[@]}; i += PARALLEL)); do mine+=("${arm_list[$i]}"); done
  [ ${#mine[@]} -eq 0 ] && continue
  arms_csv=$(IFS=','; echo "${mine[*]}")
  # seed first: Hydra sweeps the last override fastest, so every arm finishes seed 1 before seed 2
  python src/run.py -m "seed=$SEEDS" "intervention=$arms_csv" "${overrides[@]}" hydra.sweep.dir="$OUT/part$part" \
    > "$OUT/part$part.log" 2>&1 &
  pids+=($!)
  echo "part $part: $arms_csv (pid $!)"
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=1; done
echo "study runs: $(( $(date +%s) - start )) s wall, exit status $status" | tee "$OUT/wall_time.txt"

uris=()
for db in "$OUT"/part*/mlflow.db; do uris+=(--tracking-uri "sqlite:///$(realpath "$db")"); done
# shellcheck disable=SC2086
python experiments/compare.py "${uris[@]}" --experiment steer-lab --out "$OUT/comparison" \
  --methods ${ARMS//,/ } \
  --extra-last probe_summary/released_omega/pearson probe_summary/first_order_omega/pearson \
    probe_summary/covariance/pearson probe_summary/released_omega/spearman \
    probe_summary/first_order_omega/spearman probe_summary/covariance/spearman \
    probe_summary/released_omega/sign_agreement probe_summary/first_order_omega/sign_agreement \
    probe_summary/covariance/sign_agreement \
  --extra-mean steer_diag/steer/weight_mean steer_diag/steer/share_below_0_99 \
    steer_diag/steer/removed_share_abs steer_diag/steer/max_token_prob \
    steer_diag/steer_quantile/weight_mean steer_diag/steer_quantile/share_below_0_99 \
    steer_diag/steer_quantile/removed_share_abs steer_diag/steer_band/weight_mean \
    steer_diag/steer_band/removed_share_abs actor/clipfrac_low actor/clipfrac_high
exit $status
