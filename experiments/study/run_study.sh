#!/usr/bin/env bash
# The small-scale entropy-intervention study on the embedded task (issue 5, item 6; issue 14).
#
#   bash experiments/study/run_study.sh                                  # default regime, 3 seeds
#   REGIME=paper_regime_small bash experiments/study/run_study.sh        # 16 optimiser steps per rollout batch
#   REGIME=paper_regime_coverage ARMS=grpo,steer,kl_cov,stare,entropic,ce_gppo STEPS=120 bash experiments/study/run_study.sh
#   STEPS=300 SEEDS=1,2 PARALLEL=2 bash experiments/study/run_study.sh
#
# Knobs (environment variables):
#   REGIME    default | paper_regime_small | paper_regime_coverage (the paper regime on 3-4-term
#             problems held out on 4-term ones, where pass@32 starts at ~0.7-0.76 and can fall;
#             its warm-up differs: it stops at 5% held-out accuracy) (conf/experiment/paper_regime_small.yaml: the paper's
#             16 optimiser steps per rollout batch, 32 prompts x 8 samples, mini-batches of 2 prompts)
#   ARMS      interventions (conf/intervention/), comma-separated; the first is the baseline of the
#             paired differences (OUT/comparison/paired.md: each arm minus it, seed by seed)
#   SEEDS     run seeds (default 1,2,3). Each seed has its OWN supervised warm-up: the runs get
#             model.tiny.seed=${seed} and model.warmup.seed=${seed}, so the tiny model's init and the
#             warm-up's data and order differ per seed and so does its cache folder (the cache key
#             hashes every warm-up setting). The warm-up does not depend on REGIME: both regimes
#             start seed k from the same policy (paired across regimes too).
#   STEPS     RL steps (empty: algorithm.steps, 250)
#   EVAL_SAMPLES, EVAL_EVERY   held-out samples per prompt (default 32: pass@1/2/4/8/16/32 and the
#             distinct addition orders, docs/metrics.md) and steps between evaluations (default 50)
#   THREADS, PARALLEL, OUT, EXTRA (more Hydra overrides, space-separated)
#
# Arms: the six paper methods, the paper's extreme clip setting (eps_low 0.99 / eps_high 5) for
# grpo / entropy_bonus / clip_cov / steer, and the two labelled STEER extensions (steer_quantile,
# steer_band). Each arm x seed is one run of `python src/run.py` (a Hydra multirun per part).
# PARALLEL parts run side by side, each with THREADS torch threads (2 x 1 thread uses 2 cores better
# than 1 x 2 threads for this tiny model). Every part writes its own MLflow store
# (OUT/partN/mlflow.db); experiments/compare.py merges them into OUT/comparison/.
#
# How long (2 cores, PARALLEL=2, threads=1; measured in experiments/study/results/paper_regime_pilot.md):
#   wall ~ arms x seeds x (steps x s/step + evals x s/eval) / PARALLEL, + seeds x warm-up / PARALLEL
#   (a warm-up: ~625 supervised steps, a few minutes on a quiet machine). Quiet machine, 3 seeds,
#   250 steps, 6 evaluations of 32 samples (~25 s each): default regime ~1.2 s/step -> 12 arms ~2.3 h
#   (10 arms ~1.9 h); paper_regime_small ~3 s/step -> 12 arms ~4.5 h, so cut ARMS (never seeds) to
#   grpo,clip_higher,kl_cov,steer,grpo_extreme,steer_extreme (~2.3 h; ~2.1 h with EVAL_EVERY=125).
#   Under load from other jobs, 2-3x longer.
# Measured (experiments/study/REPORT.md, load average 2-3): paper_regime_small, those 6 arms, STEPS=120
#   EVAL_EVERY=40: 470 s of warm-ups + 3730 s of runs (~70 min); default regime, 6 arms, 250 steps,
#   EVAL_EVERY=125: 43 s of (cached) warm-up checks + 3276 s of runs (~55 min).
set -euo pipefail
cd "$(dirname "$0")/../.."

REGIME=${REGIME:-default}
ARMS=${ARMS:-grpo,clip_higher,entropy_bonus,clip_cov,kl_cov,steer,grpo_extreme,entropy_bonus_extreme,clip_cov_extreme,steer_extreme,steer_quantile,steer_band}
SEEDS=${SEEDS:-1,2,3}
STEPS=${STEPS:-}            # empty: the algorithm's steps (250)
EVAL_SAMPLES=${EVAL_SAMPLES:-32}
EVAL_EVERY=${EVAL_EVERY:-50}
THREADS=${THREADS:-1}
PARALLEL=${PARALLEL:-2}
OUT=${OUT:-multirun/study/${REGIME}-$(date -u +%Y%m%d-%H%M%S)}   # multirun/ is git-ignored
EXTRA=${EXTRA:-}            # more Hydra overrides, space-separated

