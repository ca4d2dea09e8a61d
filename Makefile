# The README's commands. `make run`: set up and run the main job on the offline default model.
# `make test`: set up and run the whole test suite (what CI runs).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export REFUSAL_DIR_CACHE ?= $(CURDIR)/.cache/refusal_dir
# The main job's model: the offline instruction model (it refuses), converted once into the cache.
RUN_MODEL ?= qwen2.5-coder-0.5b-instruct-offline
RUN_DIR ?= outputs/$(RUN_MODEL)
# The CPU default: about 15 minutes on 2 cores. On a GPU, the full grid of configs/default.yaml:
#   make run RUN_ARGS=""
RUN_ARGS ?= --max-eval-prompts 24 --alphas 0 1 4 --max-new-tokens 96 --selection-prompts 8 --no-honesty --methods addition ablation prompt

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
	$(BIN)/refusal-dir run --model $(RUN_MODEL) --output-dir $(RUN_DIR) $(RUN_ARGS)

test: setup
	REFUSAL_DIR_TEST_CACHE=$(CURDIR)/.cache/test $(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow" tests/unit

# The fast suite in a new venv of its own: $(call fast-suite,VENV,PIP ARGUMENTS,EXTRA).
# torch is installed first and held at $(TORCH); EXTRA is installed over the rest.
define fast-suite
	rm -rf $(1) && $(PYTHON) -m venv $(1)
	$(1)/bin/python -m pip install -q --upgrade pip
	$(1)/bin/python -m pip install -q $(TORCH)
	$(1)/bin/python -m pip install -q $(2) $(TORCH)
	$(if $(3),$(1)/bin/python -m pip install -q $(3) $(TORCH))
	$(1)/bin/python -m pip freeze | grep -iE '^(torch|transformers|transformer.lens|datasets)=='
	$(1)/bin/python -m pytest -q -m "not slow" tests/unit -p no:cacheprovider
endef

# The newest versions pyproject.toml allows (no constraints.txt), so that a breaking release is
# found here first.
test-latest:
	$(call fast-suite,.venv-latest,--upgrade --upgrade-strategy eager -e ".[dev]",$(PROBE))

# The oldest versions pyproject.toml allows.
test-oldest:
	$(call fast-suite,.venv-oldest,-e ".[dev]" $(OLDEST))

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
