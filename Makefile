# The README's commands. `make run`: set up and run the main job on the offline default model.
# `make test`: set up and run the whole test suite (what CI runs).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export REFUSAL_DIR_CACHE ?= $(CURDIR)/.cache/refusal_dir
RUN_DIR ?= outputs/gemma-3-270m-offline

# torch is pinned and installed first: an unpinned torch pulls several GB of CUDA packages.
TORCH ?= torch==2.13.0
# The oldest versions pyproject.toml allows, for `make test-oldest`.
OLDEST ?= transformers==5.21.0 transformer-lens==4.3.0 datasets==2.19.0
# Extra requirements for `make test-latest`, installed over the newest allowed versions, e.g.
# PROBE="transformers==5.24.0" to try a release beyond the upper bounds (pip warns of the conflict).
PROBE ?=

.PHONY: setup run test test-fast test-latest test-oldest lock lint bench clean

setup: $(VENV)/.installed

# constraints.txt pins every package to the version the tests last passed with.
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[dev]"
	touch $@

run: setup
	$(BIN)/refusal-dir run --model gemma-3-270m-offline --output-dir $(RUN_DIR) \
		--max-eval-prompts 40 --max-new-tokens 32

test: setup
	REFUSAL_DIR_TEST_CACHE=$(CURDIR)/.cache/test $(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow" tests/unit

# The fast suite on the newest versions pyproject.toml allows (no constraints.txt), in a venv of
# its own, so that a breaking release is found here first. torch stays at $(TORCH).
test-latest:
	rm -rf .venv-latest && $(PYTHON) -m venv .venv-latest
	.venv-latest/bin/python -m pip install -q --upgrade pip
	.venv-latest/bin/python -m pip install -q $(TORCH)
	.venv-latest/bin/python -m pip install -q --upgrade --upgrade-strategy eager -e ".[dev]" $(TORCH)
	$(if $(PROBE),.venv-latest/bin/python -m pip install -q $(PROBE) $(TORCH))
	.venv-latest/bin/python -m pip freeze | grep -iE '^(torch|transformers|transformer.lens|datasets)=='
	.venv-latest/bin/python -m pytest -q -m "not slow" tests/unit -p no:cacheprovider

# The fast suite on the oldest versions pyproject.toml allows.
test-oldest:
	rm -rf .venv-oldest && $(PYTHON) -m venv .venv-oldest
	.venv-oldest/bin/python -m pip install -q --upgrade pip
	.venv-oldest/bin/python -m pip install -q $(TORCH)
	.venv-oldest/bin/python -m pip install -q -e ".[dev]" $(OLDEST)
	.venv-oldest/bin/python -m pip freeze | grep -iE '^(torch|transformers|transformer.lens|datasets)=='
	.venv-oldest/bin/python -m pytest -q -m "not slow" tests/unit -p no:cacheprovider

# Rewrite constraints.txt from the current venv (after a green `make test` on newer versions).
lock: setup
	{ sed -n '1,2p' constraints.txt; $(BIN)/python -m pip freeze --exclude-editable | sed 's/+cpu$$//'; } > constraints.txt.new
	mv constraints.txt.new constraints.txt

lint: setup
	$(BIN)/ruff check refusal_dir analysis tests bench
	$(BIN)/mypy

bench: setup
	$(BIN)/python bench/bench_extraction.py
	$(BIN)/python bench/bench_generation.py
	$(BIN)/python bench/bench_peers.py

clean:
	rm -rf outputs .pytest_cache
