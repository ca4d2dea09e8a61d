# The README's commands. `make run`: set up and run the main job on the offline default model.
# `make test`: set up and run the whole test suite (what CI runs).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export REFUSAL_DIR_CACHE ?= $(CURDIR)/.cache/refusal_dir
RUN_DIR ?= outputs/gemma-3-270m-offline

.PHONY: setup run test test-fast lint bench clean

setup: $(VENV)/.installed

# torch is pinned and installed first: an unpinned torch pulls several GB of CUDA packages.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

run: setup
	$(BIN)/refusal-dir run --model gemma-3-270m-offline --output-dir $(RUN_DIR) \
		--max-eval-prompts 40 --max-new-tokens 32

test: setup
	REFUSAL_DIR_TEST_CACHE=$(CURDIR)/.cache/test $(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow" tests/unit

lint: setup
	$(BIN)/ruff check refusal_dir analysis tests bench
	$(BIN)/mypy

bench: setup
	$(BIN)/python bench/bench_extraction.py
	$(BIN)/python bench/bench_generation.py
	$(BIN)/python bench/bench_peers.py

clean:
	rm -rf outputs .pytest_cache