case "$REGIME" in
  default) regime=() ;;
  paper_regime_small) regime=("+experiment=paper_regime_small") ;;
  paper_regime_coverage) regime=("+experiment=paper_regime_coverage") ;;
  *) echo "REGIME=$REGIME is not valid; choose one of: default, paper_regime_small, paper_regime_coverage" >&2; exit 2 ;;
esac

mkdir -p "$OUT"
IFS=',' read -r -a arm_list <<< "$ARMS"
IFS=',' read -r -a seed_list <<< "$SEEDS"
# One warm-up per seed: Hydra resolves ${seed} in each job, so the cache key differs per seed.
# shellcheck disable=SC2016
seeding=('model.tiny.seed=${seed}' 'model.warmup.seed=${seed}')
evaluation=("eval.every_n_steps=$EVAL_EVERY")
if [ "$EVAL_SAMPLES" -ge 32 ]; then
  evaluation+=("eval.benchmarks.arithmetic.samples_per_prompt=$EVAL_SAMPLES" "eval.benchmarks.arithmetic.pass_at_k=[1,2,4,8,16,32]")
else
  evaluation+=("eval.benchmarks.arithmetic.samples_per_prompt=$EVAL_SAMPLES")
fi
overrides=("${regime[@]}" "${seeding[@]}" "${evaluation[@]}" "threads=$THREADS" "callbacks.progress=null"
           "+trainer.enable_progress_bar=false")
[ -n "$STEPS" ] && overrides+=("algorithm.steps=$STEPS")
# shellcheck disable=SC2206
extra=(${EXTRA})
overrides+=("${extra[@]}")
printf '%s\n' "REGIME=$REGIME ARMS=$ARMS SEEDS=$SEEDS STEPS=${STEPS:-default} EVAL_SAMPLES=$EVAL_SAMPLES" \
  "overrides: ${overrides[*]}" > "$OUT/settings.txt"

# Warm each seed's supervised warm-up cache before the parallel parts (PARALLEL seeds at a time), so
# that two parts never compute the same warm-up. One RL step with the runs' own overrides (the cache
# key hashes the resolved model.tiny and model.warmup settings, the task and max_new_tokens).
start=$(date +%s)
pids=()
for seed in "${seed_list[@]}"; do
  python src/run.py seed="$seed" intervention=grpo "${regime[@]}" "${seeding[@]}" "${extra[@]}" algorithm.steps=1 \
    eval.every_n_steps=1000 logger=none callbacks.entropy_probe=null callbacks.checkpoint=null \
    threads="$THREADS" callbacks.progress=null +trainer.enable_progress_bar=false \
    hydra.run.dir="$OUT/warmup_seed$seed" > "$OUT/warmup_seed$seed.log" 2>&1 &
  pids+=($!)
  if [ ${#pids[@]} -ge "$PARALLEL" ]; then wait "${pids[0]}"; pids=("${pids[@]:1}"); fi
done
for pid in "${pids[@]}"; do wait "$pid"; done
echo "warm-ups: $(( $(date +%s) - start )) s wall" | tee "$OUT/warmup_time.txt"

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
  --methods ${ARMS//,/ } --paired-against "${arm_list[0]}" \
  --extra-last probe_summary/released_omega/pearson probe_summary/first_order_omega/pearson \
    probe_summary/covariance/pearson probe_summary/released_omega/spearman \
    probe_summary/first_order_omega/spearman probe_summary/covariance/spearman \
    probe_summary/released_omega/sign_agreement probe_summary/first_order_omega/sign_agreement \
    probe_summary/covariance/sign_agreement probe_summary/parameter_space/pearson \
    probe_summary/parameter_space/spearman probe_summary/parameter_space/sign_agreement \
  --extra-mean steer_diag/steer/weight_mean steer_diag/steer/share_below_0_99 \
    steer_diag/steer/removed_share_abs steer_diag/steer/max_token_prob \
    steer_diag/steer_quantile/weight_mean steer_diag/steer_quantile/share_below_0_99 \
    steer_diag/steer_quantile/removed_share_abs steer_diag/steer_band/weight_mean \
    steer_diag/steer_band/removed_share_abs actor/clipfrac_low actor/clipfrac_high actor/clipfrac_dual actor/approx_kl_old \
    intervention/steer/weight_p10 intervention/steer/weight_p50 intervention/kl_cov/selected_count \
    intervention/clip_cov/selected_count
python experiments/study/analyse_probe.py "$OUT" > "$OUT/comparison/probe_analysis.md" || status=1
# shellcheck disable=SC2086
python experiments/study/trajectory.py "$OUT" --methods ${ARMS//,/ } > "$OUT/comparison/trajectory.md" || status=1
exit $status
