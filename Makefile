# ecgtok developer commands. `make demo` and `make test` are the two a fresh machine needs.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DATA ?= ../shared/data
# google-auth probes the GCE metadata server for ~20 s per process without this.
export NO_GCE_CHECK := true

.PHONY: venv demo test test-fast lint format bench clean

$(BIN)/ecgtok: setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(BIN)/ecgtok

venv: $(BIN)/ecgtok

## Run the main job on the embedded default: a synthetic WFDB archive the demo writes itself.
demo: venv
	$(BIN)/ecgtok demo --output demo_out --overwrite

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: venv
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

## The whole suite (slow tests included), after lint.
test: lint
	ECGTOK_DATA=$(DATA) $(BIN)/python -m pytest -q -m "not benchmark"

## Quick loop while developing: skips tests marked slow.
test-fast: venv
	ECGTOK_DATA=$(DATA) $(BIN)/python -m pytest -q -m "not slow and not benchmark"

## Speed programs (each prints ecgtok beside its baseline, in one run). Minutes, not seconds.
bench: venv
	$(BIN)/python benchmarks/bench_read.py --data $(DATA)/cinc2021_12lead
	$(BIN)/python benchmarks/bench_beats.py --data $(DATA)/mitdb --skip-xqrs
	$(BIN)/python benchmarks/bench_e2e.py
	$(BIN)/python benchmarks/bench_score.py
	$(BIN)/python benchmarks/bench_formats.py --data $(DATA)/formats
	$(BIN)/python benchmarks/bench_scaling.py

clean:
	rm -rf demo_out demo_archive build *.egg-info .pytest_cache .ruff_cache
