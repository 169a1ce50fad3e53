# The two commands of the README. Both install what they need first (idempotent, quiet when done).
PYTHON ?= python
# torch first, pinned: otherwise another package pulls the 5.5 GB CUDA build (see README, Install).
TORCH ?= torch==2.13.0

.PHONY: install run test test-slow

install:
	$(PYTHON) -m pip install --quiet "$(TORCH)"
	$(PYTHON) -m pip install --quiet -e ".[dev]"

run: install
	$(PYTHON) src/run.py $(ARGS)

test: install
	$(PYTHON) -m pytest -q

test-slow: install
	$(PYTHON) -m pytest -q -m slow
